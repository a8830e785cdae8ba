"""TrainConfig: every option of ``medi-fast train``, one field each, with why each default is what it is.

Unknown keys raise; the resolved config is written as ``config.json`` in the run directory, so a
run can always be read back (and resumed) exactly as it was started.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medi_fast.errors import MediFastError, check_seed, suggest
from medi_fast.schedule import PREDICTION_TYPES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLING = ("class", "combination", "uniform")


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(name: str, annotation: str, value) -> None:
    """``value`` of field ``name`` against its annotation (``int``, ``float``, ``str | None``...)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    if any(isinstance(value, _TYPES[k]) and (k == "bool" or not isinstance(value, bool)) for k in kinds if k in _TYPES):
        return
    want = " or ".join("null" if k == "None" else {"str": "a string", "int": "a whole number", "float": "a number",
                                                   "bool": "true or false"}.get(k, k) for k in kinds)
    raise MediFastError(f"training option {name!r} must be {want}, got {value!r}; fix the config file or give "
                        f"--{name.replace('_', '-')} on the command line")


@dataclass(frozen=True)
class TrainConfig:
    # Data: an index or pack from `medi-fast data`, optionally restricted to a split CSV.
    data: str = ""
    split: str | None = None
    # Class only is the CLS baseline; "class,tss" is MeDi.  Any metadata column works (age continuous).
    condition: str = "class,tss"
    # The published architecture and resolution.
    preset: str = "medi-128"
    resolution: int | None = None  # None: the preset's resolution
    # What the UNet predicts.  epsilon is published; v_prediction (v = alpha eps - sigma x0) weights the
    # clean-image error at high noise as much as at low noise, where epsilon barely does: short runs
    # then learn the stain colour that sampling fixes in its first steps (docs/training.md).
    prediction_type: str = "epsilon"
    # Published: batch 64, lr 1e-4, 800k steps.
    batch_size: int = 64
    lr: float = 1e-4
    steps: int = 800_000
    out: str = "runs/medi"
    # 1 % linear warm-up then cosine (published); a value >= 1 is a number of steps.
    warmup: float = 0.01
    # AdamW as published: betas (0.95, 0.999), weight decay 1e-6, eps 1e-8.
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    weight_decay: float = 1e-6
    adam_eps: float = 1e-8
    # Gradient clipping at global norm 1.0 (published).
    grad_clip: float = 1.0
    # EMA as diffusers' EMAModel in the reference script: max decay 0.9999 with warm-up
    # 1 - (1 + step / inv_gamma) ** -power.
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    # Class-balanced sampling is the published default: rare cancer types are not drowned out.
    sampling: str = "class"
    # Conditioning dropout for classifier-free guidance; 0 as published.
    cond_drop: float = 0.0
    # Micro-batches per optimiser step; effective batch = batch_size x world_size x grad_accum.
    grad_accum: int = 1
    # auto: bf16 autocast on GPUs that support it, fp32 otherwise (CPU runs are fp32).
    precision: str = "auto"
    # channels_last is faster for convolutions on tensor cores; ignored on CPU.
    channels_last: bool = True
    # torch.compile pays minutes of compile time for faster steps: worth it only for long runs.
    compile: bool = False
    # Data-loader worker processes: decoding overlaps with compute.  0 = load in the main process.
    workers: int = 4
    seed: int = 0
    # Checkpoint every k steps, keep the last N (plus best.pt, the lowest mean loss).
    checkpoint_every: int = 5000
    keep_last: int = 3
    log_every: int = 10
    # Sample grids (rows classes x columns sites, DDIM) every k steps; 0 disables.
    grid_every: int = 5000
    grid_steps: int = 50
    grid_rows: int = 8
    grid_cols: int = 8
    # Continue the run in `out` from its last checkpoint, exactly (model, EMA, optimiser, LR, RNG, data).
    resume: bool = False
    device: str = "auto"

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise MediFastError(msg)

        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        check_seed(self.seed)
        for f in fields(self):  # NaN and infinity pass every comparison below, or none: refuse them first
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup >= 0,
             "--weight-decay, --grad-clip and --warmup must be >= 0")
        need(self.weight_decay <= 1, f"--weight-decay must be in [0, 1], got {self.weight_decay}")
        need(0 < self.adam_eps <= 1 and 0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"--adam-eps must be in (0, 1] and --adam-beta1/--adam-beta2 in [0, 1), got {self.adam_eps}, "
             f"{self.adam_beta1}, {self.adam_beta2}")
        need(self.ema_inv_gamma > 0 and self.ema_power > 0,
             f"--ema-inv-gamma and --ema-power must be > 0, got {self.ema_inv_gamma}, {self.ema_power}")
        need(1 <= self.steps <= 10**9, f"--steps must be in 1..10^9, got {self.steps}")
        need(1 <= self.grad_accum <= 4096, f"--grad-accum must be in 1..4096, got {self.grad_accum}")
        need(0 < self.lr <= 1, f"--lr must be in (0, 1], got {self.lr}")
        need(0.0 <= self.cond_drop < 1.0, f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        need(0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.prediction_type in PREDICTION_TYPES, f"--prediction-type must be one of "
             f"{', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        need(self.sampling in SAMPLING, f"--sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(1 <= self.grid_steps <= 1000, f"--grid-steps must be in 1..1000, got {self.grid_steps}")
        need(self.grid_rows >= 1 and self.grid_cols >= 1, "--grid-rows and --grid-cols must be >= 1")
        need(self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}")
        need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        need(0 <= self.workers <= 256, f"--workers must be in 0..256 processes, got {self.workers}")
        need(self.resolution is None or self.resolution > 0, f"--resolution must be positive, got {self.resolution}")

    @property
    def attributes(self) -> list[str]:
        from medi_fast.vocab import parse_list

        names = parse_list(self.condition)
        if not names or names[0] != "class":
            raise MediFastError(f"--condition must start with 'class' (e.g. 'class' or 'class,tss'), got {self.condition!r}")
        return names

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Options by name, each checked for its type first (a config file may hold anything)."""
        if not isinstance(d, dict):
            raise MediFastError(f"training options must be a JSON object of option names and values, not a "
                                f"{type(d).__name__}; fix the file or pass options directly")
        known = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key not in known:
                raise MediFastError(f"unknown training option {key!r}{suggest(key, known)}; see `medi-fast train --help`")
        for f in fields(cls):  # a config file's values are checked like the options' (click types those)
            if f.name in d:
                _check_type(f.name, str(f.type), d[f.name])
        return cls(**d)

    def write(self, path) -> Path:
        from medi_fast.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise MediFastError(f"cannot read training config {path} ({type(e).__name__}: {e}); fix the file or "
                                f"pass options directly") from None
        return cls.from_dict(d)
