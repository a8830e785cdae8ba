"""Content-keyed cache of built engines, safe for several processes on one node.

A TensorRT engine depends on the ONNX graph (its bytes), the TensorRT version, the GPU (name and
compute capability), the precision, the batch profile and the build options; the cache key is a
hash of exactly these, so a matching engine is reused and any change builds a new one.  Entries are
directories ``<root>/<key>/`` holding the engine, its sidecar and ``key.json`` (the key's fields),
made in a temporary directory and renamed into place only when complete.

Two processes asking for the same key: a file lock (``filelock``) per key makes the second wait
and then reuse what the first built, instead of both spending minutes on the same build.  The
cache does not care what builds the bytes: ``get_or_build`` takes the builder as a function.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from medi_fast.errors import MediFastError
from medi_fast.io import atomic_dir

ENGINE_NAME = "model.engine"
KEY_FILE = "key.json"
KEY_VERSION = 1


def default_cache_dir() -> Path:
    """``$MEDI_FAST_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/medi-fast/engines`` (``~/.cache/...``)."""
    if os.environ.get("MEDI_FAST_ENGINE_CACHE"):
        return Path(os.environ["MEDI_FAST_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medi-fast" / "engines"


def file_digest(path) -> str:
    """sha256 of an .onnx file and its external-data file, if any (the weights are part of the content)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def cache_key(fields: dict) -> str:
    """A stable hex key for a JSON-able dict of build inputs."""
    text = json.dumps({"v": KEY_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def key_fields(onnx_path, *, fingerprint: dict, precision: str, batch, options: dict) -> dict:
    """Everything a built engine depends on: graph content, TensorRT and GPU, precision, profile, options."""
    return {"onnx_sha256": file_digest(onnx_path), **{k: fingerprint[k] for k in sorted(fingerprint)},
            "precision": precision, "batch": str(batch), "options": dict(sorted(options.items()))}


class EngineCache:
    def __init__(self, root=None, *, timeout: float = 3600.0):
        self.root = Path(root) if root is not None else default_cache_dir()
        # How long a process waits for another one's build of the same key before giving up.
        self.timeout = timeout

    def entry(self, key: str) -> Path:
        return self.root / key

    def lookup(self, fields: dict) -> Path | None:
        """The cached engine for ``fields`` when a complete, matching entry exists."""
        d = self.entry(cache_key(fields))
        try:
            stored = json.loads((d / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        if stored != json.loads(json.dumps(fields, sort_keys=True, default=str)) or not (d / ENGINE_NAME).is_file():
            return None
        return d / ENGINE_NAME

    def get_or_build(self, fields: dict, build: Callable[[Path], object]) -> tuple[Path, bool]:
        """(engine path, built_now).  ``build(path)`` must write the engine (and anything beside it) at ``path``."""
        from filelock import FileLock, Timeout

        hit = self.lookup(fields)
        if hit is not None:
            return hit, False
        key = cache_key(fields)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.root / f"{key}.lock"), timeout=self.timeout):
                hit = self.lookup(fields)  # built by another process while we waited
                if hit is not None:
                    return hit, False
                return self._build(key, fields, build), True
        except Timeout:
            raise MediFastError(f"another process has been building engine {key} for over {self.timeout:.0f} s; "
                                f"wait for it, or remove {self.root / (key + '.lock')} if it died") from None

    def _build(self, key: str, fields: dict, build: Callable[[Path], object]) -> Path:
        # overwrite: an existing entry is incomplete or mismatched (lookup missed it), and we hold the key's lock
        with atomic_dir(self.entry(key), overwrite=True) as staging:
            build(staging / ENGINE_NAME)
            if not (staging / ENGINE_NAME).is_file():
                raise MediFastError(f"the engine builder wrote no {ENGINE_NAME}; report this with the model file")
            (staging / KEY_FILE).write_text(json.dumps(fields, sort_keys=True, indent=2, default=str))
        return self.entry(key) / ENGINE_NAME
