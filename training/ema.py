"""Exponential moving average of the weights, with the warm-up of diffusers' ``EMAModel``.

decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power) with warm-up, else
min(max_decay, (1 + step) / (10 + step)); the first update copies the weights (decay 0).  These are
the reference script's settings (inv_gamma 1, power 3/4, max decay 0.9999), so EMA weights match.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 inv_gamma: float = 1.0, power: float = 0.75):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the averaged copy
        self.max_decay = decay
        self.warmup = warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0

    def decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - 1)
        if step <= 0:
            return 0.0
        if self.warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return min(value, self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * param, for parameters; buffers are copied."""
        self.optimization_step += 1
        d = self.decay(self.optimization_step)
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        # lerp: ema + (1 - d) * (p - ema), one fused kernel per tensor list.
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict:
        return {"optimization_step": self.optimization_step}

    def load_state_dict(self, state: dict) -> None:
        self.optimization_step = int(state["optimization_step"])
