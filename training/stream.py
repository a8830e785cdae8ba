"""The index stream: which rows each rank trains on, deterministic from (seed, epoch).

Each epoch draws ``L`` row indices with replacement from the sampling weights (class-balanced by
default, as published) using a generator seeded from (seed, epoch); rank ``r`` of ``W`` takes
positions r, r+W, ... and cuts them into batches.  The position is just (epoch, batch), so resume
recreates the exact stream without storing it, and every rank agrees on it without communication.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from medi_fast.data.sampling import sampling_weights as data_weights


def sampling_weights(table: pd.DataFrame, mode: str = "class", columns: list[str] | None = None) -> np.ndarray:
    """Per-row weights (summing to 1) of the data package's sampler: class-balanced by default, as
    published; ``combination`` balances over ``columns`` (default class x tissue source site)."""
    cols = tuple(columns) if columns else ("class", "tissue_source_site")
    return np.asarray(data_weights(table, mode=mode, columns=cols), dtype=np.float64)


class IndexStream:
    """Batches of row indices for one rank.  Batch ``k`` (counted from the start of the run) is
    row ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``: the position is one integer."""

    def __init__(self, weights: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(weights) == 0:
            raise ValueError("IndexStream needs at least one row")  # the trainer refuses empty data before
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        per_step = batch_size * world_size
        # An epoch is about one pass over the data, at least one global batch.
        self.epoch_len = max(per_step, len(weights) // per_step * per_step)
        self.batches_per_epoch = self.epoch_len // per_step
        self._cache: tuple[int, torch.Tensor] | None = None

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            idx = torch.multinomial(self.weights, self.epoch_len, replacement=True, generator=g)  # (L,)
            mine = idx[self.rank::self.world]  # (L / W,)
            self._cache = (epoch, mine.view(self.batches_per_epoch, self.batch_size))
        return self._cache[1]

    def batch(self, k: int) -> list[int]:
        epoch, b = divmod(k, self.batches_per_epoch)
        return self._epoch_indices(epoch)[b].tolist()

    def iterate(self, start: int = 0):
        """Batches start, start+1, ... forever (a DataLoader batch_sampler)."""
        k = start
        while True:
            yield self.batch(k)
            k += 1
