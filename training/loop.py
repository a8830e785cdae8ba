"""The training loop: DDPM epsilon-prediction MSE (Ho et al. 2020, eq. 14), as published.

    x_0 ~ data, eps ~ N(0, I), t ~ U{0..T-1}
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps          (Schedule.add_noise)
    loss = || eps - eps_theta(x_t, t, c) ||^2                (mean over pixels and batch)

With --prediction-type v_prediction the target is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
(Salimans & Ho 2022), with sample it is x_0 (Schedule.training_target); the checkpoint's schedule
records which, and every sampler converts the output accordingly.

AdamW, warm-up + cosine LR, gradient clipping, EMA, optional autocast / channels_last / compile,
gradient accumulation and DDP.  Randomness that shapes the loss (which rows, t, eps, dropout) is a
pure function of (seed, rank, step), so a resumed run repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medi_fast import checkpoint as ckpt_io
from medi_fast.backends import bf16_native
from medi_fast.conditioning import column_for
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
from .stream import IndexStream, sampling_weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from medi_fast.resources import check_device

    check_device(name)
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        # bf16 only where the GPU has bf16 units: is_bf16_supported() also counts emulation (T4, V100)
        return torch.bfloat16 if device.type == "cuda" and bf16_native(device) else None
    if precision == "fp16" and device.type != "cuda":
        raise MediFastError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def step_generator(gen: torch.Generator, seed: int, rank: int, step: int) -> torch.Generator:
    """Reseed per (seed, rank, step): no generator state to save, and every rank draws its own noise."""
    return gen.manual_seed(((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1))


def rng_state() -> dict:
    """Python, numpy and torch global RNG states as tensors/ints (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    resolution = cfg.resolution or preset.resolution
    factor = 2 ** (len(preset.block_out_channels) - 1)
    if resolution % factor:
        raise MediFastError(f"--resolution {resolution} does not fit --preset {cfg.preset}: it must be divisible by "
                            f"{factor} ({factor.bit_length() - 1} downsamplings); use e.g. {preset.resolution}")
    run = RunDir(cfg.out, main=False)  # read-only until every check has passed
    done = run.complete_steps() if run.ckpt_dir.is_dir() else []
    if done and not cfg.resume:
        raise MediFastError(f"{cfg.out} already holds a run (checkpoint at step {done[-1]}); pass --resume to "
                            f"continue it, or choose another --out")
    if cfg.resume and not done:
        raise MediFastError(f"--resume: {cfg.out} has no complete checkpoint to resume from; drop --resume to start")
    from medi_fast.resources import activation_bytes, check_batch

    # Before the run directory is touched: a batch the device cannot hold is refused, not OOM-killed.
    check_batch(cfg.batch_size, activation_bytes(preset.unet_config(), resolution, training=True), device)
    attrs = cfg.attributes
    ds = dataset if dataset is not None else open_training_data(cfg.data, cfg.split, resolution)
    require_rows(len(ds))
    data_res = int(getattr(ds, "resolution", resolution) or resolution)
    if data_res != resolution:
        raise MediFastError(f"the data's patches are {data_res} px but the model trains at {resolution} px "
                            f"(--preset {cfg.preset}); pass --resolution {data_res} or re-pack the data at {resolution} px")
    table = ds.table
    spec = build_spec(table, attrs, preset.d_t)
    run = RunDir(cfg.out, main=d.main)
    schedule = Schedule(prediction_type=cfg.prediction_type)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(preset, spec, resolution=resolution)
    start_step, state = 0, None
    if cfg.resume:
        start_step = done[-1]
        ck = ckpt_io.load(run.checkpoint_path(start_step))
        if ck.spec.to_dict() != spec.to_dict():
            raise MediFastError(f"--resume: the data's vocabularies differ from the checkpoint's in {cfg.out}; "
                                f"resume with the same --data, --split and --condition")
        model.load_state_dict(ck.state_dict)
        state = run.load_state(start_step)
    model.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup, cfg.ema_inv_gamma, cfg.ema_power)
    if cfg.resume:
        ema.model.load_state_dict(ck.ema_state_dict if ck.ema_state_dict is not None else ck.state_dict)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = warmup_cosine(opt, cfg.steps, cfg.warmup)
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    best = math.inf
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        best = float(state["best_loss"])

    fwd = model
    if d.enabled:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    cond_all = condition_table(spec, table)
    cond_cols = [column_for(a) for a in attrs]
    weights = sampling_weights(table, cfg.sampling, cond_cols)
    stream = IndexStream(weights, cfg.batch_size, cfg.seed, d.rank, d.world_size)
    batches = iter(Batches(ds, stream, start_step * cfg.grad_accum, cfg.workers, device.type == "cuda"))
    gen = torch.Generator(device=device)
    T = schedule.num_train_timesteps
    effective = cfg.batch_size * d.world_size * cfg.grad_accum

    checkpointer = _Checkpointer(cfg, run, schedule, model, ema, opt, sched, scaler, d.world_size, effective)
    if d.main:
        cfg.write(run.root / "config.json")
        run.start_metrics(start_step)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not d.main, unit="step", dynamic_ncols=True,
               desc=f"train (batch {effective})")
    log_sum = torch.zeros((), device=device)
    ckpt_sum = torch.zeros((), device=device)
    log_n, ckpt_n = 0, 0
    t_log, t0 = time.perf_counter(), time.perf_counter()
    last_loss = math.nan
    try:
        model.train()
        for step in range(start_step, cfg.steps):
            step_generator(gen, cfg.seed, d.rank, step)
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            try:
                for micro in range(cfg.grad_accum):
                    idx, images = next(batches)
                    x0 = images.to(device, non_blocking=True).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
                    if channels_last:
                        x0 = x0.contiguous(memory_format=torch.channels_last)
                    ids = torch.as_tensor(idx)
                    cond = {k: v[ids].to(device, non_blocking=True) for k, v in cond_all.items()}  # {name: (B,)}
                    cond = drop_conditions(cond, spec, cfg.cond_drop, gen)
                    noise = torch.randn(x0.shape, generator=gen, device=device)  # (B, 3, H, W)
                    t = torch.randint(0, T, (x0.shape[0],), generator=gen, device=device)  # (B,)
                    x_t = schedule.add_noise(x0, noise, t)
                    sync = (fwd.no_sync() if d.enabled and micro < cfg.grad_accum - 1 and hasattr(fwd, "no_sync")
                            else contextlib.nullcontext())
                    with sync:
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            out = fwd(x_t, t, cond)
                        loss = F.mse_loss(out.float(), schedule.training_target(x0, noise, t))
                        scaler.scale(loss / cfg.grad_accum).backward()
                    step_loss += loss.detach() / cfg.grad_accum
                scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            except torch.OutOfMemoryError:
                raise MediFastError(f"CUDA out of memory at --batch-size {cfg.batch_size} per GPU ({resolution} px, "
                                    f"--preset {cfg.preset}); lower --batch-size and raise --grad-accum to keep the "
                                    f"effective batch") from None
            lr_used = opt.param_groups[0]["lr"]
            sched.step()
            ema.update(model)
            done_steps = step + 1
            log_sum += step_loss
            ckpt_sum += step_loss
            log_n += 1
            ckpt_n += 1
            bar.update(1)
            if done_steps % cfg.log_every == 0 or done_steps == cfg.steps:
                loss_v = float(distributed.mean(log_sum / log_n, d))
                gn = float(distributed.mean(grad_norm.float(), d))
                now = time.perf_counter()
                sps = log_n / max(now - t_log, 1e-9)
                run.log({"step": done_steps, "loss": loss_v, "lr": lr_used, "grad_norm": gn,
                         "steps_per_s": round(sps, 4), "images_per_s": round(sps * effective, 2),
                         "elapsed_s": round(now - t0, 2)})
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr_used:.2e}")
                if not math.isfinite(loss_v):
                    raise MediFastError(f"the loss became {loss_v} at step {done_steps}; lower --lr or use --precision fp32")
                last_loss = loss_v
                log_sum.zero_()
                log_n, t_log = 0, now
            if done_steps % cfg.checkpoint_every == 0 or done_steps == cfg.steps:
                interval_loss = float(distributed.mean(ckpt_sum / ckpt_n, d))
                ckpt_sum.zero_()
                ckpt_n = 0
                if d.main:
                    best = checkpointer.save(done_steps, interval_loss, best)
            if d.main and cfg.grid_every and (done_steps % cfg.grid_every == 0 or done_steps == cfg.steps):
                grid, _, _ = sample_grid(ema.model, spec, schedule, resolution=resolution, rows=cfg.grid_rows,
                                         cols=cfg.grid_cols, steps=cfg.grid_steps, seed=cfg.seed, device=device)
                save_png(grid, run.samples_dir / f"step-{done_steps:08d}.png")
    finally:
        bar.close()
        run.close()
    return {"main": d.main, "model": model, "ema": ema.model, "steps": cfg.steps, "loss": last_loss, "best_loss": best, "effective_batch": effective,
            "checkpoint": str(run.checkpoint_path(cfg.steps)), "out": str(run.root)}


@dataclass
class _Checkpointer:
    """Writes checkpoint + resume state (in that order), and best.pt when an interval's mean loss is the lowest."""

    cfg: object
    run: RunDir
    schedule: Schedule
    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    world_size: int
    effective_batch: int

    def save(self, step: int, interval_loss: float, best: float) -> float:
        cfg, run = self.cfg, self.run
        prov = {"trainer": "medi-fast", "cond_drop": cfg.cond_drop, "step": step, "loss": interval_loss, "world_size": self.world_size,
                "effective_batch": self.effective_batch, "config": cfg.to_dict()}
        ck = ckpt_io.from_model(self.model, self.schedule, preset=cfg.preset, ema_model=self.ema.model,
                                provenance=prov)
        path = ckpt_io.save(ck, run.checkpoint_path(step))
        new_best = min(best, interval_loss)
        state = {"step": step, "checkpoint": path.name, "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "ema": self.ema.state_dict(),
                 "rng": rng_state(), "best_loss": new_best, "data_position": step * cfg.grad_accum}
        run.save_state(path, state)
        if interval_loss < best:
            ckpt_io.save(ck, run.ckpt_dir / "best.pt")
        run.prune(cfg.keep_last)
        return new_best
