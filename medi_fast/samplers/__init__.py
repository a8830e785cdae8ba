"""Samplers: pure functions with one signature (docs/architecture.md).

``sampler(denoiser, x_T, timesteps, schedule, cond, *, eta=0.0, noise=None, callback=None, start=0)``
A denoiser is any callable ``denoiser(x, t, cond) -> eps`` with ``t`` a per-sample tensor.  ``start``
runs the steps from ``timesteps[start]`` on, from x at that timestep (``medi-fast edit``: SDEdit, or an
image encoded by ``ddim_invert``).

One registry entry per sampler says everything the rest of the package needs to know about it
(the function, how its timesteps are chosen, whether it takes ``eta``); a new sampler is one
``register_sampler`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import MediFastError, suggest
from .consistency import consistency
from .ddim import ddim, ddim_invert
from .dpm_solver import dpmpp_2m, dpmpp_2m_clip, multistep_timesteps
from .unipc import unipc, unipc_clip


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    fn: Callable
    # Timestep spacing when the sampler uses the schedule's grid (None: the schedule's own,
    # "leading" as diffusers' DDIM).  Ignored when ``own_timesteps`` is set.
    spacing: str | None = None
    # ``own_timesteps(schedule, steps, spacing)``: solvers whose diffusers scheduler picks its own
    # timesteps (by default linspace over N+1 points, t=0 dropped; ``Schedule.solver_spacing`` overrides).
    own_timesteps: Callable | None = None
    # Stochastic samplers take eta > 0 (and a noise stream); ODE solvers are deterministic.
    takes_eta: bool = False
    # Draws fresh noise at every step whatever eta (the consistency sampler): always given a noise stream.
    stochastic: bool = False
    description: str = ""

    def timesteps(self, schedule, steps: int):
        """The inference timesteps this sampler runs with, as diffusers' matching scheduler chooses them."""
        if self.own_timesteps is not None:  # a schedule imported from a reference run may fix the spacing
            return self.own_timesteps(schedule, steps, getattr(schedule, "solver_spacing", None) or "linspace")
        return schedule.timesteps(steps, self.spacing)


SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(name: str, fn: Callable, **fields) -> SamplerEntry:
    SAMPLERS[name] = entry = SamplerEntry(name, fn, **fields)
    return entry


register_sampler("ddim", ddim, takes_eta=True, description="DDIM (eta 0: deterministic; the published protocol)")
register_sampler("dpmpp-2m", dpmpp_2m, own_timesteps=multistep_timesteps, description="DPM-Solver++(2M)")
register_sampler("unipc", unipc, own_timesteps=multistep_timesteps, description="UniPC (bh2)")
register_sampler("dpmpp-2m-clip", dpmpp_2m_clip, own_timesteps=multistep_timesteps,
                 description="DPM-Solver++(2M) with x0 clipped to [-1, 1]")
register_sampler("unipc-clip", unipc_clip, own_timesteps=multistep_timesteps,
                 description="UniPC (bh2) with x0 clipped to [-1, 1]")
register_sampler("consistency", consistency, spacing="trailing", stochastic=True,
                 description="multistep consistency sampling (consistency-distilled students: fresh noise each step)")


def needs_noise(name: str, eta: float) -> bool:
    """Whether a run of sampler ``name`` at ``eta`` draws fresh noise after x_T (and needs a noise stream)."""
    return eta > 0 or sampler_entry(name).stochastic


def sampler_entry(name: str) -> SamplerEntry:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise MediFastError(f"unknown sampler {name!r}{suggest(name, SAMPLERS)}; choose from {', '.join(SAMPLERS)}") from None


def get_sampler(name: str) -> Callable:
    return sampler_entry(name).fn


def timesteps_for(name: str, schedule, steps: int):
    """The inference timesteps a sampler runs with, as diffusers' matching scheduler chooses them."""
    return sampler_entry(name).timesteps(schedule, steps)
