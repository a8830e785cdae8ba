"""From a patch dataset to training inputs: the ConditionSpec built from the training rows, per-row
condition ids, and uint8 batches.

Vocabularies come from the TRAINING rows only: classes sorted (as the reference code), metadata in
order of first appearance, codes as strings ("05" is not 5).  Missing categorical values become
the value "Unknown" (the reference code's convention); missing ages become the null embedding.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from medi_fast.conditioning import CONTINUOUS_ATTRIBUTES, ConditionSpec, column_for
from medi_fast.data.clinical import normalise_missing
from medi_fast.errors import MediFastError



class MemoryPatches(torch.utils.data.Dataset):
    """An in-memory PatchDataset (same interface as ``medi_fast.data``): for tests and notebooks.

    images: uint8 (N, 3, H, W); table: one row per image with class and metadata columns.
    """

    def __init__(self, images: torch.Tensor, table: pd.DataFrame):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(table)
        self.images, self.table = images, table.reset_index(drop=True)
        self.resolution = int(images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i

    def get_batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices)]  # (B, 3, H, W) uint8


def open_training_data(path: str, split: str | None, resolution: int | None):
    """The data package's PatchDataset for an index or pack (optionally restricted to a split CSV)."""
    if not path:
        raise MediFastError("no training data given; pass --data INDEX_OR_PACK (build one with `medi-fast data`)")
    from medi_fast.data.dataset import open_dataset

    ds = open_dataset(path, split_csv=split, resolution=resolution)
    require_rows(len(ds), split or path)
    return ds


def require_rows(n: int, source=None) -> None:
    """The one refusal of empty training data."""
    if n == 0:
        where = f" ({source} selects no patches)" if source else ""
        raise MediFastError(f"the training split is empty{where}; check --split and --data")


def _categorical_values(series: pd.Series) -> list[str]:
    return normalise_missing(series.tolist())


def build_spec(table: pd.DataFrame, attributes: list[str], d_t: int) -> ConditionSpec:
    """ConditionSpec from the training rows; a missing column fails naming the available ones."""
    require_rows(len(table))
    for name in attributes:
        col = column_for(name)
        if col not in table.columns:
            cols = ", ".join(sorted(c for c in table.columns if not c.startswith("_")))
            raise MediFastError(f"--condition {name}: column {col!r} is not in the training metadata "
                                f"(columns: {cols}); pick one of those or add it to the index")
    classes = sorted(set(_categorical_values(table["class"])))
    metadata: dict[str, list[str] | None] = {}
    for name in attributes[1:]:
        col = table[column_for(name)]
        if name in CONTINUOUS_ATTRIBUTES:
            metadata[name] = None
        else:
            metadata[name] = list(dict.fromkeys(_categorical_values(col)))
    return ConditionSpec.build(d_t, classes, metadata)


def condition_table(spec: ConditionSpec, table: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Per-row condition inputs for the whole table in ``spec``'s vocabularies: {name: (N,) long ids |
    float values}.  A table without one of the spec's columns, or with a value its vocabulary lacks (data
    other than the model was trained on, e.g. when distilling a teacher), is refused."""
    out = {}
    for a in spec.attributes:
        name = column_for(a.name)
        if name not in table.columns:
            raise MediFastError(f"the data has no column {name!r} that the model is conditioned on; pass the "
                                f"--data/--split it was trained on")
        col = table[name]
        if a.vocab is not None:
            index = {n: i for i, n in enumerate(a.vocab.names)}
            values = _categorical_values(col)
            unknown = sorted({v for v in values if v not in index})
            if unknown:
                raise MediFastError(f"the data has {a.name} values the model never saw ({', '.join(unknown[:5])}); "
                                    f"pass the --data/--split it was trained on")
            out[a.name] = torch.tensor([index[v] for v in values], dtype=torch.long)
        else:
            out[a.name] = torch.tensor(pd.to_numeric(col, errors="coerce").to_numpy(np.float32), dtype=torch.float32)
    return out


def drop_conditions(cond: dict[str, torch.Tensor], spec: ConditionSpec, p: float, g: torch.Generator) -> dict:
    """Replace each attribute of each sample by its null input with probability p (for CFG)."""
    if p <= 0:
        return cond
    out = {}
    for a in spec.attributes:
        v = cond[a.name]
        drop = torch.rand(v.shape, generator=g, device=g.device) < p  # (B,)
        null = torch.full_like(v, a.null_id) if a.vocab is not None else torch.full_like(v, math.nan)
        out[a.name] = torch.where(drop.to(v.device), null, v)
    return out


def load_batch(ds, indices: list[int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) for the given rows (the dataset's fast path when it has one)."""
    if hasattr(ds, "get_batch"):
        return torch.as_tensor(ds.get_batch(indices))
    return torch.stack([torch.as_tensor(ds[i][0]) for i in indices])


class Batches:
    """Yields (indices, uint8 images) for consecutive stream batches; a DataLoader when workers > 0."""

    def __init__(self, ds, stream, start: int, workers: int, pin: bool):
        self.ds, self.stream, self.start, self.workers, self.pin = ds, stream, start, workers, pin

    def __iter__(self):
        if self.workers == 0:
            for idx in self.stream.iterate(self.start):
                yield idx, load_batch(self.ds, idx)
            return
        if hasattr(self.ds, "get_batch"):  # one gather per batch in the worker (packs: one memmap read)
            loader = torch.utils.data.DataLoader(_BatchView(self.ds), sampler=_Sampler(self.stream, self.start),
                                                 batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                                                 prefetch_factor=4)
            for images, idx in loader:
                yield list(idx), images
            return
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=_Sampler(self.stream, self.start),
                                             num_workers=self.workers, pin_memory=self.pin, prefetch_factor=4)
        for images, idx in loader:
            yield idx.tolist(), images


class _BatchView(torch.utils.data.Dataset):
    """view[list of rows] -> (uint8 (B, 3, H, W), rows): lets DataLoader workers call get_batch."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, indices):
        return torch.as_tensor(self.ds.get_batch(indices)), list(indices)


class _Sampler:
    def __init__(self, stream, start):
        self.stream, self.start = stream, start

    def __iter__(self):
        return self.stream.iterate(self.start)
