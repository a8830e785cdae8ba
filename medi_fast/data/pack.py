"""Packed training data: every patch resized once into one uint8 memory-mapped array.

Layout on disk (``out_dir``):
  images.u8       raw uint8, C order, shape (N, 3, R, R) (channel-first: a batch is one gather,
                  ready for torch without a transpose)
  labels.parquet  the index rows, in the same order (row i describes images[i])
  pack.json       format, version, N, resolution, layout, dtype, source index
Decoding JPEGs is the bottleneck of a trainer on a small machine; a memmap read is a memory copy.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError
from ..io import atomic_dir, claim_output_dir
from .imageio import load_patch
from .index import read_index

FORMAT = "medi-fast-pack"
VERSION = 1
LAYOUT = "NCHW"
PACK_FILES = ("images.u8", "labels.parquet", "pack.json")  # everything a pack directory holds


def pack_index(index, resolution: int, out_dir, *, overwrite: bool = False, workers: int | None = None,
               progress: bool = False) -> Path:
    """Resize every patch of ``index`` (a DataFrame or an index parquet path) to ``resolution`` and write
    the pack to ``out_dir`` atomically (temporary directory, then rename)."""
    from .index import decoder_threads

    threads = decoder_threads(workers)
    df = index if isinstance(index, pd.DataFrame) else read_index(index)
    if len(df) == 0:
        raise MediFastError("the index is empty; nothing to pack")
    if not 8 <= int(resolution) <= 2048:
        raise MediFastError(f"resolution {resolution} is out of range; use 8..2048 (e.g. 128)")
    r = int(resolution)
    n = len(df)
    claim_output_dir(out_dir, overwrite=overwrite, marker="pack.json", names=PACK_FILES.__contains__,
                     command="medi-fast data pack")
    paths = df["path"].tolist()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        arr = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=(n, 3, r, r))

        def work(i):
            arr[i] = load_patch(paths[i], r).transpose(2, 0, 1)  # (R, R, 3) -> (3, R, R)

        with ThreadPoolExecutor(threads) as ex:
            done = ex.map(work, range(n), chunksize=32)
            if progress:
                from tqdm import tqdm

                done = tqdm(done, total=n, desc="pack", unit="patch")
            for _ in done:
                pass
        arr.flush()
        del arr
        labels = df.reset_index(drop=True).copy()
        labels.attrs = {}
        labels.to_parquet(tmp / "labels.parquet", index=False)
        meta = {"format": FORMAT, "version": VERSION, "n": n, "resolution": r, "layout": LAYOUT, "dtype": "uint8",
                "shape": [n, 3, r, r], "source_index": str(index) if not isinstance(index, pd.DataFrame) else None,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "pack.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def read_pack(path) -> tuple[dict, np.memmap, pd.DataFrame]:
    """(pack.json, images memmap (N, 3, R, R) read-only, labels) of a pack directory, checked."""
    path = Path(path)
    meta_path = path / "pack.json"
    if not meta_path.is_file():
        raise MediFastError(f"{path} is not a pack (no pack.json); build one with `medi-fast data pack INDEX "
                            f"--resolution 128 --out {path}`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise MediFastError(f"{meta_path} is corrupt; rebuild the pack with `medi-fast data pack`") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise MediFastError(f"{path} is a {meta.get('format')} v{meta.get('version')} pack; this medi-fast reads "
                            f"{FORMAT} v{VERSION}: rebuild it with `medi-fast data pack`")
    n, r = int(meta["n"]), int(meta["resolution"])
    img_path = path / "images.u8"
    expected = n * 3 * r * r
    if not img_path.is_file() or img_path.stat().st_size != expected:
        got = img_path.stat().st_size if img_path.is_file() else 0
        raise MediFastError(f"{img_path} has {got} bytes, expected {expected} (N={n}, R={r}); the pack is "
                            f"incomplete or corrupt: rebuild it with `medi-fast data pack`")
    images = np.memmap(img_path, dtype=np.uint8, mode="r", shape=(n, 3, r, r))
    labels = pd.read_parquet(path / "labels.parquet")
    if len(labels) != n:
        raise MediFastError(f"{path}: labels.parquet has {len(labels)} rows for {n} images; rebuild the pack")
    return meta, images, labels
