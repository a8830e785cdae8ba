"""``medi-fast embed``: an image set -> one embeddings file (:mod:`.embeddings`) with its metadata columns,
through any extractor of :mod:`.features` (the pathology encoders of :mod:`.encoders` among them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MediFastError
from ..resources import check_image_options
from .embeddings import save_embeddings
from .features import get_extractor
from .images import iter_image_batches, read_image_table


def embed_images(images, out, *, extractor: str = "uni", weights=None, encoder: str | None = None,
                 random_init: bool = False, image_size: int = 224, batch_size: int = 64, resolution: int | None = None,
                 device=None, progress: bool = False, notify=None) -> tuple[Path, int, int, str]:
    """Embed an image set (index parquet, manifest, folder) into ONE file with its metadata columns
    (``medi-fast embed``).  ``extractor``: a registry encoder (``uni``, ``uni2-h``, ``virchow2``,
    ``h-optimus-0``, ``h-optimus-1``) or ``colour-texture``/``inception``/``inception-random``.  ``notify``
    receives the encoder's licence line once, before any image is embedded.
    Returns (path, number of images, embedding width, extractor name)."""
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
