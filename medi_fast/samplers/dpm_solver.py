"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2: multistep second order, data prediction).

Notation map (paper -> code):
    x_{t_i}          x                 (B, C, H, W)
    eps_theta        eps               denoiser output
    x_theta(x_t, t)  x0                data prediction (x - sigma_t eps) / alpha_t
    sigma_i (VE)     sig_ve[i]         sqrt((1 - alpha_bar) / alpha_bar) at t_i; 0 after the last step
    alpha_t, sigma_t alpha, sigma      VP coefficients: alpha = 1 / sqrt(sig_ve^2 + 1), sigma = sig_ve * alpha
    lambda_t         lam               log(alpha_t / sigma_t), the half log-SNR
    h_i              h                 lambda_{t_i} - lambda_{t_{i-1}}
    r_i              r                 h_{i-1} / h_i
    D_i              d0, d1            x0 and its first difference (1 / r)(x0_i - x0_{i-1})

The arithmetic follows diffusers' ``DPMSolverMultistepScheduler`` with its defaults (solver_order=2,
algorithm_type "dpmsolver++", solver_type "midpoint", lower_order_final=True, final_sigmas_type
"zero", thresholding=False, no Karras sigmas): float32 0-d tensors for every coefficient, first order on
the first step (no history yet) and on the last step (sigma = 0 there, so the step returns x0). The
same full loop therefore equals diffusers' to float32 rounding.  Like diffusers, it has no x0 clipping.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import MediFastError
from ..schedule import SPACINGS, Schedule, split_output
from .ddim import check_start


