"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a wrapper around a denoiser.

    eps_hat = eps(x, t, null) + w * (eps(x, t, c) - eps(x, t, null))

w = 1 is the plain conditional model; w = 0 the unconditional one.  Needs a model trained with
conditioning dropout (``medi-fast train --cond-drop p``), so that the null ids were learned.
The conditional and unconditional halves run as one batch of 2B.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .conditioning import ConditionSpec


def classifier_free(denoiser, spec: ConditionSpec, scale: float, drop: tuple[str, ...] | None = None):
    """Return a denoiser applying guidance scale ``scale``; ``drop`` names the attributes set to null
    for the unconditional branch (default: all of them)."""
    drop = tuple(drop) if drop else tuple(spec.names)

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        null = spec.null(b)
        both = {k: torch.cat([v, (null[k] if k in drop else v).to(v.device)]) for k, v in cond.items()}
        eps = denoiser(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, C, H, W)
        eps_c, eps_u = eps[:b], eps[b:]
        return eps_u + scale * (eps_c - eps_u)

    return guided
