"""Few-step students: progressive distillation (Salimans & Ho 2022, Algorithm 2), a student that needs N DDIM
steps, and consistency distillation (Song et al. 2023, Algorithm 2), a student for the consistency sampler.

Each stage halves the steps.  The student, initialised from its teacher, learns to take in ONE DDIM
step what the teacher does in TWO:

    x ~ data, i ~ U{0..N-1}, t = ts_N[i], t'' = the next level (alpha_bar = 1 after the last step),
    t' = the teacher grid's point between them (ts_2N[2i + 1])
    z_t   = alpha_t x + sigma_t eps                                      (Schedule.add_noise)
    z_t'  = DDIM(teacher, z_t,  t -> t')                                  (teacher's own DDIM: its
    z_t'' = DDIM(teacher, z_t', t' -> t'')                                  parameterisation, its clipping)
    x~    = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    v-student:  loss = || v~ - v_theta(z_t) ||^2,  v~ = (alpha_t z_t - x~) / sigma_t   ("SNR+1" weighting)
    x-student:  loss = max(SNR_t, 1) || x~ - x_theta(z_t) ||^2                        ("truncated SNR")

then the student becomes the next stage's teacher.  x~ is exactly the x0 prediction with which one
unclipped DDIM step of the student lands on the teacher's z_t'', so students sample without x0
clipping.  Grids are diffusers' "trailing" spacing: the N-step grid is every second point of the
2N-step one, and its first step starts at t = T - 1 (the highest noise, where sampling starts).

Run directory (``<out stem>.distill/`` beside the student):

    config.json, metrics.csv             the resolved DistillConfig; step, stage steps, loss, lr, ...
    checkpoints/step-*.pt (+ .state.pt)  the student in progress and its resume state (RunDir)
    stages/student-0008.pt               each finished stage's student (EMA weights), kept for benchmarks

The final student is copied to ``out`` last and atomically: ``out`` exists only when the run is complete.

Consistency distillation (``method="consistency"``) is one stage on the teacher's DDIM-M grid t_1 > ... > t_M:

    z_n = alpha_n x + sigma_n eps,  z^ = DDIM(teacher, z_n, t_n -> t_n+1)
    target = x0 of the target network (the student's EMA) at (z^, t_n+1); the teacher's x0 after t_M
    loss = pseudo-Huber(x0_student(z_n, t_n) - target)

with the same run directory, stage file (``stages/student-000N.pt``) and resume as a halving stage.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.errors import MediFastError, check_seed
from medi_fast.io import atomic_write_text, ensure_dir
from medi_fast.samplers.ddim import ddim_step
from medi_fast.schedule import Schedule, split_output

from .data import Batches, condition_table, drop_conditions, open_training_data, require_rows
from .ema import EMA
from .rundir import RunDir
from .step import (TrainStep, autocast_dtype, check_resume_options, load_resume, read_run_config, resolve_device,
                   resume_point, seed_everything, step_generator)
from .stream import IndexStream, sampling_weights

STUDENT_TYPES = ("v_prediction", "sample")
# progressive: halving stages of DDIM students; consistency: one stage, a consistency model sampled by the
# multistep consistency sampler (docs/distill.md)
METHODS = ("progressive", "consistency")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""
    # The student's DDIM steps; stages halve from teacher_steps down to it.
    steps: int = 4
    out: str = "student.pt"
    # The first teacher's DDIM steps (the quality the student aims at).  A student teacher: its own.
    teacher_steps: int | None = None
    # Data: default what the teacher was trained on (recorded in its provenance).
    data: str | None = None
    split: str | None = None
    batch_size: int = 16
    iters_per_stage: int = 500
    # Peak learning rate, annealed linearly to 0 within each stage (AdamW, no weight decay).
    lr: float = 1e-4
    # The student's EMA (its weights are the result); None: 0.999, or 0.95 for consistency distillation, where
    # the EMA is also the target network (Song et al. 2023's and LCM's rate)
    ema_decay: float | None = None
    # v is the paper's recommendation; "sample" (x0) its alternative.  Epsilon cannot do 1 step (SNR 0).
    prediction_type: str = "v_prediction"
    # "consistency": one stage of iters_per_stage iterations on the teacher's DDIM-teacher_steps grid
    method: str = "progressive"
    # Conditioning dropout: None keeps the teacher's (so classifier-free guidance still works).
    cond_drop: float | None = None
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    # Run directory; None: <out stem>.distill beside --out.
    run_dir: str | None = None

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise MediFastError(msg)

        check_seed(self.seed)
        for f in fields(self):
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.teacher_steps is None or self.teacher_steps >= 2, f"--teacher-steps must be >= 2, got {self.teacher_steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(1 <= self.iters_per_stage <= 10**7, f"--iters-per-stage must be in 1..10^7, got {self.iters_per_stage}")
        need(self.teacher_steps is None or self.teacher_steps <= 1000,
             f"--teacher-steps must be at most 1000 (the schedule's timesteps), got {self.teacher_steps}")
        need(0 < self.lr <= 1, f"--lr must be in (0, 1], got {self.lr}")
        need(self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        need(self.cond_drop is None or 0.0 <= self.cond_drop < 1.0, f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        need(self.prediction_type in STUDENT_TYPES, f"--prediction-type must be one of {', '.join(STUDENT_TYPES)} "
             f"(an epsilon student cannot take the first step from pure noise), got {self.prediction_type!r}")
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "--checkpoint-every and --log-every must be >= 1")
        need(Path(self.out).suffix in ckpt_io.SUFFIXES, f"--out {self.out!r} must end in .pt or .safetensors")

    @property
    def decay(self) -> float:
        """The EMA decay this run uses (--ema-decay, else the method's default)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 0.95 if self.method == "consistency" else 0.999

    @property
    def run_path(self) -> Path:
        out = Path(self.out)
        return Path(self.run_dir) if self.run_dir else out.with_name(out.stem + ".distill")


def stage_plan(teacher_steps: int, steps: int) -> list[int]:
    """Student steps of each stage: teacher_steps / 2, / 4, ... down to steps.  Refuses what halving cannot reach."""
    if steps >= teacher_steps:
        raise MediFastError(f"--steps {steps} is not fewer than the teacher's {teacher_steps} steps; distillation only "
                            f"halves steps, so pass --steps below {teacher_steps}")
    plan, n = [], teacher_steps
    while n > steps and n % 2 == 0:
        n //= 2
        plan.append(n)
    if n != steps:
        reachable = ", ".join(str(s) for s in [teacher_steps // 2 ** k for k in range(1, 12)
                                               if teacher_steps % 2 ** k == 0])
        raise MediFastError(f"--steps {steps} is not reachable by halving --teacher-steps {teacher_steps}; use one of "
                            f"{reachable}, or a --teacher-steps of {steps} x a power of 2 (e.g. {steps * 32})")
    return plan


def consistency_plan(teacher_steps: int, steps: int) -> list[int]:
    """Consistency distillation is one stage: [steps], once the student's ``steps`` levels are points of the
    teacher's grid (trailing spacing nests the N- and M-step grids when M is N x a power of 2)."""
    ratio = teacher_steps // steps
    if steps >= teacher_steps or teacher_steps % steps or ratio & (ratio - 1):
        raise MediFastError(f"--steps {steps} with --teacher-steps {teacher_steps}: the student samples at points of "
                            f"the teacher's grid only when --teacher-steps is --steps x a power of 2 (at least 2); "
                            f"use e.g. --teacher-steps {steps * 16}")
    return [steps]


def student_schedule(teacher: Schedule, prediction_type: str, steps: int, sampler: str = "ddim") -> Schedule:
    """The student's schedule: the teacher's betas, its output type, trailing grid, no x0 clipping (the
    student was trained to make exactly its unclipped step), made for ``sampler``-``steps``."""
    return replace(teacher, prediction_type=prediction_type, clip_sample=False, timestep_spacing="trailing",
                   default_steps=int(steps), default_sampler=sampler)


class StageGrid:
    """Noise levels of one stage: the student's timesteps, the teacher's midpoints, the levels after."""

    def __init__(self, schedule: Schedule, steps: int):
        ts = schedule.timesteps(steps, "trailing")  # (N,) descending from T - 1
        fine = schedule.timesteps(2 * steps, "trailing")  # (2N,)
        if not np.array_equal(fine[::2], ts):
            raise MediFastError(f"the {steps}- and {2 * steps}-step grids are not nested for T = "
                                f"{schedule.num_train_timesteps}; use powers of 2 for --steps and --teacher-steps")
        abar = schedule.alphas_cumprod.double()  # (T,)
        final = schedule.final_alpha_cumprod.double().reshape(1)
        self.t = torch.from_numpy(ts.copy())  # (N,)
        self.t_mid = torch.from_numpy(fine[1::2].copy())  # (N,)
        self.abar = abar[self.t]  # (N,)
        self.abar_mid = abar[self.t_mid]  # (N,)
        self.abar_next = torch.cat([abar[self.t[1:]], final])  # (N,): the next student level, 1 after the last


class ConsistencyGrid:
    """The levels consistency distillation trains on: the teacher's DDIM-M grid (trailing) and, after each,
    the next level (alpha_bar 1 after the last: there the consistency function is the identity)."""

    def __init__(self, schedule: Schedule, teacher_steps: int, steps: int):
        ts = schedule.timesteps(teacher_steps, "trailing")  # (M,) descending from T - 1
        if not np.isin(schedule.timesteps(steps, "trailing"), ts).all():
            raise MediFastError(f"the {steps}-step levels are not on the {teacher_steps}-step grid for T = "
                                f"{schedule.num_train_timesteps}; use powers of 2 for --steps and --teacher-steps")
        abar = schedule.alphas_cumprod.double()
        self.t = torch.from_numpy(ts.copy())  # (M,)
        self.abar = abar[self.t]  # (M,)
        self.abar_next = torch.cat([abar[self.t[1:]], schedule.final_alpha_cumprod.double().reshape(1)])  # (M,)
        self.t_next = torch.cat([self.t[1:], self.t[-1:]])  # (M,); the last is a placeholder (boundary)


def _bcast(v: torch.Tensor, device) -> torch.Tensor:
    return v.to(device=device, dtype=torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


@torch.no_grad()
def teacher_target(teacher, schedule: Schedule, grid: StageGrid, z: torch.Tensor, idx: torch.Tensor, cond):
    """(x~, z_t''): the x0 target that makes one student step from z (at grid.t[idx]) land where two
    teacher DDIM steps land (Algorithm 2).  idx: (B,) stage-grid indices."""
    dev = z.device
    abar, mid, nxt = (_bcast(v[idx], dev) for v in (grid.abar, grid.abar_mid, grid.abar_next))
    # the teacher's own DDIM (its parameterisation, its clipping), eps recomputed from the clipped x^:
    # with the raw eps, its mismatch with a clipped x^ near T would be divided by
    # alpha_t'' - (sigma_t''/sigma_t) alpha_t (~1e-3 there) below and blow the target up
    z_mid = ddim_step(teacher(z, grid.t[idx].to(dev), cond).float(), z, abar, mid, schedule,
                      use_clipped_model_output=True)
    z_next = ddim_step(teacher(z_mid, grid.t_mid[idx].to(dev), cond).float(), z_mid, mid, nxt, schedule,
                       use_clipped_model_output=True)
    ratio = (1 - nxt).sqrt() / (1 - abar).sqrt()  # sigma_t'' / sigma_t
    x_target = (z_next - ratio * z) / (nxt.sqrt() - ratio * abar.sqrt())
    return x_target, z_next


def student_loss(out: torch.Tensor, x_target: torch.Tensor, z: torch.Tensor, abar: torch.Tensor, prediction_type: str):
    """v: MSE on v (= (1 + SNR) || x~ - x^ ||^2); sample: max(SNR, 1) || x~ - x^ ||^2.  abar: (B, 1, 1, 1)."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "v_prediction":
        v_target = (a * z - x_target) / s
        return ((out - v_target) ** 2).mean()
    snr = abar / (1 - abar)
    return (snr.clamp(min=1.0) * (out - x_target) ** 2).mean()


# Pseudo-Huber distance of improved consistency training (Song & Dhariwal 2024): sqrt(|d|^2 + c^2) - c per
# image, c = 0.00054 sqrt(dimensions) (0.03 for a 3 x 32 x 32 patch): L2 for small differences, L1-like for large.
HUBER_C_PER_SQRT_DIM = 0.00054


def x0_of(prediction_type: str, out: torch.Tensor, z: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The x0 a model's output stands for at z (abar: (B, 1, 1, 1)): the consistency function of a student."""
    return split_output(prediction_type, out, z, abar.sqrt(), (1 - abar).sqrt())[0]


@torch.no_grad()
def consistency_target(teacher, teacher_schedule: Schedule, target_model, prediction_type: str,
                       grid: ConsistencyGrid, z: torch.Tensor, idx: torch.Tensor, cond) -> torch.Tensor:
    """f_target(z^_{t_{n+1}}): the target network's x0 at the point one teacher DDIM step from z (at
    grid.t[idx]) lands on (Song et al. 2023, Algorithm 2), and the teacher's own x0 where that point is the
    data level (the boundary condition f(x, 0) = x).  idx: (B,) grid indices."""
    dev = z.device
    abar, nxt = _bcast(grid.abar[idx], dev), _bcast(grid.abar_next[idx], dev)
    out = teacher(z, grid.t[idx].to(dev), cond).float()
    z_next = ddim_step(out, z, abar, nxt, teacher_schedule, use_clipped_model_output=True)
    x0_teacher = x0_of(teacher_schedule.prediction_type, out, z, abar)
    if teacher_schedule.clip_sample:
        x0_teacher = x0_teacher.clamp(-teacher_schedule.clip_sample_range, teacher_schedule.clip_sample_range)
    inner = x0_of(prediction_type, target_model(z_next, grid.t_next[idx].to(dev), cond).float(), z_next, nxt)
    boundary = (idx == len(grid.t) - 1).to(dev).view(-1, 1, 1, 1)
    return torch.where(boundary, x0_teacher, inner)


def consistency_loss(x0_student: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """Mean pseudo-Huber distance between the student's and the target's x0 (B, C, H, W)."""
    c = HUBER_C_PER_SQRT_DIM * math.sqrt(x0_student[0].numel())
    d2 = ((x0_student - x0_target) ** 2).flatten(1).sum(1)
    return ((d2 + c * c).sqrt() - c).mean()


def _teacher_record(ck) -> dict:
    """The teacher's training data, split and conditioning dropout from its provenance, each checked
    like the option it stands in for (a checkpoint's header may hold anything)."""
    prov = ck.provenance or {}
    config = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    record = {"data": prov.get("data") or config.get("data"), "split": prov.get("split") or config.get("split"),
              "cond_drop": prov.get("cond_drop", config.get("cond_drop", 0.0)) or 0.0}
    for key in ("data", "split"):
        if record[key] is not None and not isinstance(record[key], str):
            raise MediFastError(f"{ck.path} records a {key} that is not a path ({record[key]!r}); pass --{key}")
    drop = record["cond_drop"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise MediFastError(f"{ck.path} records a conditioning dropout that is not in [0, 1) ({drop!r}); its "
                            f"header is damaged: re-create the teacher checkpoint")
    return {**record, "cond_drop": float(drop)}


def _load_teacher(cfg: DistillConfig):
    ck = ckpt_io.load(cfg.teacher)
    sched = ck.schedule
    if sched.default_steps is not None and (cfg.method == "consistency" or sched.default_sampler == "consistency"):
        raise MediFastError(f"{cfg.teacher} is a student ({sched.default_sampler or 'ddim'}-{sched.default_steps}); "
                            f"{'consistency distillation' if cfg.method == 'consistency' else 'progressive distillation of a consistency student'} "
                            f"needs a trained model as teacher: pass the checkpoint it was distilled from")
    if sched.default_steps is not None:  # already a student
        if cfg.teacher_steps is not None and cfg.teacher_steps != sched.default_steps:
            raise MediFastError(f"{cfg.teacher} is a student distilled for {sched.default_steps} steps, not "
                                f"--teacher-steps {cfg.teacher_steps}; drop --teacher-steps")
        if cfg.steps >= sched.default_steps:
            raise MediFastError(f"{cfg.teacher} is already distilled to {sched.default_steps} steps; distilling can only "
                                f"reduce steps, so pass --steps below {sched.default_steps} (e.g. "
                                f"{max(sched.default_steps // 2, 1)})")
        teacher_steps = int(sched.default_steps)
    else:
        teacher_steps = int(cfg.teacher_steps or 64)
    return ck, teacher_steps


# The options that decide what a run computes: --resume with another value is refused, naming it.
RESUME_FIXED = {"teacher": "TEACHER", "steps": "--steps", "teacher_steps": "--teacher-steps",
                "batch_size": "--batch-size", "iters_per_stage": "--iters-per-stage", "lr": "--lr",
                "ema_decay": "--ema-decay", "prediction_type": "--prediction-type", "method": "--method",
                "cond_drop": "--cond-drop",
                "grad_clip": "--grad-clip", "seed": "--seed", "data": "--data", "split": "--split"}


def distill(cfg: DistillConfig | None = None, dataset=None, progress: bool = True, **options) -> Path:
    """Distil ``cfg.teacher`` into a ``cfg.steps``-step student written to ``cfg.out``; returns its path.

    ``medi_fast.training.distill.distill(teacher="best.pt", steps=4, out="student.pt", data=..., split=...)``.
    Each stage's student is kept in ``<run dir>/stages/student-NNNN.pt``.  ``dataset`` overrides --data
    (tests, notebooks).  Interrupted runs continue with ``resume=True``.
    """
    cfg = replace(cfg, **options) if cfg is not None else DistillConfig(**options)
    if not cfg.teacher:
        raise MediFastError("no teacher checkpoint given; pass TEACHER.pt (a `medi-fast train` checkpoint)")
    out = Path(cfg.out)
    if out.exists() and not cfg.resume:
        raise MediFastError(f"{out} already exists; choose another --out or delete it")
    from medi_fast.io import check_writable_dir

    check_writable_dir(out.parent if str(out.parent) else ".")
    teacher_ck, teacher_steps = _load_teacher(cfg)
    if teacher_steps > teacher_ck.schedule.num_train_timesteps:
        raise MediFastError(f"--teacher-steps {teacher_steps} exceeds the schedule's {teacher_ck.schedule.num_train_timesteps} "
                            f"timesteps; use at most {teacher_ck.schedule.num_train_timesteps}")
    plan = (consistency_plan if cfg.method == "consistency" else stage_plan)(teacher_steps, cfg.steps)
    check_writable_dir(cfg.run_path)
    run_path = cfg.run_path
    stages_dir = run_path / "stages"
    start = resume_point(RunDir(run_path, main=False), cfg.resume, "distillation run",
                         started=stages_dir.is_dir() and any(stages_dir.glob("student-*.pt")))
    record = _teacher_record(teacher_ck)
    data = cfg.data or record["data"]
    split = cfg.split if cfg.data else (cfg.split or record["split"])
    cond_drop = record["cond_drop"] if cfg.cond_drop is None else cfg.cond_drop
    resolved = {**asdict(cfg), "ema_decay": cfg.decay, "teacher_steps": cfg.teacher_steps, "resolved_teacher_steps": teacher_steps,
                "stages": plan, "data": data, "split": split, "cond_drop": cond_drop, "teacher_hash": teacher_ck.hash}
    if cfg.resume:
        recorded = read_run_config(run_path / "config.json")
        recorded.setdefault("method", "progressive")  # runs started before --method existed
        if recorded.get("teacher_hash") != teacher_ck.hash:
            raise MediFastError(f"--resume: the teacher {cfg.teacher} is not the checkpoint {run_path} was started "
                                f"from (content hash {teacher_ck.hash}, recorded {recorded.get('teacher_hash')}); "
                                f"restore that teacher, or choose another --out to start over")
        check_resume_options(recorded, resolved, RESUME_FIXED, run_path)
    if dataset is None and not data:
        raise MediFastError(f"{cfg.teacher} does not record its training data; pass --data (and --split)")
    ds = dataset if dataset is not None else open_training_data(data, split, teacher_ck.resolution)
    require_rows(len(ds))
    if int(getattr(ds, "resolution", teacher_ck.resolution) or teacher_ck.resolution) != teacher_ck.resolution:
        raise MediFastError(f"the data's patches are {ds.resolution} px but the teacher makes {teacher_ck.resolution} px; "
                            f"pass the pack the teacher was trained on")
    cond_all = condition_table(teacher_ck.spec, ds.table)  # in the teacher's vocabularies
    device = resolve_device(cfg.device)
    from medi_fast.resources import activation_bytes, check_batch

    # the student trains (kept activations) while the teacher runs: refuse what the device cannot hold
    check_batch(cfg.batch_size, activation_bytes(teacher_ck.unet_config, teacher_ck.resolution, training=True), device)

    run = RunDir(run_path, main=True)
    ensure_dir(stages_dir)
    atomic_write_text(run_path / "config.json", json.dumps(resolved, indent=2) + "\n")
    run.start_metrics(start)
    stream = IndexStream(sampling_weights(ds.table, "class"), cfg.batch_size, cfg.seed, 0, 1)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iters_per_stage * len(plan), initial=start, unit="it", disable=not progress,
               dynamic_ncols=True, desc="distill")
    distiller = _Distiller(cfg, run, iter(Batches(ds, stream, start, 0, False)), cond_all, cond_drop, device,
                           autocast_dtype("auto", device), bar, {"data": data, "split": split}, teacher_steps)
    teacher_path = Path(cfg.teacher)
    try:
        for k, n in enumerate(plan):
            stage = Stage(k, n, teacher_path, stages_dir / f"student-{n:04d}.pt", k * cfg.iters_per_stage,
                          (k + 1) * cfg.iters_per_stage)
            if not (stage.out.is_file() and start >= stage.last):
                distiller.run_stage(stage, start)
                start = max(start, stage.last)
            teacher_path = stage.out
    finally:
        bar.close()
        run.close()
    final = ckpt_io.load(teacher_path)
    ckpt_io.save(final, out)  # atomic: out appears whole, and only now
    return out


@dataclass(frozen=True)
class Stage:
    """One halving: a student of ``steps`` DDIM steps learns from ``teacher`` (2 x steps) in the run's
    iterations [first, last); its EMA weights become ``out``, the next stage's teacher."""

    index: int
    steps: int
    teacher: Path
    out: Path
    first: int
    last: int


@dataclass
class _StageModels:
    teacher_ck: ckpt_io.Checkpoint
    teacher: torch.nn.Module
    teacher_schedule: Schedule
    student_schedule: Schedule
    grid: StageGrid
    student: torch.nn.Module
    ema: EMA
    step: TrainStep


@dataclass
class _Distiller:
    """What every stage shares: the run directory, the data stream and its conditions, the device."""

    cfg: DistillConfig
    run: RunDir
    batches: object  # iterator of (row indices, uint8 images), positioned at the run's first iteration
    cond_all: dict[str, torch.Tensor]
    cond_drop: float
    device: torch.device
    amp: torch.dtype | None
    bar: object
    source: dict  # data and split, for the provenance
    teacher_steps: int  # the first teacher's DDIM steps (consistency: the grid the student learns on)
    gen: torch.Generator = field(init=False)
    t0: float = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator(device=self.device)
        self.t0 = time.perf_counter()

    def run_stage(self, stage: Stage, start: int) -> None:
        m = self.build(stage)
        if start > stage.first:  # resume inside this stage
            m.step.restore(*load_resume(self.run, start))
        log_sum, log_n = 0.0, 0
        for i in range(max(start, stage.first), stage.last):
            loss, lr = self.iteration(m, i)
            done = i + 1
            log_sum += float(loss)
            log_n += 1
            self.bar.update(1)
            self.bar.set_postfix(stage=f"{self.stage_from(stage)}->{stage.steps}", loss=f"{float(loss):.4f}")
            if done % self.cfg.log_every == 0 or done == stage.last:
                self.log(done, log_sum / log_n, lr)
                log_sum, log_n = 0.0, 0
            if done % self.cfg.checkpoint_every == 0 or done == stage.last:
                self.checkpoint(m, stage, done)
        # The stage's result: EMA weights as the model (what the next teacher and users run).  Written after
        # the loop, so a run killed between its last checkpoint and this file writes it on --resume.
        ckpt_io.save(ckpt_io.from_model(m.ema.model, m.student_schedule, preset=m.teacher_ck.preset,
                                        provenance=self.provenance(m, stage, stage.last)), stage.out)

    @property
    def consistency(self) -> bool:
        return self.cfg.method == "consistency"

    def stage_from(self, stage: Stage) -> int:
        """The teacher steps a stage's student learns from."""
        return self.teacher_steps if self.consistency else 2 * stage.steps

    def build(self, stage: Stage) -> _StageModels:
        """The teacher (frozen, EMA weights) and a student initialised from it, with its optimiser step."""
        cfg = self.cfg
        teacher_ck = ckpt_io.load(stage.teacher)
        teacher = teacher_ck.build(ema=True).to(self.device).requires_grad_(False)
        t_sched = teacher_ck.schedule
        seed_everything(cfg.seed + stage.index)
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        ema = EMA(student, cfg.decay)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
        iters = cfg.iters_per_stage
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / iters))  # linear to 0 in the stage
        step = TrainStep(student, opt, device_type=self.device.type, amp=self.amp, scheduler=sched, ema=ema,
                         grad_clip=cfg.grad_clip)
        if self.consistency:  # one stage: the student learns the whole DDIM-M grid; its EMA is the target network
            grid = ConsistencyGrid(t_sched, self.teacher_steps, stage.steps)
            schedule = student_schedule(t_sched, cfg.prediction_type, stage.steps, sampler="consistency")
        else:
            grid = StageGrid(t_sched, stage.steps)
            schedule = student_schedule(t_sched, cfg.prediction_type, stage.steps)
        return _StageModels(teacher_ck, teacher, t_sched, schedule, grid, student, ema, step)

    def iteration(self, m: _StageModels, i: int) -> tuple[torch.Tensor, float]:
        """One optimiser step of the student on one batch; returns (loss, the learning rate used)."""
        device, gen = self.device, self.gen
        step_generator(gen, self.cfg.seed, 0, i)
        idx_rows, images = next(self.batches)
        x0 = images.to(device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        ids = torch.as_tensor(idx_rows)
        cond = {name: v[ids].to(device) for name, v in self.cond_all.items()}
        cond = drop_conditions(cond, m.teacher_ck.spec, self.cond_drop, gen)
        idx = torch.randint(0, len(m.grid.t), (x0.shape[0],), generator=gen, device=device).cpu()  # (B,) grid indices
        noise = torch.randn(x0.shape, generator=gen, device=device)
        abar = _bcast(m.grid.abar[idx], device)
        z = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # z_t
        if self.consistency:
            x_target = consistency_target(m.teacher, m.teacher_schedule, m.ema.model, self.cfg.prediction_type,
                                          m.grid, z, idx, cond)
            out = m.step.forward(z, m.grid.t[idx].to(device), cond)
            loss = consistency_loss(x0_of(self.cfg.prediction_type, out.float(), z, abar), x_target)
        else:
            x_target, _ = teacher_target(m.teacher, m.teacher_schedule, m.grid, z, idx, cond)
            out = m.step.forward(z, m.grid.t[idx].to(device), cond)
            loss = student_loss(out.float(), x_target, z, abar, self.cfg.prediction_type)
        m.step.zero_grad()
        m.step.backward(loss)
        return loss.detach(), m.step.step().lr

    def log(self, done: int, loss: float, lr: float) -> None:
        if not math.isfinite(loss):
            raise MediFastError(f"the distillation loss became {loss} at step {done}; lower --lr")
        self.run.log({"step": done, "loss": loss, "lr": lr, "steps_per_s": "",
                      "elapsed_s": round(time.perf_counter() - self.t0, 2)})

    def provenance(self, m: _StageModels, stage: Stage, done: int) -> dict:
        method = ("consistency distillation (Song et al. 2023)" if self.consistency
                  else "progressive distillation (Salimans & Ho 2022)")
        return {"trainer": "medi-fast distill", "method": method, "teacher_steps": self.stage_from(stage),
                "stage_steps": stage.steps, "teacher": str(stage.teacher), "teacher_hash": m.teacher_ck.hash,
                "step": done, "cond_drop": self.cond_drop, **self.source,
                "config": {**asdict(self.cfg), "ema_decay": self.cfg.decay, "cond_drop": self.cond_drop}}

    def checkpoint(self, m: _StageModels, stage: Stage, done: int) -> None:
        ck = ckpt_io.from_model(m.student, m.student_schedule, preset=m.teacher_ck.preset, ema_model=m.ema.model,
                                provenance=self.provenance(m, stage, done))
        m.step.save(self.run, done, ck)
        self.run.prune(2)
