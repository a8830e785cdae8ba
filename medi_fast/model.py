"""MeDiUNet = Conditioner + a stock diffusers ``UNet2DModel(class_embed_type="identity")``.

z_cond from the Conditioner is passed as ``class_labels``; with the identity class embedding the
UNet adds it to the timestep embedding, exactly as the paper describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .conditioning import Conditioner, ConditionSpec
from .errors import MediFastError, suggest


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    # GFLOP per image per UNet call at `resolution` (2 x multiply-accumulates), measured with
    # benchmarks/flops.py; used to report the fraction of the device's matmul rate reached.
    gflop_per_step: float = 0.0

    @property
    def d_t(self) -> int:
        # diffusers' UNet2DModel: time_embed_dim = block_out_channels[0] * 4
        return self.block_out_channels[0] * 4

    def unet_config(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "sample_size": self.resolution,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": self.layers_per_block,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownBlock2D"] * n,
            "up_block_types": ["UpBlock2D"] * n,
            "norm_num_groups": self.norm_num_groups,
            "class_embed_type": "identity",
        }


PRESETS: dict[str, Preset] = {
    # Tests and the demo: 0.27M parameters, ~0.35 s per training step at batch 32 on one CPU core.
    "tiny-32": Preset("tiny-32", 32, (16, 32, 32), 1, 8, gflop_per_step=0.124),
    # The demo's model: wide enough to learn the synthetic patches in a few hundred CPU steps
    # (tiny-32 is not: its samples are still noise at 500 steps), ~1 s per training step at batch 32.
    "demo-32": Preset("demo-32", 32, (32, 64, 64), 1, 8, gflop_per_step=0.489),
    # A CPU-friendly 64 px model.
    "small-64": Preset("small-64", 64, (64, 128, 128, 256), 1, 32, gflop_per_step=8.77),
    # The published MeDi UNet: six DownBlock2D/UpBlock2D levels (attention only in diffusers' default
    # mid block), 415.0M parameters, 291.8 GFLOP per image per step at 128 px.
    "medi-128": Preset("medi-128", 128, (128, 256, 512, 512, 1024, 1024), 2, 32, gflop_per_step=291.8),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise MediFastError(f"unknown preset {name!r}{suggest(name, PRESETS)}; choose from {', '.join(PRESETS)}") from None


class MeDiUNet(nn.Module):
    """eps_theta(x_t, t, c): the conditioned UNet.  forward(sample, timestep, cond) -> eps."""

    def __init__(self, spec: ConditionSpec, unet_config: Mapping):
        super().__init__()
        from diffusers import UNet2DModel

        cfg = dict(unet_config)
        if cfg.get("class_embed_type") != "identity":
            raise MediFastError("MeDiUNet needs class_embed_type='identity' in the UNet config")
        d_t = cfg["block_out_channels"][0] * 4
        if spec.d_t != d_t:
            raise MediFastError(f"conditioning width d_t = {spec.d_t} does not match the UNet's timestep-embedding "
                                f"width {d_t} (block_out_channels[0] * 4); rebuild the ConditionSpec with d_t={d_t}")
        self.spec = spec
        self.unet_config = cfg
        self.conditioner = Conditioner(spec)
        self.unet = UNet2DModel(**cfg)

    @property
    def resolution(self) -> int:
        return int(self.unet_config["sample_size"])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = self.conditioner(cond)  # (B, d_t)
        return self.unet(sample, timestep, class_labels=z, return_dict=False)[0]  # (B, 3, H, W)


def build_model(preset: str | Preset, spec: ConditionSpec | None = None, *, classes=None, metadata=None,
                resolution: int | None = None) -> MeDiUNet:
    """A freshly initialised MeDiUNet from a preset (and a spec, or classes + metadata to build one)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    cfg = p.unet_config()
    if resolution is not None:
        levels = len(p.block_out_channels) - 1
        if not 2 ** levels <= resolution <= 4096:
            raise MediFastError(f"resolution {resolution} is out of range for preset {p.name}; use "
                                f"{2 ** levels}..4096 (e.g. {p.resolution})")
        if resolution % (2 ** levels):
            raise MediFastError(f"resolution {resolution} is not divisible by {2 ** levels} as preset {p.name} needs "
                                f"({levels} downsamplings); use e.g. {p.resolution}")
        cfg["sample_size"] = resolution
    if spec is None:
        spec = ConditionSpec.build(p.d_t, classes, metadata or {})
    return MeDiUNet(spec, cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
