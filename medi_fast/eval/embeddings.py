"""The embeddings file: one parquet (metadata columns + ``emb_0000..``) or npz (``embeddings`` + ``meta/<column>``
arrays) per image set, whatever extractor made it (``medi-fast embed`` writes it; ``probe`` and ``shortcut``
read it)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError
from ..io import atomic_path, require_file

EMB_PREFIX = "emb_"


def save_embeddings(path, meta: pd.DataFrame, emb: np.ndarray, encoder: str = "") -> Path:
    """One file: metadata columns + ``emb_0000..`` (parquet) or arrays ``embeddings`` + columns (npz)."""
    path = Path(path)
    emb = np.asarray(emb, dtype=np.float32)
    if len(meta) != len(emb):
        raise MediFastError(f"{len(meta)} metadata rows but {len(emb)} embeddings; this is a bug, please report it")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            cols = pd.DataFrame(emb, columns=[f"{EMB_PREFIX}{i:04d}" for i in range(emb.shape[1])])
            df = pd.concat([meta.reset_index(drop=True).astype(str), cols], axis=1)
            df.attrs = {}
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".npz":
            arrays = {f"meta/{c}": meta[c].astype(str).to_numpy(dtype=str) for c in meta.columns}
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=emb, encoder=np.array(encoder), **arrays)
        else:
            raise MediFastError(f"--out {path} must end in .parquet or .npz")
    return path


def load_embeddings(path) -> tuple[pd.DataFrame, np.ndarray]:
    """File from :func:`save_embeddings` -> (metadata DataFrame, float32 (N, D))."""
    path = require_file(path, "embeddings file", f"make it with `medi-fast embed --out {Path(path).name}`")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                meta = pd.DataFrame({k[5:]: z[k] for k in z.files if k.startswith("meta/")})
                return meta, z["embeddings"].astype(np.float32)
        df = pd.read_parquet(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise MediFastError(f"cannot read embeddings {path} ({type(e).__name__}); recompute with `medi-fast embed`") from None
    cols = [c for c in df.columns if c.startswith(EMB_PREFIX)]
    if not cols:
        raise MediFastError(f"{path} has no {EMB_PREFIX}* columns; make it with `medi-fast embed`")
    meta = df[[c for c in df.columns if not c.startswith(EMB_PREFIX)]].astype(str)
    return meta, df[cols].to_numpy(np.float32)


def as_embeddings(x) -> tuple[pd.DataFrame, np.ndarray]:
    """An embeddings file (from `medi-fast embed`) or an already loaded (metadata, embeddings) pair -> the pair."""
    if isinstance(x, tuple):
        return x
    return load_embeddings(x)
