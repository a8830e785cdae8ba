"""Decode one patch to a square uint8 RGB array at a given resolution (antialiased)."""
from __future__ import annotations

import numpy as np

from ..errors import MediFastError


def load_patch(path: str, resolution: int | None = None) -> np.ndarray:
    """``path`` -> uint8 (R, R, 3).  Non-square images are centre-cropped to a square first; the resize
    is Lanczos (antialiased), after a JPEG draft decode at the smallest scale still >= 2x the target."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if resolution is not None and min(w, h) >= 4 * resolution:
                im.draft("RGB", (2 * resolution * w // min(w, h), 2 * resolution * h // min(w, h)))
            im = im.convert("RGB")
            w, h = im.size
            if w != h:
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise MediFastError(f"cannot decode image {path} ({e}); rebuild the index, which lists and excludes "
                            f"undecodable files") from None
