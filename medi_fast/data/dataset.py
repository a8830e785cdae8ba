"""A torch Dataset over an index (JPEG decode per item) or a pack (memory-mapped uint8).

``ds[i] -> (uint8 tensor (3, R, R), i)``: the integer lets a trainer look its labels up in
``ds.table`` (row i), so conditioning columns never go through the DataLoader's collate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..errors import MediFastError
from .clinical import read_csv_str
from .imageio import load_patch


class PatchDataset(Dataset):
    """Patches with their metadata rows.

    table       DataFrame of the rows (index columns: class, tissue_source_site, gender, race, ...), 0..N-1
    resolution  side length R of every returned patch
    source      "pack" or "index"
    """

    def __init__(self, table: pd.DataFrame, resolution: int, *, images: np.ndarray | None = None,
                 rows: np.ndarray | None = None, source: str = "index"):
        self.table = table.reset_index(drop=True)
        self.resolution = int(resolution)
        self.source = source
        self._images = images  # (N_pack, 3, R, R) memmap, or None for the JPEG reader
        self._rows = np.arange(len(self.table)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._paths = self.table["path"].tolist() if images is None else None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        i %= len(self)
        if self._images is not None:
            x = np.array(self._images[self._rows[i]])  # copy out of the read-only memmap  # (3, R, R)
        else:
            x = load_patch(self._paths[i], self.resolution).transpose(2, 0, 1).copy()  # (3, R, R)
        return torch.from_numpy(x), i

    def get_batch(self, indices) -> torch.Tensor:
        """uint8 (B, 3, R, R) for dataset positions ``indices`` (one gather from the pack)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._images is not None:
            rows = self._rows[idx]
            order = np.argsort(rows, kind="stable")  # ascending reads are friendlier to the page cache
            out = np.empty((len(idx),) + self._images.shape[1:], np.uint8)
            out[order] = self._images[rows[order]]
            return torch.from_numpy(out)
        return torch.stack([self[int(i)][0] for i in idx])

    def labels(self, column: str) -> list:
        if column not in self.table.columns:
            raise MediFastError(f"dataset has no column {column!r}; columns: {', '.join(self.table.columns)}")
        return self.table[column].tolist()


def rows_in_split(table: pd.DataFrame, split_csv) -> np.ndarray:
    """Positions of the rows of ``table`` whose slide is listed in ``split_csv`` (a train.csv/holdout.csv
    written by `medi-fast data split`); refused when the split names none of them."""
    from ..io import require_file

    split = read_csv_str(require_file(split_csv, "--split file", "give a train.csv/holdout.csv written by "
                                                                 "`medi-fast data split`"))
    if "slide_submitter_id" not in split.columns:
        raise MediFastError(f"{split_csv} has no column 'slide_submitter_id'; pass a train.csv/holdout.csv written "
                            f"by `medi-fast data split`")
    keep = table["slide_submitter_id"].isin(set(split["slide_submitter_id"].str.strip())).to_numpy()
    if not keep.any():
        raise MediFastError(f"no patch of this dataset belongs to a slide in {split_csv}; was the split made from "
                            f"the same metadata?")
    return np.flatnonzero(keep)


def open_dataset(path, split_csv=None, resolution: int | None = None) -> PatchDataset:
    """Open an index parquet (JPEG decode per item) or a pack directory (memmap).

    ``split_csv`` keeps only the rows whose slide_submitter_id is in it.  ``resolution`` must match a
    pack's (packs are resized once); for an index it defaults to the first patch's width.
    """
    from .index import read_index
    from .pack import read_pack

    path = Path(path)
    if path.is_dir():
        meta, images, table = read_pack(path)
        if resolution is not None and int(resolution) != meta["resolution"]:
            raise MediFastError(f"pack {path} is {meta['resolution']} px, not {resolution}; re-pack with "
                                f"`medi-fast data pack ... --resolution {resolution}` or open the index instead")
        rows = np.arange(len(table))
        if split_csv is not None:
            rows = rows_in_split(table, split_csv)
            table = table.iloc[rows]
        return PatchDataset(table, meta["resolution"], images=images, rows=rows, source="pack")
    if not path.exists():
        raise MediFastError(f"{path} does not exist; pass an index .parquet or a pack directory")
    table = read_index(path)
    if split_csv is not None:
        table = table.iloc[rows_in_split(table, split_csv)]
    if resolution is None:
        w = int(table["width"].iloc[0]) if "width" in table.columns else -1
        resolution = w if w > 0 else load_patch(table["path"].iloc[0]).shape[0]
    return PatchDataset(table, resolution, source="index")
