"""The patch index: one row per patch of a TCGA-UT folder, joined with GDC clinical metadata.

Layout: ``ROOT/<cancer type folder>/<slide_submitter_id>/*.jpg``, the folder being a long TCGA name
(``Lung_adenocarcinoma``) or a project code (``LUAD``).  ``path`` in the index is **absolute**, so an
index can be used from any working directory (move the data -> rebuild the index).

Problems never pass silently: undecodable images are listed and excluded (``strict`` fails
instead), slides without a metadata row are counted and listed (their patches are excluded: without
metadata they have no gender/race/age), and a folder whose class disagrees with the metadata's
project_id is listed (the metadata wins).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MediFastError
from ..vocab import canonical_class
from .clinical import normalise_clinical, read_csv_str

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The columns every index has, in this order; ground-truth columns of synthetic data (gt_*) follow.
INDEX_COLUMNS = ("path", "class", "project_id", "slide_submitter_id", "case_submitter_id", "tissue_source_site",
                 "gender", "race", "age_at_index", "width", "height")


@dataclass
class IndexProblems:
    """What was excluded from the index, and why."""

    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    slides_without_metadata: list[str] = field(default_factory=list)
    patches_without_metadata: int = 0
    class_mismatch: list[tuple[str, str, str]] = field(default_factory=list)  # (slide, folder class, metadata class)

    def table(self) -> pd.DataFrame:
        rows = [{"problem": "undecodable", "item": p, "detail": e} for p, e in self.undecodable]
        rows += [{"problem": "no_metadata", "item": s, "detail": "slide not in the metadata CSV; excluded"}
                 for s in self.slides_without_metadata]
        rows += [{"problem": "class_mismatch", "item": s, "detail": f"folder says {a}, metadata says {b}; "
                  f"metadata used"} for s, a, b in self.class_mismatch]
        return pd.DataFrame(rows, columns=["problem", "item", "detail"])

    def summary(self) -> str:
        return (f"{len(self.undecodable)} undecodable images excluded, {len(self.slides_without_metadata)} slides "
                f"({self.patches_without_metadata} patches) without metadata excluded, "
                f"{len(self.class_mismatch)} slides whose folder disagrees with project_id")


def scan(root) -> pd.DataFrame:
    """Every image under ``root/<class folder>/<slide>/``: columns path, folder, slide_submitter_id."""
    root = Path(root)
    if not root.is_dir():
        raise MediFastError(f"data root {root} does not exist or is not a directory; pass the folder that holds "
                            f"<cancer type>/<slide_submitter_id>/*.jpg")
    rows = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for sdir in sorted(p for p in cdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            with os.scandir(sdir) as it:
                names = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
                               and not e.name.startswith("."))
            rows += [(str((sdir / n).resolve()), cdir.name, sdir.name) for n in names]
    if not rows:
        raise MediFastError(f"no images (*.jpg, *.png) found under {root}/<cancer type>/<slide_submitter_id>/; "
                            f"check the path and the layout")
    return pd.DataFrame(rows, columns=["path", "folder", "slide_submitter_id"])


def _probe(path: str) -> tuple[int, int, str | None]:
    """Decode ``path`` fully (at reduced scale for JPEG: same entropy decoding, cheaper IDCT)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size[0], size[1], None
    except Exception as e:  # PIL raises many types for corrupt files; all mean "cannot decode"
        return 0, 0, f"{type(e).__name__}: {e}"


def decoder_threads(workers: int | None) -> int:
    """--workers, or 2 x CPU cores (at most 8) when not given; 0 or fewer is refused, not defaulted."""
    if workers is None:
        return min(8, (os.cpu_count() or 2) * 2)
    if workers < 1 or workers > 256:
        raise MediFastError(f"--workers must be in 1..256 decoder threads, got {workers}; omit it for the default")
    return int(workers)


