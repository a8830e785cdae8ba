"""DDIM (Song et al. 2021, eq. 12), the published sampler.

Notation map (paper -> code):
    x_t            sample            (B, C, H, W)
    eps_theta      eps               denoiser output (or converted from v / x0: schedule.split_output)
    alpha_bar_t    a_t               schedule.alphas_cumprod[t]
    alpha_bar_prev a_prev            alphas_cumprod[t - T // steps], or 1 at the end
    sigma_t        sigma             eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))

Bit-for-bit the arithmetic of diffusers' ``DDIMScheduler.step`` (float32 scalars, previous timestep
``t - T // steps`` whatever the spacing, optional x0 clipping), so results match the reference.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import MediFastError
from ..schedule import Schedule, split_output


def ddim_step(out: torch.Tensor, x: torch.Tensor, a_t, a_prev, schedule: Schedule, *, eta: float = 0.0,
              noise: torch.Tensor | None = None, use_clipped_model_output: bool = False) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (eq. 12) from the model output ``out`` at x_t.

    ``a_t``, ``a_prev``: alpha_bar at t and at the level the step lands on (1 after the last step);
    scalars, or per-sample tensors broadcastable to x (e.g. (B, 1, 1, 1)).  ``noise`` (shape of x) is
    needed only when eta > 0.  ``use_clipped_model_output`` recomputes eps from the clipped x0, as
    diffusers' option of that name does (progressive distillation needs it, docs/distill.md).
    """
    # 1. alpha_bar_t and its complement
    b_t = 1 - a_t
    # 2. predicted x_0 and eps (diffusers' conversion per prediction_type), x_0 optionally clipped
    x0, eps = split_output(schedule.prediction_type, out, x, a_t ** 0.5, b_t ** 0.5)
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        if use_clipped_model_output:
            eps = (x - a_t ** 0.5 * x0) / b_t ** 0.5
    # 3. sigma_t (eq. 16); only formed for eta > 0: run upwards (``ddim_invert``) its variance is negative
    # and, leaving x_0 (alpha_bar 1), a division by zero
    sigma = 0.0
    if eta > 0:
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        sigma = eta * variance ** 0.5
    # 4. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    direction = (1 - a_prev - sigma ** 2) ** 0.5 * eps
    x_prev = a_prev ** 0.5 * x0 + direction
    if eta > 0:
        x_prev = x_prev + sigma * noise.to(device=x_prev.device, dtype=x_prev.dtype)
    return x_prev


def check_start(timesteps: Sequence[int], start: int) -> int:
    """``start`` as the index of a step of ``timesteps`` (where a sampler begins), else one line."""
    if not 0 <= int(start) < len(timesteps):
        raise MediFastError(f"a sampler cannot start at step {start} of {len(timesteps)}; use 0..{len(timesteps) - 1}")
    return int(start)


def ddim(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
         *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
         callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """DDIM sampling x_T -> x_0 (Song et al. 2021, eq. 12), one ``ddim_step`` per timestep.

    ``noise(i)`` returns the fresh Gaussian noise for step ``i`` (shape of x); only used when
    eta > 0.  ``callback(i, x)`` is called after every step.  ``start``: the first step to run, x_T
    then being x at ``timesteps[start]`` (an SDEdit start, an inverted image); the step size stays that
    of the whole list, as diffusers' img2img pipelines run the tail of ``DDIMScheduler.timesteps``.
    """
    alphas_cumprod = schedule.alphas_cumprod
    final = schedule.final_alpha_cumprod
    n_steps = len(timesteps)
    stride = schedule.num_train_timesteps // n_steps
    start = check_start(timesteps, start)
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(int(t) for t in timesteps):
        if i < start:
            continue
        # the model output at (x_t, t, c): eps, v or x0 (schedule.prediction_type)
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        out = denoiser(x, t_batch, cond).to(x.dtype)  # (B, C, H, W)
        # the previous timestep is t - T // steps whatever the spacing (as diffusers)
        prev_t = t - stride
        a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final
        z = None
        if eta > 0:
            z = noise(i) if noise is not None else torch.randn_like(x)
        x = ddim_step(out, x, alphas_cumprod[t], a_prev, schedule, eta=eta, noise=z)
        if callback is not None:
            callback(i, x)
    return x


def ddim_invert(denoiser, x_0: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
                *, stop: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM inversion x_0 -> x at ``timesteps[stop]``: the deterministic DDIM update (eta 0) run with
    increasing t (Song et al. 2021, sec. 4.3), so that ``ddim(..., start=stop)`` from the result under
    the same ``cond`` returns close to x_0.

    Step ``i`` (from the last step of ``timesteps`` back to ``stop``) undoes DDIM's step ``i``: from the
    level that step lands on (t_i - T // steps, alpha_bar 1 below t = 0) up to t_i.  The exact inverse
    would need the model output at the unknown x_{t_i}; as diffusers' ``DDIMInverseScheduler``, it is
    taken at the known lower point with timestep t_i.  ``callback(i, x)`` after every step.
    """
    alphas_cumprod = schedule.alphas_cumprod
    final = schedule.final_alpha_cumprod
    stride = schedule.num_train_timesteps // len(timesteps)
    stop = check_start(timesteps, stop)
    x = x_0
    batch = x.shape[0]
    for i in range(len(timesteps) - 1, stop - 1, -1):
        t = int(timesteps[i])
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        out = denoiser(x, t_batch, cond).to(x.dtype)  # (B, C, H, W)
        a_low = alphas_cumprod[t - stride] if t - stride >= 0 else final
        # ddim_step's arithmetic with the two levels swapped: x0 and eps from x at a_low, x rebuilt at t
        x = ddim_step(out, x, a_low, alphas_cumprod[t], schedule)
        if callback is not None:
            callback(i, x)
    return x
