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
    # 3. sigma_t (eq. 16)
    variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
    sigma = eta * variance ** 0.5
    # 4. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    direction = (1 - a_prev - sigma ** 2) ** 0.5 * eps
    x_prev = a_prev ** 0.5 * x0 + direction
    if eta > 0:
        x_prev = x_prev + sigma * noise.to(device=x_prev.device, dtype=x_prev.dtype)
    return x_prev


def ddim(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
         *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
         callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM sampling x_T -> x_0 (Song et al. 2021, eq. 12), one ``ddim_step`` per timestep.

    ``noise(i)`` returns the fresh Gaussian noise for step ``i`` (shape of x); only used when
    eta > 0.  ``callback(i, x)`` is called after every step.
    """
    alphas_cumprod = schedule.alphas_cumprod
    final = schedule.final_alpha_cumprod
    n_steps = len(timesteps)
    stride = schedule.num_train_timesteps // n_steps
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(int(t) for t in timesteps):
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
