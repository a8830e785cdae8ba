"""Samplers: pure functions with one signature (DESIGN section 3).

``sampler(denoiser, x_T, timesteps, schedule, cond, *, eta=0.0, noise=None, callback=None)``
A denoiser is any callable ``denoiser(x, t, cond) -> eps`` with ``t`` a per-sample tensor.
"""
from __future__ import annotations

from ..errors import MediFastError, suggest
from .ddim import ddim
from .dpm_solver import dpmpp_2m, dpmpp_2m_clip, multistep_timesteps
from .unipc import unipc, unipc_clip

# name -> sampler function; a new sampler is a new function registered here.
SAMPLERS = {"ddim": ddim, "dpmpp-2m": dpmpp_2m, "unipc": unipc, "dpmpp-2m-clip": dpmpp_2m_clip, "unipc-clip": unipc_clip}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise MediFastError(f"unknown sampler {name!r}{suggest(name, SAMPLERS)}; choose from {', '.join(SAMPLERS)}") from None

# Timestep spacing each sampler uses by default (None: the schedule's own, "leading" as diffusers' DDIM).
DEFAULT_SPACING: dict[str, str | None] = {"ddim": None}
# Solvers whose diffusers scheduler picks its own timesteps (linspace over N+1 points, t=0 dropped).
OWN_TIMESTEPS = {n: multistep_timesteps for n in ("dpmpp-2m", "unipc", "dpmpp-2m-clip", "unipc-clip")}


def timesteps_for(name: str, schedule, steps: int):
    """The inference timesteps a sampler runs with, as diffusers' matching scheduler chooses them."""
    get_sampler(name)
    if name in OWN_TIMESTEPS:
        return OWN_TIMESTEPS[name](schedule, steps, getattr(schedule, "solver_spacing", None) or "linspace")
    return schedule.timesteps(steps, DEFAULT_SPACING.get(name))
