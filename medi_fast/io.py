"""Atomic writes: every output appears whole or not at all.

The one home of temp-file-and-rename: a file (:func:`atomic_path`, :func:`atomic_write_bytes`,
:func:`atomic_write_text`), files that belong together (:func:`atomic_files`) and a directory
(:func:`atomic_dir`).  Temporary names start with :data:`TMP_MARK` and sit beside their destination
(a rename is atomic only within one file system); :func:`clean_tmp` removes those a killed run left.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
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


@contextlib.contextmanager
def atomic_files(*paths):
    """Yield a temporary directory beside ``paths``, files of one directory that belong together (a graph and
    its external weights, an engine and its sidecar); the caller writes each under its own name there.

    On success the files written are moved into place by :func:`replace_together` in the order given; on
    failure nothing is replaced.  The temporary directory (and anything else written in it) is removed
    either way.
    """
    paths = [Path(p) for p in paths]
    if len({p.parent for p in paths}) != 1:
        raise ValueError(f"atomic_files takes files of one directory, got {[str(p) for p in paths]}")
    ensure_dir(paths[0].parent)
    tmp = tmp_name(paths[0])
    try:
        tmp.mkdir()
        yield tmp
        replace_together([(tmp / p.name, p) for p in paths if (tmp / p.name).exists()])
    except OSError as e:  # the files are written together, so the message names their folder
        raise os_error(e, paths[0].parent) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_together(pairs) -> None:
    """Rename each staged file of ``pairs`` ``(staged, destination)`` onto its destination, in order.

    The destinations after the first are removed before the first rename: while this runs a reader finds the
    old set, or one with a file missing (which it refuses), but never a new file beside an old partner.
    """
    pairs = [(Path(a), Path(b)) for a, b in pairs]
    for _, dest in pairs[1:]:
        dest.unlink(missing_ok=True)
    for staged, dest in pairs:
        os.replace(staged, dest)


@contextlib.contextmanager
def atomic_dir(path, *, overwrite: bool = False):
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path``.

    An existing non-empty ``path`` is an error unless ``overwrite`` (then it is replaced whole, only
    after the new one is complete).  On any failure the temporary directory is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MediFastError(f"{path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MediFastError(f"{path} already exists and is not empty; pass --overwrite or choose another --out")
    ensure_dir(path.parent)
    tmp = tmp_name(path)
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if path.exists():
            old = tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(paths, *, overwrite: bool) -> None:
    """An existing output file is an error unless ``overwrite`` (checked before any work is done)."""
    for p in map(Path, paths):
        if p.is_dir():
            raise MediFastError(f"output {p} is a directory; give a file name for --out")
        if p.exists() and not overwrite:
            raise MediFastError(f"{p} already exists; pass --overwrite to replace it, or choose another --out")


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


def check_writable_dir(path, option: str = "--out") -> Path:
    """Refuse an output directory that could not be created or written, without creating it (a
    refused command leaves nothing behind).  ``option`` names the option the path came from."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MediFastError(f"output {path} is a file, not a directory; choose another {option}")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise MediFastError(f"cannot create {path}: {probe} is a file; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MediFastError(f"output directory {probe} is not writable; choose another {option} or fix its "
                            f"permissions")
    return path


def check_output_file(path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output file path before any work is done (nothing is created): a directory, a name
    without one of ``suffixes`` (when given), or a folder that could not be created or written.
    ``option`` names the option the path came from, so the message says which one to change."""
    path = Path(path)
    if path.is_dir():
        raise MediFastError(f"{option} {path} is a directory; give a file name")
    if suffixes and path.suffix not in suffixes:
        raise MediFastError(f"{option} {path} must end in {' or '.join(suffixes)}")
    check_writable_dir(path.parent, option)
    return path


def claim_output_dir(path, *, overwrite: bool, marker: str, names, command: str, option: str = "--out") -> Path:
    """Check an output directory that a command builds whole and renames into place, before any work.

    It must be new or empty; with ``overwrite`` it may also be an earlier output of the same command:
    it holds ``marker`` and nothing but ``names`` (``names(entry_name) -> bool``), so replacing it
    never deletes a file of the user.  The current directory and its parents are refused (replacing
    them would pull the directory out from under the shell).  Temporaries that an interrupted run of
    the same output left beside it (:func:`tmp_name`) are removed."""
    import shutil

    path = Path(path)
    full = Path(os.path.abspath(path))
    real, cwd = Path(os.path.realpath(path)), Path(os.path.realpath(Path.cwd()))
    if real == cwd or real in cwd.parents:
        raise MediFastError(f"{option} {path} is the current directory or one of its parents; give a new folder")
    if full.exists() and not full.is_dir():
        raise MediFastError(f"{option} {path} is a file, not a directory; choose another {option}")
    present = sorted(p.name for p in full.iterdir()) if full.is_dir() else []
    if present and not overwrite:
        raise MediFastError(f"{path} already exists and is not empty; pass --overwrite or choose another {option}")
    foreign = [n for n in present if not names(n)]
    if present and (marker not in present or foreign):
        what = ", ".join(foreign[:3]) if marker in present else f"no {marker}"
        raise MediFastError(f"{path} is not an earlier `{command}` output ({what}); --overwrite replaces only "
                            f"that; choose another {option}")
    check_writable_dir(full.parent, option)
    if full.parent.is_dir():
        for stale in full.parent.glob(f"{TMP_MARK}*-{full.name}"):
            if len(stale.name) != len(TMP_MARK) + 9 + len(full.name):  # tmp_name's 8 hex digits and '-'
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                _unlink(stale)
    return path