def build_index_with_problems(root, metadata_csv, strict: bool = False, verify: bool = True,
                              workers: int | None = None) -> tuple[pd.DataFrame, IndexProblems]:
    """:func:`build_index` that also returns what it excluded."""
    decoder_threads(workers)  # refuse a bad --workers before any work
    meta_raw = metadata_csv if isinstance(metadata_csv, pd.DataFrame) else read_csv_str(metadata_csv)
    meta = normalise_clinical(meta_raw, source=str(metadata_csv) if not isinstance(metadata_csv, pd.DataFrame)
                              else "metadata")
    meta = meta.drop_duplicates("slide_submitter_id", keep="first")
    files = scan(root)
    problems = IndexProblems()

    if verify:
        with ThreadPoolExecutor(decoder_threads(workers)) as ex:
            probed = list(ex.map(_probe, files["path"], chunksize=64))
        files["width"] = np.array([p[0] for p in probed], dtype=np.int32)
        files["height"] = np.array([p[1] for p in probed], dtype=np.int32)
        bad = [(path, p[2]) for path, p in zip(files["path"], probed) if p[2] is not None]
        if bad:
            if strict:
                raise MediFastError(f"{len(bad)} undecodable images, e.g. {bad[0][0]} ({bad[0][1]}); remove or "
                                    f"replace them, or drop --strict to exclude them")
            problems.undecodable = bad
            files = files[[p[2] is None for p in probed]]
    else:
        files["width"] = -1
        files["height"] = -1

    known = set(meta["slide_submitter_id"])
    has_meta = files["slide_submitter_id"].isin(known)
    if not has_meta.all():
        missing = files.loc[~has_meta, "slide_submitter_id"]
        problems.slides_without_metadata = sorted(missing.unique())
        problems.patches_without_metadata = int(len(missing))
        if strict:
            raise MediFastError(f"{len(problems.slides_without_metadata)} slides have no metadata row, e.g. "
                                f"{problems.slides_without_metadata[0]}; add them to the CSV or drop --strict")
        files = files[has_meta]

    extra = [c for c in meta.columns if c.startswith("gt_")]
    cols = ["slide_submitter_id", "class", "project_id", "case_submitter_id", "tissue_source_site", "gender", "race",
            "age_at_index"] + extra
    df = files.merge(meta[cols], on="slide_submitter_id", how="left", validate="many_to_one")
    folder_cls = df["folder"].map(canonical_class)
    mism = df.loc[folder_cls != df["class"], ["slide_submitter_id", "folder", "class"]].drop_duplicates(
        "slide_submitter_id")
    problems.class_mismatch = [(s, canonical_class(f), c) for s, f, c in mism.itertuples(index=False)]
    if len(df) == 0:
        raise MediFastError(f"no usable patches under {root} ({problems.summary()}); check that slide folder "
                            f"names are the slide_submitter_id values of the metadata")
    df = df[list(INDEX_COLUMNS) + extra].reset_index(drop=True)
    df["age_at_index"] = df["age_at_index"].astype(np.float64)
    return df, problems


def build_index(root, metadata_csv, strict: bool = False, **kw) -> pd.DataFrame:
    """One row per patch: columns :data:`INDEX_COLUMNS` (``path`` absolute; codes as strings; missing
    gender/race "Unknown"; ``age_at_index`` float, NaN if missing) plus ground-truth ``gt_*`` columns
    when the metadata has them.  ``df.attrs["problems"]`` holds the :class:`IndexProblems`."""
    df, problems = build_index_with_problems(root, metadata_csv, strict=strict, **kw)
    df.attrs["problems"] = problems
    return df


def write_index(df: pd.DataFrame, out) -> Path:
    """Write the index as parquet (atomically)."""
    from ..io import atomic_path

    out = Path(out)
    clean = df.copy()
    clean.attrs = {}
    with atomic_path(out) as tmp:
        clean.to_parquet(tmp, index=False)
    return out


def read_index(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MediFastError(f"index {path} does not exist; build one with `medi-fast data index ROOT --metadata "
                            f"CLINICAL.csv --out {path.name}`")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise MediFastError(f"cannot read {path} as a parquet index ({type(e).__name__}); rebuild it with "
                            f"`medi-fast data index`") from None
    missing = [c for c in INDEX_COLUMNS if c not in df.columns and c not in ("width", "height")]
    if missing:
        raise MediFastError(f"{path} is not a medi-fast index (no column {missing[0]!r}); rebuild it with "
                            f"`medi-fast data index`")
    return df
