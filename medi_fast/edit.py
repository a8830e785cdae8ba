"""Counterfactual editing of real patches (``medi-fast edit``, ``Pipeline.edit``; docs/edit.md).

The same MeDi model that draws patches from noise moves a real patch to another condition (another
tissue source site, class or metadata) by starting the sampler part-way, at step ``start`` of its
``steps`` timesteps, with ``floor(steps x strength)`` steps left to run:

- ``sdedit`` (Meng et al. 2022): noise the image to that timestep with the row's seeded noise, then
  denoise under the target condition.
- ``inversion``: encode the image deterministically under its source condition
  (``samplers.ddim_invert``), then decode with DDIM under the target condition.

An edit is a generation job whose plan rows carry a source image: :class:`EditConfig` makes each
batch's images from those sources and everything else (the Generator's units, run directory,
writers and manifest, ``job.run_job``, Ray) is generation's.  Each row's seed comes from (seed, row)
as in a plan, so an edited image does not depend on its batch or backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import plan as plans
from .backends import ModelInfo, sampling_threads
from .conditioning import CATEGORICAL, ConditionSpec, column_for
from .errors import MediFastError
from .generate import GenerateConfig, guided, row_conditions, row_noise
from .pixels import from_uint8, to_uint8
from .samplers import ddim_invert, get_sampler, needs_noise, timesteps_for

METHODS = ("sdedit", "inversion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Plan column holding each row's source image (an absolute path; None for images given in memory).
SOURCE = "source"
# Columns of an INPUT table that name the image, in order of preference (a data index has ``path``,
# generate's manifest.csv ``file``).
PATH_COLUMNS = ("path", "file")
INPUT_HELP = ("give a folder of .png/.jpg patches, or a .csv/.parquet table with a path (or file) column and the "
              "source class and metadata (a data index, or generate's manifest.csv)")


def source_column(attribute: str) -> str:
    """The plan and manifest column of an attribute's source value: ``source_class``,
    ``source_tissue_source_site``, ..."""
    return f"{SOURCE}_{column_for(attribute)}"


@dataclass(frozen=True)
class EditConfig(GenerateConfig):
    """Generation's settings plus how far to go back: ``strength`` in [0, 1] (0: the input itself, 1:
    from pure noise) and the ``method`` (``sdedit`` or ``inversion``)."""

    strength: float = 0.5
    method: str = "sdedit"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength)
                and 0 <= self.strength <= 1):
            raise MediFastError(f"--strength must be in [0, 1] (0: the input unchanged, 1: from pure noise), "
                                f"got {self.strength}")
        if self.method not in METHODS:
            raise MediFastError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "inversion" and self.sampler != "ddim":
            raise MediFastError(f"--method inversion runs DDIM both ways and takes no --sampler {self.sampler}; "
                                f"use --sampler ddim, or --method sdedit")
        if self.method == "inversion" and self.eta:
            raise MediFastError(f"--method inversion is deterministic and takes no --eta (got {self.eta}); use "
                                f"--eta 0, or --method sdedit")

    def steps_run(self) -> int:
        """Sampler steps an edit runs: the last floor(steps x strength) of the ``steps`` timesteps (as
        diffusers' img2img pipelines; the small epsilon keeps 0.3 x 10 at 3 despite float rounding)."""
        return min(self.steps, math.floor(self.steps * self.strength + 1e-9))

    def sample(self, denoiser, info: ModelInfo, rows: pd.DataFrame) -> np.ndarray:
        return edit_rows(denoiser, info, read_images(rows[SOURCE], info.resolution), rows, self)

    def manifest_columns(self) -> dict:
        return {**super().manifest_columns(), "strength": self.strength, "method": self.method}

    @property
    def verb(self) -> str:
        return "edit"


def check_model(info: ModelInfo, cfg: EditConfig) -> None:
    """Refuse what this model cannot edit, before anything is written."""
    if cfg.method == "inversion" and cfg.steps_run() and info.schedule.prediction_type == "sample":
        raise MediFastError("--method inversion needs a model that predicts the noise or v; this one predicts x0 "
                            "(its noise is undefined at t = 0); use --method sdedit")


def edit_rows(denoiser, info: ModelInfo, images: np.ndarray, rows: pd.DataFrame, cfg: EditConfig) -> np.ndarray:
    """Edit one batch: uint8 ``images`` (B, H, W, 3) of ``rows`` (plan rows: target conditions by
    attribute, source conditions in :func:`source_column`, ``seed``) -> uint8 (B, H, W, 3).  Each
    image depends only on itself, its row's conditions and seed."""
    n_run = cfg.steps_run()
    if n_run == 0:  # strength 0 (or below one step): nothing to undo, the input is the answer
        return np.array(images, dtype=np.uint8, copy=True)
    check_model(info, cfg)
    spec, schedule = info.spec, info.schedule
    device = getattr(denoiser, "device", torch.device("cpu"))
    ts = timesteps_for(cfg.sampler, schedule, cfg.steps)
    start = len(ts) - n_run
    x0 = from_uint8(images).to(device)  # (B, 3, H, W) in [-1, 1]
    target = row_conditions(spec, rows, device)
    draw = row_noise(rows, info.resolution, device)
    with sampling_threads(denoiser):
        if cfg.method == "sdedit":
            t0 = torch.full((len(rows),), int(ts[start]), dtype=torch.long, device=device)
            x = schedule.add_noise(x0, draw(), t0)
        else:
            # encoded with the conditional model alone: guidance has no inverse, the decoding applies it
            source = row_conditions(spec, rows, device, column=source_column)
            x = ddim_invert(denoiser, x0, ts, schedule, source, stop=start)
        x = get_sampler(cfg.sampler)(guided(denoiser, spec, cfg.guidance), x, ts, schedule, target, eta=cfg.eta,
                                     noise=(lambda _: draw()) if needs_noise(cfg.sampler, cfg.eta) else None, start=start)
        return to_uint8(x)


def read_images(paths: Sequence, resolution: int) -> np.ndarray:
    """The images at ``paths`` as uint8 (N, H, W, 3), each checked to be ``resolution`` square."""
    return np.stack([read_image(p, resolution) for p in paths])


def read_image(path, resolution: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL raises these for bad data
        if isinstance(e, FileNotFoundError):
            raise MediFastError(f"source image {path} does not exist; fix the path in INPUT") from None
        raise MediFastError(f"cannot read {path} as an image ({type(e).__name__}); {INPUT_HELP}") from None
    if size != (resolution, resolution):
        raise MediFastError(f"source image {path} is {size[0]}x{size[1]}; this model edits {resolution}x{resolution} "
                            f"patches; resize or crop them first, or use a model of that resolution")
    return array


def read_input(path, spec: ConditionSpec) -> pd.DataFrame:
    """INPUT -> one row per source image: ``source`` (absolute path) and each attribute's source value
    (None where unknown).  A folder gives its images (recursively, in path order) with unknown
    conditions; a table (.csv, .parquet) gives a path column (relative paths are relative to the
    table's folder) and the conditions by attribute name (``tss``) or data column
    (``tissue_source_site``); metadata columns may be absent or empty, a class column must not."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise MediFastError(f"INPUT {path} holds no .png/.jpg images; {INPUT_HELP}")
        df = pd.DataFrame({SOURCE: [str(p.resolve()) for p in files]})
        for name in spec.names:
            df[name] = None
        return df
    if not path.exists():
        raise MediFastError(f"INPUT {path} does not exist; {INPUT_HELP}")
    table = read_table(path)
    col = next((c for c in PATH_COLUMNS if c in table.columns), None)
    if col is None:
        raise MediFastError(f"INPUT {path} has no {' or '.join(PATH_COLUMNS)} column naming each image; {INPUT_HELP}")
    if table.empty:
        raise MediFastError(f"INPUT {path} has no rows; {INPUT_HELP}")
    if "class" not in table.columns:
        raise MediFastError(f"INPUT {path} has no class column (each patch's source class); add one, or give a "
                            f"folder of images and --to class=NAME")
    df = pd.DataFrame({SOURCE: [str((path.parent / str(p)).resolve()) if str(p) else "" for p in table[col]]})
    for name in spec.names:
        column = name if name in table.columns else column_for(name)
        values = table[column] if column in table.columns else [""] * len(table)
        df[name] = [None if (v is None or str(v) == "" or (isinstance(v, float) and math.isnan(v))) else v
                    for v in values]
    empty = [i for i, s in enumerate(df[SOURCE]) if not s]
    if empty:
        raise MediFastError(f"INPUT {path}: row {empty[0] + 1} has an empty {col}; give every row an image path")
    return df


def read_table(path: Path) -> pd.DataFrame:
    from .data.clinical import read_csv_str

    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise MediFastError(f"cannot read INPUT {path} as parquet ({type(e).__name__}); {INPUT_HELP}") from None
    if path.suffix != ".csv":
        raise MediFastError(f"INPUT {path} is neither a folder nor a .csv/.parquet table; {INPUT_HELP}")
    return read_csv_str(path)


def parse_targets(items: Sequence[str]) -> dict:
    """``--to NAME=VALUE`` options -> {name: value}; a name given twice with different values is refused."""
    out: dict = {}
    for item in items:
        name, sep, value = (part.strip() for part in str(item).partition("="))
        if not sep or not name:
            raise MediFastError(f"--to {item!r} must look like NAME=VALUE, e.g. --to tss=44")
        if name in out and out[name] != value:
            raise MediFastError(f"--to gives {name} twice ({out[name]} and {value}); give it once")
        out[name] = value
    return out


def plan_edits(spec: ConditionSpec, sources: pd.DataFrame, targets: Mapping[str, object], seed: int = 0,
               method: str = "sdedit") -> plans.Plan:
    """The plan of an edit: one row per source (``sources``: :func:`read_input`'s columns, ``source``
    None for images given in memory) with the target conditions (each attribute's ``targets`` value,
    by attribute or data column name, else the source's own; one value for all rows or a sequence of one per
    row), the source conditions and the seed
    (``plan.derive_seeds(seed, row)``, as generation's).  Values are checked against the model's
    vocabularies."""
    names = {column_for(n): n for n in spec.names}
    wanted = {}
    for key, value in targets.items():
        name = key if key in spec.names else names.get(key)
        if name is None:
            raise MediFastError(f"--to {key}=...: this model is not conditioned on {key!r}; it takes "
                                f"{', '.join(spec.names)}")
        if name in wanted:
            raise MediFastError(f"--to gives {name} twice (as {name} and {column_for(name)}); give it once")
        wanted[name] = value
    if len(sources) == 0:
        raise MediFastError(f"no images to edit; {INPUT_HELP}")
    if sources["class"].isna().any():
        if sources["class"].notna().any():
            row = int(np.flatnonzero(sources["class"].isna().to_numpy())[0])
            raise MediFastError(f"INPUT row {row + 1} has no source class; give every row its class")
        if method == "inversion":
            raise MediFastError(f"--method inversion encodes each patch under its source class and metadata; "
                                f"{INPUT_HELP.replace('give a folder of .png/.jpg patches, or', 'give')}, or use "
                                f"--method sdedit")
        if "class" not in wanted:
            raise MediFastError("these images have no source class; give the target with --to class=NAME, or an "
                                "INPUT table with a class column")
    # canonical spellings, vocabulary checks and seeds as generation's plans (one row per image)
    src = None
    if sources["class"].notna().all():
        src = plans.from_counts(spec, sources[list(spec.names)].assign(count=1), 0).rows
    tgt = sources[list(spec.names)].copy()
    for name, value in wanted.items():
        tgt[name] = _per_row(name, value, len(tgt))
    plan = plans.from_counts(spec, tgt.assign(count=1), seed)
    rows = plan.rows.drop(columns="seed")
    rows[SOURCE] = [None if s is None else str(s) for s in sources[SOURCE]]
    for name in spec.names:
        rows[source_column(name)] = src[name].to_numpy() if src is not None else [None] * len(rows)
    rows["seed"] = plan.rows["seed"].to_numpy()
    return plans.Plan(rows, plan.attributes)


def _per_row(name: str, value, n: int) -> list:
    """A target value for every row: one value (a string or a number) for all, or a sequence of n."""
    if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise MediFastError(f"the target {name} gives {len(values)} values for {n} images; give one per image, or "
                            "one value for all")
    return values


def check_images(plan: plans.Plan, resolution: int) -> None:
    """Read every source image of ``plan`` once (decodable, ``resolution`` square) before anything is
    written, so a bad one is refused up front rather than mid-run."""
    for p in plan.rows[SOURCE]:
        read_image(p, resolution)


def check_out(out, input_path) -> None:
    """Refuse an output directory inside INPUT (a resumed run would then list its own outputs)."""
    if out is None or not Path(input_path).is_dir():
        return
    o, i = Path(out).resolve(), Path(input_path).resolve()
    if o == i or i in o.parents:
        raise MediFastError(f"--out {out} lies inside INPUT {input_path}; choose an output directory outside it")


def as_images(images, resolution: int) -> np.ndarray:
    """The API's images (uint8 (N, H, W, 3), one (H, W, 3), or a list of them) as one checked array."""
    array = np.asarray(images) if not isinstance(images, (list, tuple)) else np.stack([np.asarray(i) for i in images])
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise MediFastError(f"images must be uint8 (N, H, W, 3) RGB arrays, got {array.dtype} {array.shape}")
    if array.shape[1:3] != (resolution, resolution):
        raise MediFastError(f"images are {array.shape[2]}x{array.shape[1]}; this model edits {resolution}x{resolution} "
                            f"patches; resize or crop them first")
    return array


def source_frame(spec: ConditionSpec, n: int, source) -> pd.DataFrame:
    """The API's ``source`` (None: unknown; one mapping for every image; a DataFrame or a list of
    mappings, one per image) as :func:`read_input`'s columns, ``source`` None."""
    if source is None:
        rows = [{}] * n
    elif isinstance(source, Mapping):
        rows = [dict(source)] * n
    else:
        rows = source.to_dict("records") if isinstance(source, pd.DataFrame) else [dict(r) for r in source]
        if len(rows) != n:
            raise MediFastError(f"source gives {len(rows)} conditions for {n} images; give one per image, or one "
                                f"mapping for all")
    df = pd.DataFrame({SOURCE: [None] * n})
    for name in spec.names:
        column = column_for(name)
        df[name] = [r.get(name, r.get(column)) for r in rows]
    unknown = sorted({k for r in rows for k in r} - set(spec.names) - {column_for(n) for n in spec.names})
    if unknown:
        raise MediFastError(f"source: this model is not conditioned on {unknown[0]!r}; it takes {', '.join(spec.names)}")
    for name in spec.names:
        if spec[name].kind == CATEGORICAL:
            df[name] = [None if v is None or v == "" else v for v in df[name]]
    return df
