"""Model output to pixels and back: the one conversion every image-producing path uses."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as diffusers' pipelines do."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 [-1, 1] (B, C, H, W), the inverse of :func:`to_uint8` (exact on its
    255 levels), as diffusers' image processors normalise an input image."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
