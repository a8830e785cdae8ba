"""Sample grids during training: rows = classes, columns = sites (or seeds for a class-only model).

DDIM (eta 0) from the EMA model with a fixed seed, so grids of successive checkpoints are
comparable: the same cell starts from the same noise at every step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medi_fast.conditioning import ConditionSpec
from medi_fast.pixels import to_uint8
from medi_fast.io import atomic_path
from medi_fast.samplers import ddim
from medi_fast.schedule import Schedule


def grid_conditions(spec: ConditionSpec, rows: int, cols: int, site_attr: str = "tss"):
    """(row labels, column labels, cond dict for rows x cols samples in row-major order)."""
    classes = list(spec.class_vocab.names)[:rows]
    sites = None
    if site_attr in spec and spec[site_attr].vocab is not None:
        sites = [s for s in spec[site_attr].vocab.names if s != "Unknown"][:cols]
    values: dict[str, list] = {"class": [c for c in classes for _ in range(cols if sites is None else len(sites))]}
    if sites is not None:
        values[site_attr] = [s for _ in classes for s in sites]
        col_labels = sites
    else:
        col_labels = [f"seed {j}" for j in range(cols)]
    n = len(values["class"])
    cond = spec.encode(values, n)  # other attributes: null (unconditional)
    return classes, col_labels, cond


@torch.no_grad()
def sample_grid(model, spec: ConditionSpec, schedule: Schedule, *, resolution: int, rows: int = 8, cols: int = 8,
                steps: int = 50, seed: int = 0, device="cpu", batch: int = 64) -> tuple[np.ndarray, list, list]:
    """uint8 (rows*R, cols*R, 3) image of the grid, with its row and column labels."""
    classes, col_labels, cond = grid_conditions(spec, rows, cols)
    n = len(cond["class"])
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 3, resolution, resolution, generator=g)  # (N, 3, R, R), independent of `batch`
    ts = schedule.timesteps(steps)
    out = []
    model_dtype = next(model.parameters()).dtype
    for s in range(0, n, batch):
        c = {k: v[s:s + batch].to(device) for k, v in cond.items()}
        x = ddim(lambda x, t, cc: model(x.to(model_dtype), t, cc).float(), x_T[s:s + batch].to(device), ts, schedule, c)
        out.append(torch.from_numpy(to_uint8(x)))  # (B, R, R, 3)
    imgs = torch.cat(out).view(len(classes), len(col_labels), resolution, resolution, 3)
    grid = imgs.permute(0, 2, 1, 3, 4).reshape(len(classes) * resolution, len(col_labels) * resolution, 3)
    return grid.numpy(), classes, col_labels


def save_png(image: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
