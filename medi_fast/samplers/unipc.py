"""UniPC (Zhao et al. 2023, Algorithm 2: UniP-p predictor + UniC-p corrector, B(h) = e^h - 1 "bh2").

Notation map (paper -> code):
    x_{t_i}            x                   (B, C, H, W)
    x_theta(x_t, t)    m                   data prediction (x - sigma_t eps) / alpha_t
    alpha_t, sigma_t   alpha, sigma        VP coefficients from the VE sigma (see dpm_solver.py)
    lambda_t           lam                 log(alpha_t / sigma_t)
    h_i                h                   lambda_{t_i} - lambda_{t_{i-1}}; hh = -h (data prediction)
    r_k                rk                  (lambda_{s_k} - lambda_{s_0}) / h, the history's relative steps
    D_k                d1                  (m_k - m_0) / r_k
    B(h)               b_h                 expm1(hh) ("bh2")
    R_p(h), g_p(h)     R, b                the order conditions R rho = g / B(h)
    rho^p, rho^c       rho_p, rho_c        predictor / corrector weights

Configured as diffusers' ``UniPCMultistepScheduler`` defaults (solver_order=2, predict_x0=True,
solver_type "bh2", lower_order_final=True, disable_corrector=[], final_sigmas_type "zero",
thresholding=False, linspace timesteps): every step i > 0 first corrects x_{t_i} with UniC using the
model output at the uncorrected x_{t_i} (no extra evaluation), then predicts x_{t_{i+1}} with UniP.
Order warms up (1 on the first step) and drops to 1 on the last step, where sigma = 0 returns x0.
The arithmetic mirrors diffusers' (float32 0-d coefficients, the same solve), so a full loop equals it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..schedule import Schedule
from .dpm_solver import check_deterministic, data_prediction, from_start, solver_sigmas, vp_coefficients

SOLVER_ORDER = 2  # diffusers' default and the UniPC paper's recommendation for unconditional pixel models


def _bh_conditions(h: torch.Tensor, rks: list[torch.Tensor], order: int):
    """hh, h*phi_1(hh), B(h), R (order x order) and g / B(h) (order,) of UniPC's order conditions."""
    rks = torch.stack(rks + [torch.ones(())])  # (order,) the last node is r = 1 (the new point)
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)  # "bh2"
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return hh, h_phi_1, b_h, torch.stack(R), torch.stack(b)


def _history(sig_ve: torch.Tensor, i_s0: int, lam_s0: torch.Tensor, h: torch.Tensor,
             m0: torch.Tensor, older: list[torch.Tensor]):
    """r_k and D_k for the older data predictions (m at t_{i_s0 - k}, k = 1..)."""
    rks, d1s = [], []
    for k, mk in enumerate(older, start=1):
        _, _, lam_k = vp_coefficients(sig_ve[i_s0 - k])
        rk = (lam_k - lam_s0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)  # (B, C, H, W)
    return rks, d1s


def _uni_p(x: torch.Tensor, sig_ve: torch.Tensor, i: int, hist: list[torch.Tensor], order: int) -> torch.Tensor:
    """UniP-p: predict x_{t_{i+1}} from x_{t_i} and the data predictions hist = [..., m_{i-1}, m_i]."""
    alpha_t, sigma_t, lam_t = vp_coefficients(sig_ve[i + 1])
    _, sigma_s0, lam_s0 = vp_coefficients(sig_ve[i])
    h = lam_t - lam_s0
    m0 = hist[-1]
    older = hist[-order:-1][::-1] if order > 1 else []  # m_{i-1}, m_{i-2}, ...
    rks, d1s = _history(sig_ve, i, lam_s0, h, m0, older)
    _, h_phi_1, b_h, _, _ = _bh_conditions(h, rks, order)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0  # the first-order (DDIM) part
    if d1s:
        # order 2: rho_p = 1/2 (diffusers' simplification; the general case solves R[:-1, :-1])
        rho_p = torch.ones(1, dtype=x.dtype) * 0.5
        pred_res = rho_p[0] * d1s[0]
        x_t = x_t - alpha_t * b_h * pred_res
    return x_t.to(x.dtype)