def multistep_timesteps(schedule: Schedule, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """Timesteps of diffusers' multistep solvers (DPM-Solver, UniPC) ``set_timesteps``, descending.

    These differ from DDIM's: "linspace" takes ``num_steps + 1`` points over [0, T-1] and drops the
    last one (t = 0), because the final step integrates down to sigma = 0 instead of evaluating t = 0.
    "linspace" is the default of both diffusers schedulers (and of ``timesteps_for``).
    """
    n = schedule.num_train_timesteps
    num_steps = int(num_steps)
    if not 1 <= num_steps <= n:
        raise MediFastError(f"--steps must be between 1 and {n}, got {num_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = n // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    elif spacing == "trailing":
        ratio = n / num_steps
        ts = np.arange(n, 0, -ratio).round().copy().astype(np.int64) - 1
    else:
        raise MediFastError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    if len(np.unique(ts)) != len(ts):
        # Repeated timesteps give h = 0 and a division by zero in the multistep update.
        raise MediFastError(f"{num_steps} steps repeat timesteps with {spacing!r} spacing; use at most {n // 2} steps")
    return ts


def solver_sigmas(schedule: Schedule, timesteps: Sequence[int]) -> torch.Tensor:
    """VE sigmas sqrt((1 - alpha_bar) / alpha_bar) at each timestep, then 0 (final_sigmas_type "zero").  # (N+1,)"""
    ts = np.asarray([int(t) for t in timesteps], dtype=np.int64)
    if len(ts) == 0:
        raise MediFastError("no timesteps given; use at least 1 step")
    if len(ts) > 1 and not np.all(np.diff(ts) < 0):
        raise MediFastError("solver timesteps must be strictly decreasing; build them with timesteps_for(name, schedule, steps)")
    if ts.min() < 0 or ts.max() >= schedule.num_train_timesteps:
        raise MediFastError(f"timesteps must lie in [0, {schedule.num_train_timesteps - 1}]")
    abar = schedule.alphas_cumprod  # float32, as diffusers
    sig_ve = ((1 - abar) / abar) ** 0.5  # (T,)
    return torch.cat([sig_ve[torch.from_numpy(ts)], torch.zeros(1)])  # (N+1,) float32


def vp_coefficients(sig_ve: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t) from one VE sigma, float32 0-d tensors (lambda = +inf at sigma 0)."""
    alpha = 1 / ((sig_ve ** 2 + 1) ** 0.5)
    sigma = sig_ve * alpha
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def from_start(timesteps: Sequence[int], start: int, callback):
    """What a multistep solver runs when it begins at ``timesteps[start]`` (an SDEdit start, an inverted
    image): the tail of the list (its sigmas end at 0 as the whole list's do, and the order warms up from
    1, as diffusers' img2img pipelines after ``set_begin_index``), with ``callback`` seeing the index of
    each step in the whole list."""
    start = check_start(timesteps, start)
    if start == 0 or callback is None:
        return list(timesteps)[start:], callback
    return list(timesteps)[start:], lambda i, x: callback(i + start, x)


def check_deterministic(name: str, eta: float) -> None:
    if eta != 0:
        raise MediFastError(f"{name} is a deterministic ODE solver and takes no --eta (got {eta}); use --eta 0 or --sampler ddim")


def dpmpp_2m(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
             *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
             callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) sampling x_T -> x_0 (Lu et al. 2022, Algorithm 2), diffusers' defaults (no clipping).

    ``timesteps``: descending, normally ``multistep_timesteps(schedule, n)`` (diffusers' choice).
    Deterministic: ``eta`` must be 0 and ``noise`` is unused.  ``callback(i, x)`` after every step.
    ``start``: the first step to run, x_T then being x at ``timesteps[start]`` (``from_start``).
    """
    check_deterministic("dpmpp-2m", eta)
    timesteps, callback = from_start(timesteps, start, callback)
    return _dpmpp_2m(denoiser, x_T, timesteps, schedule, cond, callback, clip=False)


def dpmpp_2m_clip(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
                  *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
                  callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) with x0 clipped to [-1, 1] (Lu et al. 2022, sec. 5 thresholding), as DDIM's clip_sample.

    Equals diffusers' ``DPMSolverMultistepScheduler(thresholding=True)`` with its default
    ``sample_max_value=1.0``: the dynamic threshold s = clamp(quantile(|x0|), 1, 1) is then always 1.
    """
    check_deterministic("dpmpp-2m-clip", eta)
    timesteps, callback = from_start(timesteps, start, callback)
    return _dpmpp_2m(denoiser, x_T, timesteps, schedule, cond, callback, clip=True)


def clip_x0(x0: torch.Tensor) -> torch.Tensor:
    """diffusers' ``_threshold_sample`` at sample_max_value=1: plain clipping to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def data_prediction(denoiser, x: torch.Tensor, t: int, sig_ve: torch.Tensor, cond: dict, clip: bool,
                    prediction_type: str = "epsilon"):
    """One model call at (x, t): eps_theta -> x0 = (x - sigma_s eps) / alpha_s (v: alpha_s x - sigma_s v;
    x0 as it is), clipped to [-1, 1] if asked, as diffusers' ``convert_model_output``.
    Returns (x0, alpha_s, sigma_s, lambda_s); sig_ve is the VE sigma of t."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = denoiser(x, t_batch, cond).to(x.dtype)  # (B, C, H, W)
    alpha_s, sigma_s, lam_s = vp_coefficients(sig_ve)
    x0 = split_output(prediction_type, out, x, alpha_s, sigma_s)[0]  # (B, C, H, W)
    return (clip_x0(x0) if clip else x0), alpha_s, sigma_s, lam_s


def _dpmpp_2m(denoiser, x_T, timesteps, schedule, cond, callback, *, clip: bool) -> torch.Tensor:
    sig_ve = solver_sigmas(schedule, timesteps)  # (N+1,)
    n_steps = len(sig_ve) - 1
    x = x_T
    x0_prev = None  # x0 of the previous step: the multistep history
    for i, t in enumerate(int(t) for t in timesteps):
        # 1. eps_theta(x_{t_i}, t_i, c) -> data prediction x0 = (x - sigma_s eps) / alpha_s
        x0, alpha_s, sigma_s, lam_s = data_prediction(denoiser, x, t, sig_ve[i], cond, clip, schedule.prediction_type)
        # 2. step size in half log-SNR: h = lambda_t - lambda_s (t = the next, less noisy time)
        alpha_t, sigma_t, lam_t = vp_coefficients(sig_ve[i + 1])
        h = lam_t - lam_s
        x32 = x.to(torch.float32)  # diffusers upcasts the sample for the update
        if x0_prev is None or i == n_steps - 1:
            # 3a. first order (DDIM-equivalent): on the first step and the last (lower_order_final)
            x_next = (sigma_t / sigma_s) * x32 - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            # 3b. second order, midpoint form: D = x0 + 1/(2r) (x0 - x0_prev)
            _, _, lam_prev = vp_coefficients(sig_ve[i - 1])
            r = (lam_s - lam_prev) / h
            d0, d1 = x0, (1.0 / r) * (x0 - x0_prev)
            x_next = ((sigma_t / sigma_s) * x32 - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        x0_prev = x0
        x = x_next.to(x.dtype)  # the dtype the model sees (eps was cast to it)
        if callback is not None:
            callback(i, x)
    return x
