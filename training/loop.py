"""The training loop: DDPM epsilon-prediction MSE (Ho et al. 2020, eq. 14), as published.

    x_0 ~ data, eps ~ N(0, I), t ~ U{0..T-1}
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps          (Schedule.add_noise)
    loss = || eps - eps_theta(x_t, t, c) ||^2                (mean over pixels and batch)

With --prediction-type v_prediction the target is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
(Salimans & Ho 2022), with sample it is x_0 (Schedule.training_target); the checkpoint's schedule
records which, and every sampler converts the output accordingly.

AdamW, warm-up + cosine LR, gradient clipping, EMA, optional autocast / channels_last / compile,
gradient accumulation and DDP; the optimiser step and its resume state are ``step.TrainStep``, shared
with the distiller.  Randomness that shapes the loss (which rows, t, eps, dropout) is a pure function
of (seed, rank, step), so a resumed run repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from medi_fast import checkpoint as ckpt_io
from medi_fast.conditioning import ConditionSpec, column_for
from medi_fast.errors import MediFastError
from medi_fast.model import build_model, get_preset
from medi_fast.schedule import Schedule

from . import distributed
from .config import TrainConfig
from .data import Batches, build_spec, condition_table, drop_conditions, open_training_data, require_rows
from .ema import EMA
from .grid import sample_grid, save_png
from .lr import warmup_cosine
from .rundir import RunDir
from .step import (TrainStep, autocast_dtype, check_resume_options, load_resume, read_run_config, resolve_device,
                   resume_point, seed_everything, step_generator)
from .stream import IndexStream, sampling_weights

# The options that decide what a run computes: --resume with another value is refused, naming it.
# --steps may grow (a run is extended); devices, precision, logging and checkpointing may change.
RESUME_FIXED = ("data", "split", "condition", "preset", "resolution", "prediction_type", "batch_size", "lr", "warmup",
                "adam_beta1", "adam_beta2", "weight_decay", "adam_eps", "grad_clip", "ema_decay", "ema_warmup",
                "ema_inv_gamma", "ema_power", "sampling", "cond_drop", "grad_accum", "seed")


def train(cfg: TrainConfig, dataset=None) -> dict:
    """Run (or resume) training; returns a summary.  ``dataset`` overrides --data (Python API, tests)."""
    device = resolve_device(cfg.device)
    d = distributed.setup(device.type)
    try:
        return _train(cfg, dataset, device if not (d.enabled and device.type == "cuda") else
                      torch.device("cuda", d.local_rank), d)
    finally:
        distributed.cleanup(d)


def _train(cfg: TrainConfig, dataset, device: torch.device, d: distributed.Dist) -> dict:
    preset = get_preset(cfg.preset)
    resolution = _resolution(cfg, preset)
    start_step = _resume_point(cfg)  # reads only: the run directory is untouched until every check has passed
    from medi_fast.resources import activation_bytes, check_batch

    # Before the run directory is touched: a batch the device cannot hold is refused, not OOM-killed.
    check_batch(cfg.batch_size, activation_bytes(preset.unet_config(), resolution, training=True), device)
    ds = _open_data(cfg, dataset, resolution)
    spec = build_spec(ds.table, cfg.attributes, preset.d_t)
    trainer = _Trainer.build(cfg, d, device, preset, resolution, spec, ds, start_step)
    return trainer.run()


def _resolution(cfg: TrainConfig, preset) -> int:
    resolution = cfg.resolution or preset.resolution
    factor = 2 ** (len(preset.block_out_channels) - 1)
    if resolution % factor:
        raise MediFastError(f"--resolution {resolution} does not fit --preset {cfg.preset}: it must be divisible by "
                            f"{factor} ({factor.bit_length() - 1} downsamplings); use e.g. {preset.resolution}")
    return resolution


def _resume_point(cfg: TrainConfig) -> int:
    """The step to continue from (0: a new run), after the run directory's guards (step.resume_point)."""
    run = RunDir(cfg.out, main=False)
    start = resume_point(run, cfg.resume, "run")
    if cfg.resume:
        check_resume_options(read_run_config(run.root / "config.json"), cfg.to_dict(),
                             {k: "--" + k.replace("_", "-") for k in RESUME_FIXED}, cfg.out)
    return start


