"""Read the image sets evaluation works on, whatever wrote them, as one table.

Three inputs are accepted everywhere an evaluation command asks for images:

* an index parquet from ``medi-fast data index`` (absolute ``path`` + class and metadata columns);
* a ``manifest.csv`` written by ``medi-fast generate`` (``file`` relative to the manifest's folder,
  ``class``, one column per metadata attribute, seed, ...), or the folder holding it; ``file`` may
  point inside a tar shard (``shards/shard-000000.tar#00000012.png``);
* a plain folder of images, class = first folder level (``DIR/<class>/.../*.png``).

The result always has an absolute ``path`` column and a ``class`` column (canonical project codes).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import MediFastError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _canon(name: str) -> str:
    from ..vocab import canonical_class

    try:
        return canonical_class(str(name))
    except Exception:  # a folder that is not a TCGA class (e.g. synthetic "A"): keep the name as is
        return str(name)


def _from_manifest(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise MediFastError(f"cannot read manifest {path} ({type(e).__name__}); regenerate it with "
                            f"`medi-fast generate --out DIR`") from None
    if "file" not in df.columns or "class" not in df.columns:
        raise MediFastError(f"{path} is not a medi-fast manifest (needs columns 'file' and 'class'); pass the "
                            f"manifest.csv written by `medi-fast generate` or a folder of images")
    root = path.parent.resolve()
    df.insert(0, "path", [str(root / f) for f in df["file"]])
    if "age_at_index" in df.columns:
        df["age_at_index"] = pd.to_numeric(df["age_at_index"], errors="coerce")
    return df


def _from_folder(root: Path) -> pd.DataFrame:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = [p for p in files if len(p.relative_to(root).parts) >= 2]  # class = first folder level
    if not files:
        raise MediFastError(f"no images under {root}/<class>/...; pass an index parquet, a manifest.csv, or a "
                            f"folder whose first level is the class")
    return pd.DataFrame({"path": [str(p.resolve()) for p in files],
                         "class": [_canon(p.relative_to(root).parts[0]) for p in files]})


def read_image_table(path) -> pd.DataFrame:
    """Index parquet, manifest.csv (or its folder), or folder of images -> DataFrame(path, class, ...)."""
    path = Path(path)
    if not path.exists():
        raise MediFastError(f"{path} does not exist; pass an index parquet (`medi-fast data index`), a "
                            f"manifest.csv (`medi-fast generate`) or a folder of images")
    if path.is_dir():
        df = _from_manifest(path / "manifest.csv") if (path / "manifest.csv").is_file() else _from_folder(path)
    elif path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise MediFastError(f"cannot read {path} as parquet ({type(e).__name__}); rebuild it with "
                                f"`medi-fast data index`") from None
        if "path" not in df.columns or "class" not in df.columns:
            raise MediFastError(f"{path} has no 'path'/'class' columns; pass an index from `medi-fast data index`")
        df = df.copy()
        df["path"] = [str(Path(p).resolve()) for p in df["path"]]
    elif path.suffix == ".csv":
        df = _from_manifest(path)
    else:
        raise MediFastError(f"cannot tell what {path} is; pass an index .parquet, a manifest.csv or a folder")
    df["class"] = [_canon(c) for c in df["class"]]
    if "tissue_source_site" in df.columns:
        df["tissue_source_site"] = df["tissue_source_site"].astype(str)
    return df.reset_index(drop=True)


def load_image(path: str, resolution: int | None = None) -> np.ndarray:
    """One image -> uint8 (H, W, 3); ``a.tar#member`` reads a member of a tar shard."""
    from PIL import Image

    if "#" in path and path.split("#", 1)[0].endswith(".tar"):
        tar_path, member = path.split("#", 1)
        try:
            with tarfile.open(tar_path) as tar:
                data = tar.extractfile(member).read()
        except (OSError, KeyError, AttributeError, tarfile.TarError) as e:
            raise MediFastError(f"cannot read {member} from {tar_path} ({e}); regenerate that shard") from None
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if resolution is not None and img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)
    from ..data.imageio import load_patch

    return load_patch(path, resolution)


def iter_image_batches(paths, batch_size: int = 64, resolution: int | None = None) -> Iterator[np.ndarray]:
    """Decode images in batches: uint8 (B, H, W, 3); never the whole set in memory.  Images of a batch
    must share a size, so pass ``resolution`` when they do not."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    with ThreadPoolExecutor(4) as pool:  # PIL releases the GIL while decoding
        for i in range(0, len(paths), batch_size):
            imgs = list(pool.map(lambda p: load_image(p, resolution), paths[i:i + batch_size]))
            if len({im.shape for im in imgs}) > 1:
                raise MediFastError(f"images of different sizes near {paths[i]}; pass --resolution to resize them "
                                    f"to one size")
            yield np.stack(imgs)  # (B, H, W, 3) uint8
