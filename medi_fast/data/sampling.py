"""Sampling weights for a WeightedRandomSampler: uniform, class-balanced, combination-balanced.

Class-balanced is the published trainer's: weight = 1 / (number of patches of the row's class), so
every class is drawn equally often.  Combination-balanced does the same over (class, TSS) pairs (or
any ``columns``), so a rare hospital's patches are not drowned out by a common one's.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import MediFastError

MODES = ("uniform", "class", "combination")


def sampling_weights(table: pd.DataFrame, mode: str = "class",
                     columns=("class", "tissue_source_site")) -> np.ndarray:
    """Per-row weights (float64, summing to 1) for ``mode`` in uniform / class / combination."""
    n = len(table)
    if n == 0:
        raise MediFastError("cannot compute sampling weights of an empty table")
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    if mode == "class":
        cols = ["class"]
    elif mode == "combination":
        cols = list(columns)
    else:
        raise MediFastError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise MediFastError(f"table has no column {missing[0]!r} for {mode}-balanced sampling")
    counts = table.groupby(cols, sort=False, dropna=False)[cols[0]].transform("size").to_numpy(np.float64)
    w = 1.0 / counts
    return w / w.sum()
