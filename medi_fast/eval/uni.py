"""UNI embeddings and the embeddings file.

UNI itself is the ``uni`` entry of the encoder registry (:mod:`.encoders`): timm ViT-L/16 as its card
builds it, the card's transform (resize + centre crop to 224, [0, 1], ImageNet mean/std).  (The MeDi
reference code fed [-1, 1] diffusion outputs straight into UNI; that shifts every embedding, so we do
not.)  :func:`UNIEncoder` also runs UNI's recipe on another timm architecture (tests use
``vit_tiny_patch16_224``).  Embeddings of any extractor are written as ONE parquet/npz file with the
metadata columns (:func:`save_embeddings`, :func:`load_embeddings`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import MediFastError
from .encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, build_model, custom_spec  # noqa: F401 (re-exported)

UNI_ENCODER = "vit_large_patch16_224"
EMB_PREFIX = "emb_"


def create_encoder(encoder: str = UNI_ENCODER, image_size: int = 224) -> torch.nn.Module:
    """The timm model, randomly initialised: UNI's card settings (LayerScale 1e-5, no head, dynamic image size)
    on ``encoder`` (any timm name)."""
    return build_model(custom_spec(encoder, image_size))


def UNIEncoder(weights=None, encoder: str | None = None, device=None, batch_size: int = 64, image_size: int = 224,
               random_init: bool = False, seed: int = 0) -> Encoder:
    """The ``uni`` registry encoder (see :mod:`.encoders`), or UNI's recipe on another timm architecture
    (``encoder``, ``image_size``: tests use ``vit_tiny_patch16_224`` at 32 px)."""
    if (encoder or UNI_ENCODER) == UNI_ENCODER and image_size == 224:
        return Encoder("uni", weights=weights, device=device, batch_size=batch_size, random_init=random_init, seed=seed)
    return Encoder(spec=custom_spec(encoder or UNI_ENCODER, image_size), weights=weights, device=device,
                   batch_size=batch_size, random_init=random_init, seed=seed)


def save_embeddings(path, meta: pd.DataFrame, emb: np.ndarray, encoder: str = "") -> Path:
    """One file: metadata columns + ``emb_0000..`` (parquet) or arrays ``embeddings`` + columns (npz)."""
    from ..io import atomic_path

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
    from ..io import require_file

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


def embed_images(images, out, *, extractor: str = "uni", weights=None, encoder: str | None = None,
                 random_init: bool = False, image_size: int = 224, batch_size: int = 64, resolution: int | None = None,
                 device=None, progress: bool = False, notify=None) -> tuple[Path, int, int, str]:
    """Embed an image set (index parquet, manifest, folder) into ONE file with its metadata columns
    (``medi-fast embed``).  ``extractor``: a registry encoder (``uni``, ``uni2-h``, ``virchow2``,
    ``h-optimus-0``, ``h-optimus-1``) or ``colour-texture``/``inception``/``inception-random``.  ``notify``
    receives the encoder's licence line once, before any image is embedded.
    Returns (path, number of images, embedding width, extractor name)."""
    from .features import get_extractor
    from .images import iter_image_batches, read_image_table

    from ..resources import check_image_options

    out = Path(out)
    if out.suffix not in (".parquet", ".npz"):
        raise MediFastError(f"--out {out} must end in .parquet or .npz")
    check_image_options(batch_size, resolution, device)
    if not 32 <= image_size <= 4096:
        raise MediFastError(f"--image-size {image_size} is out of range; use 32..4096 (e.g. 224)")
    table = read_image_table(images)
    ex = get_extractor(extractor, weights=weights, device=device, batch_size=batch_size, encoder=encoder,
                       random_init=random_init, image_size=image_size)
    if notify is not None and getattr(ex, "licence", None):
        notify(f"licence: {ex.licence}")
    batches = iter_image_batches(table["path"], batch_size, resolution)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(table) // batch_size), unit="batch", desc=f"embed ({ex.name})")
    emb = np.concatenate([ex(b) for b in batches])
    save_embeddings(out, table, emb, ex.name)
    return out, len(table), emb.shape[1], ex.name