def _uni_c(m_t: torch.Tensor, x_prev: torch.Tensor, sig_ve: torch.Tensor, i: int,
           hist: list[torch.Tensor], order: int) -> torch.Tensor:
    """UniC-p: correct x_{t_i} using m_t (the model at the predicted x_{t_i}) and hist up to m_{i-1}."""
    alpha_t, sigma_t, lam_t = vp_coefficients(sig_ve[i])
    _, sigma_s0, lam_s0 = vp_coefficients(sig_ve[i - 1])
    h = lam_t - lam_s0
    m0 = hist[-1]
    older = hist[-order:-1][::-1] if order > 1 else []
    rks, d1s = _history(sig_ve, i - 1, lam_s0, h, m0, older)
    _, h_phi_1, b_h, R, b = _bh_conditions(h, rks, order)
    rho_c = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(R, b)  # (order,)
    rho_c = rho_c.to(x_prev.dtype)
    x_t = sigma_t / sigma_s0 * x_prev - alpha_t * h_phi_1 * m0
    corr_res = 0
    for rho, d1 in zip(rho_c[:-1], d1s):
        corr_res = corr_res + rho * d1
    d1_t = m_t - m0
    x_t = x_t - alpha_t * b_h * (corr_res + rho_c[-1] * d1_t)
    return x_t.to(x_prev.dtype)


def unipc(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
          *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
          callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """UniPC-2 (bh2) sampling x_T -> x_0 (Zhao et al. 2023, Algorithm 2), one model call per step.

    ``timesteps``: descending, normally ``multistep_timesteps(schedule, n)`` (diffusers' choice).
    Deterministic: ``eta`` must be 0 and ``noise`` is unused.  ``callback(i, x)`` after every step
    (x is the predicted x_{t_{i+1}}, before its correction at step i + 1).  ``start``: the first step
    to run, x_T then being x at ``timesteps[start]`` (``dpm_solver.from_start``).
    """
    check_deterministic("unipc", eta)
    timesteps, callback = from_start(timesteps, start, callback)
    return _unipc(denoiser, x_T, timesteps, schedule, cond, callback, clip=False)


def unipc_clip(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, cond: dict,
               *, eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None,
               callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """UniPC-2 (bh2) with x0 clipped to [-1, 1], as DDIM's clip_sample.

    Equals diffusers' ``UniPCMultistepScheduler(thresholding=True)`` with its default
    ``sample_max_value=1.0`` (the dynamic threshold is then always 1: plain clipping).
    """
    check_deterministic("unipc-clip", eta)
    timesteps, callback = from_start(timesteps, start, callback)
    return _unipc(denoiser, x_T, timesteps, schedule, cond, callback, clip=True)


def _unipc(denoiser, x_T, timesteps, schedule, cond, callback, *, clip: bool) -> torch.Tensor:
    sig_ve = solver_sigmas(schedule, timesteps)  # (N+1,)
    n_steps = len(sig_ve) - 1
    x = x_T
    hist: list[torch.Tensor] = []  # data predictions m_{i-1}, m_i (the last SOLVER_ORDER)
    x_prev, prev_order = None, 0  # the corrected x_{t_{i-1}} and the order used to leave it
    for i, t in enumerate(int(t) for t in timesteps):
        # 1. eps_theta(x_{t_i}, t_i, c) -> data prediction m_i at the (uncorrected) x_{t_i}
        m = data_prediction(denoiser, x, t, sig_ve[i], cond, clip, schedule.prediction_type)[0]
        # 2. UniC: correct x_{t_i} with the new evaluation (same order as the step that produced it)
        if i > 0:
            x = _uni_c(m, x_prev, sig_ve, i, hist, prev_order)
        hist = (hist + [m])[-SOLVER_ORDER:]
        # 3. order: warm up from 1, and 1 on the last step (lower_order_final)
        order = min(SOLVER_ORDER, n_steps - i, i + 1)
        # 4. UniP: predict x_{t_{i+1}}
        x_prev, prev_order = x, order
        x = _uni_p(x, sig_ve, i, hist, order)
        if callback is not None:
            callback(i, x)
    return x
