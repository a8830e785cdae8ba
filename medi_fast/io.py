"""Atomic writes: every output appears whole or not at all."""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path

from .errors import MediFastError

TMP_MARK = ".medi-tmp-"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{path.name}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it into place on success, delete it on failure."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise os_error(e, path) from None
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def ensure_dir(path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    if not os.access(path, os.W_OK):
        raise MediFastError(f"output directory {path} is not writable; choose another --out or fix its permissions")
    return path


def clean_tmp(root) -> int:
    """Remove temporary files left by an interrupted run (e.g. SIGKILL); returns how many."""
    n = 0
    for p in Path(root).rglob(f"{TMP_MARK}*"):
        _unlink(p)
        n += 1
    return n


def os_error(e: OSError, path) -> MediFastError:
    if e.errno == errno.ENOSPC:
        return MediFastError(f"disk full while writing {path}; free space or choose another --out, then rerun "
                             f"the same command to resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MediFastError(f"cannot write {path} (permission denied); choose another --out or fix its permissions")
    return MediFastError(f"cannot write {path} ({e.strerror or e}); choose another --out")


def _unlink(p) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def require_file(path, what: str, fix: str = "check the path") -> Path:
    """``path`` as a Path if it is an existing file; else one line saying whether it is missing or
    a directory (a directory given for a file is not "missing")."""
    path = Path(path)
    if path.is_dir():
        raise MediFastError(f"{what} {path} is a directory, not a file; give the file itself")
    if not path.is_file():
        raise MediFastError(f"{what} {path} does not exist; {fix}")
    return path


def check_writable_dir(path) -> Path:
    """Refuse an output directory that could not be created or written, without creating it (a
    refused command leaves nothing behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MediFastError(f"output {path} is a file, not a directory; choose another --out")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise MediFastError(f"cannot create {path}: {probe} is a file; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MediFastError(f"output directory {probe} is not writable; choose another --out or fix its permissions")
    return path
