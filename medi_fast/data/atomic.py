"""Directories that appear whole or not at all: build into a temporary sibling, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ..errors import MediFastError
from ..io import ensure_dir, os_error, tmp_name


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
