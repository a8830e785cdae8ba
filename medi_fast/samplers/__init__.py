"""Samplers: pure functions with one signature (DESIGN section 3).

``sampler(denoiser, x_T, timesteps, schedule, cond, *, eta=0.0, noise=None, callback=None)``
A denoiser is any callable ``denoiser(x, t, cond) -> eps`` with ``t`` a per-sample tensor.
"""
from __future__ import annotations

from ..errors import MediFastError, suggest
from .ddim import ddim

# name -> sampler function; a new sampler is a new function registered here.
SAMPLERS = {"ddim": ddim}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise MediFastError(f"unknown sampler {name!r}{suggest(name, SAMPLERS)}; choose from {', '.join(SAMPLERS)}") from None
