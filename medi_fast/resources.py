"""Resource guards: refuse a batch, a plan or a device that cannot work, before anything is allocated
or written, with the largest size that fits (nothing is left for the kernel's out-of-memory killer).

Activation memory is estimated from the UNet's shape alone (no model is built): every resnet of
diffusers' UNet2DModel keeps about eight feature maps of its width per image (norms, activations,
convolutions, the residual), down blocks have ``layers_per_block`` resnets per level and up blocks one
more, on concatenated skips.  ``tests/test_contract.py`` checks the estimate against the feature maps
a traced forward pass actually produces.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MediFastError

# Feature maps per resnet block and image (see the module docstring).
MAPS_PER_RESNET = 8
# Share of the free memory a batch may plan to use: weights, optimiser state, the allocator's slack
# and the data pipeline need the rest.
USABLE = 0.7


def activation_bytes(unet_config: dict, resolution: int | None = None, *, training: bool,
                     bytes_per_value: int = 4) -> int:
    """Estimated activation bytes per image for one UNet call (training: kept for the backward pass;
    inference: an upper bound, every map counted as if alive at once)."""
    res = int(resolution or unet_config["sample_size"])
    channels = list(unet_config["block_out_channels"])
    layers = int(unet_config.get("layers_per_block", 2))
    values = 0
    for level, c in enumerate(channels):
        side = max(1, res >> level)
        area = side * side
        skip = channels[max(level - 1, 0)]
        values += layers * MAPS_PER_RESNET * c * area                  # down resnets
        values += (layers + 1) * MAPS_PER_RESNET * (c + skip) * area   # up resnets on concatenated skips
    bottom = max(1, res >> (len(channels) - 1))
    values += 3 * MAPS_PER_RESNET * channels[-1] * bottom * bottom + (bottom * bottom) ** 2  # mid block, attention
    values += 4 * 3 * res * res  # input, noise, output, loss
    return int(values * bytes_per_value)


def available_bytes(device) -> int | None:
    """Free memory on ``device`` (a torch device or name): the GPU's free memory, or for the CPU the
    smaller of MemAvailable and the cgroup limit's headroom.  None when it cannot be told."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(candidates)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_batch(batch_size: int, per_image: int, device, *, what: str = "--batch-size") -> None:
    """Refuse ``batch_size`` images of ``per_image`` bytes each if they cannot fit on ``device``."""
    free = available_bytes(device)
    if free is None or per_image <= 0:
        return
    need = batch_size * per_image
    if need > USABLE * free:
        fits = int(USABLE * free // per_image)
        fix = f"use {what} {fits} or less" if fits >= 1 else "use a smaller model or resolution, or a larger device"
        raise MediFastError(f"{what} {batch_size} needs about {_gib(need)} of activations, but {device} has "
                            f"{_gib(free)} free; {fix}")


def check_rows(n_rows: int, bytes_per_row: int, *, what: str = "--n") -> None:
    """Refuse a plan (or table) of ``n_rows`` rows that cannot be held in the CPU's memory."""
    free = available_bytes("cpu")
    if free is None:
        return
    if n_rows * bytes_per_row > USABLE * free:
        fits = int(USABLE * free // bytes_per_row)
        raise MediFastError(f"{what}: {n_rows} images do not fit in memory (the plan alone needs about "
                            f"{_gib(n_rows * bytes_per_row)}, {_gib(free)} free); use {what} {fits} or less, "
                            f"or split the job into several runs with different --seed")


def check_device(name: str | None) -> None:
    """Refuse a torch device that does not exist here (``cuda`` without a GPU, ``cuda:3`` of two, a typo)."""
    if name is None or name == "auto":
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise MediFastError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MediFastError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MediFastError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here; use cuda:0 .. "
                                f"cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise MediFastError(f"--device {name}: not available here; use cpu" + (" or cuda" if torch.cuda.is_available() else ""))


def check_image_options(batch_size: int, resolution: int | None = None, device=None) -> None:
    """The options every image-set reader (FID, embeddings) takes: a positive batch, a sane resize, a
    device that exists."""
    if batch_size < 1:
        raise MediFastError(f"--batch-size must be >= 1, got {batch_size}")
    if resolution is not None and not 8 <= resolution <= 4096:
        raise MediFastError(f"--resolution {resolution} is out of range; use 8..4096 (e.g. 128)")
    check_device(device)
