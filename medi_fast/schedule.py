"""The DDPM noise schedule and inference timestep spacings, as diffusers computes them.

Every number here follows diffusers' ``DDPMScheduler``/``DDIMScheduler`` (float32 betas, float32
cumulative product), so samples are comparable with the published MeDi models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import MediFastError

SPACINGS = ("leading", "trailing", "linspace")
# What the UNet predicts, spelled as diffusers' ``prediction_type``: the noise (the published models),
# v = alpha eps - sigma x0 (Salimans & Ho 2022; distilled students) or x0 itself.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Schedule:
    # 1000 linear betas 1e-4..0.02 with epsilon prediction: diffusers' DDPMScheduler defaults,
    # which is what the published models were trained with.
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    # diffusers clips the predicted x0 to [-1, 1] by default (clip_sample=True).
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # DDIM's final step uses alpha_bar = 1 (set_alpha_to_one=True in diffusers).
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    # Timestep spacing of the multistep solvers (DPM-Solver++, UniPC).  None: "linspace", the default
    # of a freshly built diffusers solver.  A reference MeDi run builds its DPMSolverMultistepScheduler
    # from the DDPM scheduler_config.json, which carries "leading"; imports set that here.
    solver_spacing: str | None = None
    # A distilled student (``medi-fast distill``) is made for one sampler at one number of steps:
    # generation uses them when the user gives none.  None: any sampler, the generic default steps.
    default_steps: int | None = None
    default_sampler: str | None = None

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise MediFastError(f"unknown beta_schedule {self.beta_schedule!r}; use 'linear' or 'scaled_linear'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise MediFastError(f"prediction_type {self.prediction_type!r} is not supported; use one of "
                                f"{', '.join(PREDICTION_TYPES)}")
        if self.default_steps is not None and not 1 <= int(self.default_steps) <= self.num_train_timesteps:
            raise MediFastError(f"default_steps {self.default_steps} is out of range; use 1..{self.num_train_timesteps}")
        for spacing in (self.timestep_spacing, self.solver_spacing or "linspace"):
            if spacing not in SPACINGS:
                raise MediFastError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")

    @property
    def betas(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 as in diffusers.  # (T,)"""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, num_steps: int, spacing: str | None = None) -> np.ndarray:
        """Inference timesteps, descending, exactly as ``DDIMScheduler.set_timesteps``."""
        n = self.num_train_timesteps
        spacing = spacing or self.timestep_spacing
        if not 1 <= int(num_steps) <= n:
            raise MediFastError(f"--steps must be between 1 and {n}, got {num_steps}")
        if spacing == "leading":
            ratio = n // num_steps
            ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            ratio = n / num_steps
            ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        else:
            raise MediFastError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
        return ts

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.  t: (B,) long."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)  # (B,1,1,1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to output at x_t = add_noise(x0, noise, t), as diffusers' training scripts:
        the noise (epsilon), v = alpha eps - sigma x0 (v_prediction) or x0 itself (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)  # (B,1,1,1)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("solver_spacing", "default_steps", "default_sampler"):
            if d[key] is None:
                del d[key]  # absent = default, so older headers (and their hashes) stay as they were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise MediFastError(f"unknown schedule keys {sorted(unknown)}; the file was written by a newer medi-fast")
        return cls(**d)

    def diffusers_config(self) -> dict:
        """Keyword arguments for diffusers' DDPM/DDIM schedulers giving the same schedule."""
        d = self.to_dict()
        d.pop("timestep_spacing")
        d.pop("solver_spacing", None)
        d.pop("default_steps", None)
        d.pop("default_sampler", None)
        return {**d, "timestep_spacing": self.timestep_spacing}


def split_output(prediction_type: str, output: torch.Tensor, x: torch.Tensor, alpha, sigma):
    """Model output at x_t = alpha x0 + sigma eps -> (x0, eps), as diffusers' schedulers convert it.

    alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t).  The epsilon branch is the exact
    arithmetic the samplers always used (bit-for-bit diffusers'); v and x0 follow
    ``DDIMScheduler.step`` (x0 = alpha x - sigma v, eps = alpha v + sigma x).
    """
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output, alpha * output + sigma * x
    if prediction_type == "sample":
        return output, (x - alpha * output) / sigma
    raise MediFastError(f"prediction_type {prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}")
