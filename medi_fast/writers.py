"""Writers: generated images to PNG/JPEG folders in the TCGA-UT layout, or webdataset tar shards.

Every file is written atomically (temporary name, then rename), so a file that exists is whole;
that is what makes an interrupted run resumable: a rerun skips what exists.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .errors import MediFastError
from .io import atomic_path

FORMATS = ("png", "jpeg", "tar")
# Rows per tar shard: large enough for efficient streaming, small enough to lose little on a kill.
TAR_ROWS = 1024


def encode(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 (H, W, 3) -> PNG or JPEG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # level 1: ~3x faster, ~10% larger
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _safe(value) -> str:
    s = "none" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
    return s.replace("/", "_").replace(" ", "_") or "none"


class FolderWriter:
    """DIR/<class>/<first metadata value>/<class>_<meta...>_<index>.<ext>"""

    def __init__(self, out: Path, attributes, fmt: str = "png", quality: int = 95):
        self.out, self.attributes, self.fmt, self.quality = Path(out), tuple(attributes), fmt, quality
        self.ext = "png" if fmt == "png" else "jpg"
        self._root = os.path.realpath(self.out)

    def path(self, row) -> Path:
        """Where ``row``'s image goes; refused unless it resolves inside the output directory.

        Vocabularies refuse names that are not single path components; this second guard keeps a
        model file that slipped past them (or a symbolic link inside the output) from writing elsewhere.
        """
        path = self.out / self.relpath(row)
        if os.path.commonpath([self._root, os.path.realpath(path)]) != self._root:
            raise MediFastError(f"refusing to write {path}: it resolves outside the output directory {self.out} "
                                f"(the model's names or a link inside {self.out} lead there); use a model with safe "
                                f"names and an output directory without such links")
        return path

    def relpath(self, row) -> str:
        vals = [_safe(row[a]) for a in self.attributes]
        folder = "/".join(vals[:2])
        return f"{folder}/{'_'.join(vals)}_{int(row['index']):08d}.{self.ext}"

    def pending(self, rows: pd.DataFrame) -> np.ndarray:
        """Boolean mask of rows whose file does not exist yet."""
        return np.array([not self.path(r).exists() for _, r in rows.iterrows()], dtype=bool)

    def write(self, images: np.ndarray, rows: pd.DataFrame) -> None:
        for img, (_, row) in zip(images, rows.iterrows()):
            data = encode(img, self.fmt, self.quality)
            with atomic_path(self.path(row)) as tmp:
                tmp.write_bytes(data)

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.path(r)).convert("RGB")) for _, r in rows.iterrows()])

    def files(self, rows: pd.DataFrame) -> list[str]:
        return [self.relpath(r) for _, r in rows.iterrows()]


class TarWriter:
    """DIR/shards/shard-<k>.tar with <key>.png + <key>.json per sample (webdataset layout).

    Shard k holds plan rows [k*TAR_ROWS, (k+1)*TAR_ROWS); a shard is written whole or not at all.
    """

    def __init__(self, out: Path, attributes, fmt: str = "tar", quality: int = 95):
        self.out, self.attributes, self.quality = Path(out), tuple(attributes), quality

    @staticmethod
    def shard_of(index) -> np.ndarray:
        return np.asarray(index) // TAR_ROWS

    def shard_path(self, k: int) -> Path:
        return self.out / "shards" / f"shard-{int(k):06d}.tar"

    def pending(self, rows: pd.DataFrame) -> np.ndarray:
        shards = self.shard_of(rows["index"].to_numpy())
        done = {k for k in np.unique(shards) if self.shard_path(k).exists()}
        return np.array([k not in done for k in shards], dtype=bool)

    def files(self, rows: pd.DataFrame) -> list[str]:
        return [f"shards/shard-{int(k):06d}.tar#{int(i):08d}.png"
                for k, i in zip(self.shard_of(rows["index"]), rows["index"])]

    def write(self, images: np.ndarray, rows: pd.DataFrame) -> None:
        """``rows`` must be exactly the (pending) rows of whole shards, in order."""
        shards = self.shard_of(rows["index"].to_numpy())
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            with atomic_path(self.shard_path(k)) as tmp, tarfile.open(tmp, "w") as tar:
                for j in sel:
                    row = rows.iloc[j]
                    key = f"{int(row['index']):08d}"
                    meta = {a: (None if pd.isna(row[a]) else row[a]) for a in self.attributes}
                    meta.update(index=int(row["index"]), seed=int(row["seed"]))
                    for name, data in ((f"{key}.png", encode(images[j], "png")),
                                       (f"{key}.json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

    def read(self, rows: pd.DataFrame) -> np.ndarray:
        out = []
        for k, i in zip(self.shard_of(rows["index"]), rows["index"]):
            with tarfile.open(self.shard_path(k)) as tar:
                out.append(np.asarray(Image.open(tar.extractfile(f"{int(i):08d}.png")).convert("RGB")))
        return np.stack(out)


def make_writer(out, attributes, fmt: str, quality: int = 95):
    if fmt not in FORMATS:
        raise MediFastError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    return (TarWriter if fmt == "tar" else FolderWriter)(out, attributes, fmt, quality)
