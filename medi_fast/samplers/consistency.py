"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), the sampler of consistency-distilled students.

A consistency model maps a noisy x_t straight to the end of its probability-flow trajectory: x0 = f(x_t, t).
One step is one model call; with more steps, the x0 of each is noised afresh to the next level and
mapped again:

    x0_i   = f(x_{t_i}, t_i)                                  (the model's x0, schedule.split_output)
    x_{t_{i+1}} = sqrt(alpha_bar_{t_{i+1}}) x0_i + sqrt(1 - alpha_bar_{t_{i+1}}) z_i,   z_i ~ N(0, I)

and the last step's x0 is the sample.  This is diffusers' ``LCMScheduler.step`` for a model whose output
already is the consistency function (its boundary scalings c_skip, c_out are ~1e-7 and ~1 at the levels
a student samples at; medi-fast's students meet the boundary condition at alpha_bar = 1 instead,
docs/distill.md).  Fresh noise makes it stochastic: ``noise(i)`` gives step i's z (shape of x), drawn
from each image's own stream so that an image depends only on its seed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import MediFastError
from ..schedule import Schedule, split_output
from .ddim import check_start


def consistency(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
                *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
                callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """x_T -> x0 in ``len(timesteps)`` consistency steps (``timesteps`` descending).  ``eta`` is not used:
    every step but the last re-noises with ``noise(i)``, which is required when there is more than one step.
    ``callback(i, x)`` after every step; ``start``: the first step to run, x_T being x at ``timesteps[start]``."""
    ts = [int(t) for t in timesteps]
    start = check_start(ts, start)
    if noise is None and len(ts) - start > 1:
        raise MediFastError("the consistency sampler draws fresh noise at every step but the last; pass noise")
    abar = schedule.alphas_cumprod
    x = x_T
    batch = x.shape[0]
    for i in range(start, len(ts)):
        a_t = abar[ts[i]]
        t_batch = torch.full((batch,), ts[i], dtype=torch.long, device=x.device)
        out = denoiser(x, t_batch, cond).to(x.dtype)  # (B, C, H, W)
        x0, _ = split_output(schedule.prediction_type, out, x, a_t ** 0.5, (1 - a_t) ** 0.5)
        if schedule.clip_sample:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        if i == len(ts) - 1:
            x = x0
        else:
            a_next = abar[ts[i + 1]]
            z = noise(i).to(device=x.device, dtype=x.dtype)
            x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * z
        if callback is not None:
            callback(i, x)
    return x
