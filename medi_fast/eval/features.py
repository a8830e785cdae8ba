"""Feature extractors: ``extractor(images uint8 (B, H, W, 3)) -> float64 (B, D)``, with ``.name``, ``.dim``.

Which is what:

=====================  =====  ==========================================================================
name                   dim    what it is, when to use it
=====================  =====  ==========================================================================
``inception``          2048   the FID network (TF-FID InceptionV3 pool3) with the real weights from a local
                              file.  The only extractor whose distances are "FID" comparable to papers.
``inception-random``   2048   the same network, seeded random weights.  Exercises the FID code path in
                              tests and demos without any download; its numbers are NOT FID.
``colour-texture``     48     hand-made stain colour + texture statistics (no weights at all): per-channel
                              RGB and optical-density moments and quantiles, gradient energy at three
                              scales.  Sensitive to exactly what separates sites (stain) and classes
                              (texture) in the synthetic data; a cheap FID-style distance and probe input
                              for demos.  Not comparable to FID.
``uni``                1024   UNI (ViT-L/16), local weights; the pathology encoders of :mod:`.encoders`:
``uni2-h``             1536   UNI2-h (ViT-H/14, 8 registers, SwiGLU), class token
``virchow2``           2560   Virchow2 (ViT-H/14, 4 registers, SwiGLU), class token ++ mean patch token
``h-optimus-0``        1536   H-optimus-0 (ViT-g/14, 4 registers, SwiGLU), class token
``h-optimus-1``        1536   H-optimus-1 (same architecture), class token
=====================  =====  ==========================================================================
"""
from __future__ import annotations

import numpy as np

from ..errors import MediFastError, suggest
from .encoders import ENCODERS

EXTRACTORS = ("inception", "inception-random", "colour-texture", *ENCODERS)


class ColourTexture:
    """Deterministic colour and texture statistics of uint8 RGB patches (48-d, no weights)."""

    name = "colour-texture"
    dim = 48
    QUANTILES = (0.1, 0.5, 0.9)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64) / 255.0  # (B, H, W, 3)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise MediFastError(f"expected images as uint8 (B, H, W, 3), got shape {tuple(np.shape(images))}")
        b = len(x)
        od = -np.log(np.clip(x, 1 / 255.0, 1.0))  # optical density: stain amount (Beer-Lambert)
        feats = []
        for arr in (x, od):
            flat = arr.reshape(b, -1, 3)  # (B, HW, 3)
            feats += [flat.mean(1), flat.std(1)]
            feats += list(np.quantile(flat, self.QUANTILES, axis=1))  # 3 x (B, 3)
        grey = x.mean(-1)  # (B, H, W)
        for step in (1, 2, 4):  # texture at three scales: mean |gradient| and its spread
            g = grey[:, ::step, ::step]
            gx, gy = np.abs(np.diff(g, axis=2)), np.abs(np.diff(g, axis=1))
            feats.append(np.stack([gx.mean((1, 2)), gy.mean((1, 2)), gx.std((1, 2)), gy.std((1, 2))], 1))
        out = np.concatenate(feats, 1)  # (B, 30 + 12) = 42; pad the rest with cross-channel correlations
        flat = x.reshape(b, -1, 3)
        c = flat - flat.mean(1, keepdims=True)
        s = np.sqrt((c ** 2).mean(1)) + 1e-8  # (B, 3)
        corr = [(c[..., i] * c[..., j]).mean(1) / (s[:, i] * s[:, j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        sat = x.max(-1) - x.min(-1)  # chroma: H&E purple/pink vs background white
        extra = np.stack(corr + [sat.mean((1, 2)), sat.std((1, 2)), (grey > 0.85).mean((1, 2))], 1)
        return np.concatenate([out, extra], 1)  # (B, 48)


def get_extractor(name: str, *, weights=None, device=None, batch_size: int = 50, encoder: str | None = None,
                  random_init: bool = False, image_size: int = 224):
    """Build an extractor by name (see the table above).  For the encoders: ``weights`` (file or Hugging Face
    cache folder; default: the model's folder in the local cache), ``random_init`` (tests and demos only);
    ``encoder``/``image_size`` run UNI's recipe on another timm architecture."""
    if name == "inception":
        from .inception import InceptionExtractor

        return InceptionExtractor(weights, device=device, batch_size=batch_size)
    if name == "inception-random":
        from .inception import InceptionExtractor

        return InceptionExtractor(device=device, batch_size=batch_size, random_init=True)
    if name == "colour-texture":
        return ColourTexture()
    if name == "uni" and (encoder or image_size != 224):
        from .encoders import UNIEncoder

        return UNIEncoder(weights=weights, encoder=encoder, device=device, batch_size=batch_size,
                          image_size=image_size, random_init=random_init)
    if name in ENCODERS:
        from .encoders import Encoder

        return Encoder(name, weights=weights, device=device, batch_size=batch_size, random_init=random_init)
    raise MediFastError(f"unknown feature extractor {name!r}{suggest(name, EXTRACTORS)}; choose one of "
                        f"{', '.join(EXTRACTORS)}")