def _open_data(cfg: TrainConfig, dataset, resolution: int):
    ds = dataset if dataset is not None else open_training_data(cfg.data, cfg.split, resolution)
    require_rows(len(ds))
    data_res = int(getattr(ds, "resolution", resolution) or resolution)
    if data_res != resolution:
        raise MediFastError(f"the data's patches are {data_res} px but the model trains at {resolution} px "
                            f"(--preset {cfg.preset}); pass --resolution {data_res} or re-pack the data at {resolution} px")
    return ds


@dataclass
class _Trainer:
    """One run's state: what each step reads (data, conditions, generator) and what it updates."""

    cfg: TrainConfig
    d: distributed.Dist
    device: torch.device
    resolution: int
    spec: ConditionSpec
    schedule: Schedule
    rundir: RunDir
    model: torch.nn.Module
    ema: EMA
    step: TrainStep
    batches: object  # iterator of (row indices, uint8 images)
    cond_all: dict[str, torch.Tensor]
    start_step: int
    best: float = math.inf
    gen: torch.Generator = field(init=False)
    channels_last: bool = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator(device=self.device)
        self.channels_last = self.cfg.channels_last and self.device.type == "cuda"

    @property
    def effective_batch(self) -> int:
        return self.cfg.batch_size * self.d.world_size * self.cfg.grad_accum

    @classmethod
    def build(cls, cfg: TrainConfig, d, device, preset, resolution: int, spec: ConditionSpec, ds,
              start_step: int) -> "_Trainer":
        run = RunDir(cfg.out, main=d.main)
        schedule = Schedule(prediction_type=cfg.prediction_type)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(preset, spec, resolution=resolution).to(device)
        if cfg.channels_last and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        ema = EMA(model, cfg.ema_decay, cfg.ema_warmup, cfg.ema_inv_gamma, cfg.ema_power)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        fwd = model
        if d.enabled:
            fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
        if cfg.compile:
            fwd = torch.compile(fwd)
        step = TrainStep(model, opt, device_type=device.type, amp=autocast_dtype(cfg.precision, device), forward=fwd,
                         scheduler=warmup_cosine(opt, cfg.steps, cfg.warmup), ema=ema, grad_clip=cfg.grad_clip)
        best = math.inf
        if start_step:
            ck, state = load_resume(run, start_step)
            if ck.spec.to_dict() != spec.to_dict():
                raise MediFastError(f"--resume: the data's vocabularies differ from the checkpoint's in {cfg.out}; "
                                    f"resume with the same --data, --split and --condition")
            step.restore(ck, state)
            best = float(state["best_loss"])
        table = ds.table
        stream = IndexStream(sampling_weights(table, cfg.sampling, [column_for(a) for a in cfg.attributes]),
                             cfg.batch_size, cfg.seed, d.rank, d.world_size)
        batches = iter(Batches(ds, stream, start_step * cfg.grad_accum, cfg.workers, device.type == "cuda"))
        return cls(cfg, d, device, resolution, spec, schedule, run, model, ema, step, batches,
                   condition_table(spec, table), start_step, best)

    # -- one optimiser step ------------------------------------------------------------------------
    def micro_batch_loss(self, micro: int) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulate); returns its loss."""
        cfg, device, gen = self.cfg, self.device, self.gen
        idx, images = next(self.batches)
        x0 = images.to(device, non_blocking=True).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        ids = torch.as_tensor(idx)
        cond = {k: v[ids].to(device, non_blocking=True) for k, v in self.cond_all.items()}  # {name: (B,)}
        cond = drop_conditions(cond, self.spec, cfg.cond_drop, gen)
        noise = torch.randn(x0.shape, generator=gen, device=device)  # (B, 3, H, W)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=gen, device=device)  # (B,)
        x_t = self.schedule.add_noise(x0, noise, t)
        fwd = self.step.forward_fn
        # DDP all-reduces on every backward; only the last micro-batch of a step needs it
        sync = (fwd.no_sync() if self.d.enabled and micro < cfg.grad_accum - 1 and hasattr(fwd, "no_sync")
                else contextlib.nullcontext())
        with sync:
            out = self.step.forward(x_t, t, cond)
            loss = F.mse_loss(out.float(), self.schedule.training_target(x0, noise, t))
            self.step.backward(loss, cfg.grad_accum)
        return loss.detach()

    def optimiser_step(self, step: int):
        cfg = self.cfg
        step_generator(self.gen, cfg.seed, self.d.rank, step)
        self.step.zero_grad()
        step_loss = torch.zeros((), device=self.device)
        try:
            for micro in range(cfg.grad_accum):
                step_loss += self.micro_batch_loss(micro) / cfg.grad_accum
            result = self.step.step()
        except torch.OutOfMemoryError:
            raise MediFastError(f"CUDA out of memory at --batch-size {cfg.batch_size} per GPU ({self.resolution} px, "
                                f"--preset {cfg.preset}); lower --batch-size and raise --grad-accum to keep the "
                                f"effective batch") from None
        return step_loss, result

    # -- what happens between steps ----------------------------------------------------------------
    def checkpoint(self, step: int, interval_loss: float) -> None:
        """Checkpoint + resume state, and best.pt when the interval's mean loss is the lowest so far."""
        cfg = self.cfg
        prov = {"trainer": "medi-fast", "cond_drop": cfg.cond_drop, "step": step, "loss": interval_loss,
                "world_size": self.d.world_size, "effective_batch": self.effective_batch, "config": cfg.to_dict()}
        ck = ckpt_io.from_model(self.model, self.schedule, preset=cfg.preset, ema_model=self.ema.model,
                                provenance=prov)
        new_best = min(self.best, interval_loss)
        self.step.save(self.rundir, step, ck, best_loss=new_best, data_position=step * cfg.grad_accum)
        if interval_loss < self.best:
            ckpt_io.save(ck, self.rundir.ckpt_dir / "best.pt")
        self.rundir.prune(cfg.keep_last)
        self.best = new_best

    def grid(self, step: int) -> None:
        cfg = self.cfg
        grid, _, _ = sample_grid(self.ema.model, self.spec, self.schedule, resolution=self.resolution,
                                 rows=cfg.grid_rows, cols=cfg.grid_cols, steps=cfg.grid_steps, seed=cfg.seed,
                                 device=self.device)
        save_png(grid, self.rundir.samples_dir / f"step-{step:08d}.png")

    def run(self) -> dict:
        cfg, d, run = self.cfg, self.d, self.rundir
        if d.main:
            cfg.write(run.root / "config.json")
            run.start_metrics(self.start_step)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not d.main, unit="step", dynamic_ncols=True,
                   desc=f"train (batch {self.effective_batch})")
        log_sum = torch.zeros((), device=self.device)
        ckpt_sum = torch.zeros((), device=self.device)
        log_n, ckpt_n = 0, 0
        t_log, t0 = time.perf_counter(), time.perf_counter()
        last_loss = math.nan
        try:
            self.model.train()
            for step in range(self.start_step, cfg.steps):
                step_loss, result = self.optimiser_step(step)
                done = step + 1
                log_sum += step_loss
                ckpt_sum += step_loss
                log_n += 1
                ckpt_n += 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    loss_v = float(distributed.mean(log_sum / log_n, d))
                    gn = float(distributed.mean(result.grad_norm.float(), d))
                    now = time.perf_counter()
                    sps = log_n / max(now - t_log, 1e-9)
                    run.log({"step": done, "loss": loss_v, "lr": result.lr, "grad_norm": gn,
                             "steps_per_s": round(sps, 4), "images_per_s": round(sps * self.effective_batch, 2),
                             "elapsed_s": round(now - t0, 2)})
                    bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{result.lr:.2e}")
                    if not math.isfinite(loss_v):
                        raise MediFastError(f"the loss became {loss_v} at step {done}; lower --lr or use --precision fp32")
                    last_loss = loss_v
                    log_sum.zero_()
                    log_n, t_log = 0, now
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    interval_loss = float(distributed.mean(ckpt_sum / ckpt_n, d))
                    ckpt_sum.zero_()
                    ckpt_n = 0
                    if d.main:
                        self.checkpoint(done, interval_loss)
                if d.main and cfg.grid_every and (done % cfg.grid_every == 0 or done == cfg.steps):
                    self.grid(done)
        finally:
            bar.close()
            run.close()
        return {"main": d.main, "model": self.model, "ema": self.ema.model, "steps": cfg.steps, "loss": last_loss,
                "best_loss": self.best, "effective_batch": self.effective_batch,
                "checkpoint": str(run.checkpoint_path(cfg.steps)), "out": str(run.root)}
