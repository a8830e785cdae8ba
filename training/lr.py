"""Learning-rate schedule: linear warm-up, then cosine decay to zero (the published recipe).

The same multiplier as diffusers' ``get_cosine_schedule_with_warmup`` (num_cycles=0.5), which the
reference training script uses, so a run here follows the published curve step for step.
"""
from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup: float) -> int:
    """``warmup`` is a fraction of the run (0.01 = 1 %) or, if >= 1, a number of steps."""
    return int(warmup) if warmup >= 1 else int(round(total_steps * warmup))


def lr_multiplier(step: int, total_steps: int, n_warmup: int) -> float:
    """Multiplier on the base lr before optimiser step ``step`` (0-based)."""
    if step < n_warmup:
        return step / max(1, n_warmup)
    progress = (step - n_warmup) / max(1, total_steps - n_warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state_dict (last_epoch) is all that resume needs."""
    n_warmup = warmup_steps(total_steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, n_warmup))
