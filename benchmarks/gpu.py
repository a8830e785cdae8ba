"""First contact with a GPU, and the GPU rows of RESULTS.md: one command that fits a time budget.

    python benchmarks/gpu.py --budget-s 480     # on a GPU machine
    python benchmarks/gpu.py --dry-run          # tiny preset, CPU paths, 2-step solvers: the script end to end anywhere

What it runs, in this order (what matters most first, so a run cut short still answers it):

1. The device's own matmul rates (bf16, fp16, fp32 with TF32 off; TFLOP/s of an N x N x N product):
   the ceilings every figure is read against.
2. ``tiny-32`` through every path (``PATHS``): a wrong result shows up here in seconds.
3. ``--preset`` (medi-128) at ``--batch`` (64) through every path.
4. Training steps/s per precision (tiny-32, then the preset at ``--train-batch``).
5. A one-rank NCCL process group with the DistributedDataParallel wrapper on the GPU (gloo on a CPU).

Per preset and path: the relative error of one eps prediction and the grey-level error of DDIM-10
images (same noise) against fp32 with TF32 off, NaN/inf; the first call's time (a compiled path
compiles there); images/s at DDIM-100 and at 20 steps of the fast solvers; the peak memory torch
allocated and the memory the device reports in use (``cudaMemGetInfo``, which also sees other
allocators); the ratio to fp32 eager and the fraction of the matching matmul rate reached.  For
``tiny-32`` the solvers run whole; for the large preset one timed DDIM segment of ``--segment``
steps per path gives the seconds per step and the solvers' figures are extrapolated from it (a
solver step is one UNet call plus element-wise work; rows say ``extrapolated_from_steps``).

Every step runs in its own ``try``: its error is recorded in its row and the run goes on.  Before a
step its cost is estimated; a step that would not fit in what is left of ``--budget-s`` is recorded
as skipped.  The JSON (``results/gpu-<gpu>.json``, or ``--json PATH``) is rewritten after every row,
so a run killed at its limit leaves everything it measured.  ``run_all.py --report-only`` shows it.
A figure is a claim only from a run on a GPU (RESULTS.md names the machine of each).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, random_checkpoint  # noqa: E402


@dataclass(frozen=True)
class GpuPath:
    """One way of running the UNet: a registered backend (each sets its own precision, TF32 included)."""
    name: str
    backend: str
    precision: str = "fp32"  # which matmul rate its fraction is read against
    file: str = "checkpoint"  # which model file it opens: checkpoint, onnx, fp16 (graph) or engine


PATHS = (
    GpuPath("fp32", "torch"),  # the reference every error is measured against (TF32 off)
    GpuPath("tf32", "torch-tf32", precision="tf32"),
    GpuPath("fp16-autocast", "torch-fp16", precision="fp16"),
    GpuPath("bf16-autocast", "torch-bf16", precision="bf16"),
    GpuPath("compile", "torch-compile", precision="fp16"),
    GpuPath("ort-cuda", "ort-cuda", file="onnx"),
    GpuPath("ort-trt", "ort-trt", precision="fp16", file="fp16"),  # ort-trt runs a graph in its own precision
    GpuPath("tensorrt", "tensorrt", precision="fp16", file="engine"),
)
# On a CPU the TF32 path is the fp32 one (there is no TF32 there): the dry run still exercises its row.
DRY_PATHS = (GpuPath("fp32", "torch"), GpuPath("tf32", "torch", precision="tf32"),
             GpuPath("ort-cpu", "ort-cpu", file="onnx"))
SOLVERS = (("ddim", 100), ("dpmpp-2m-clip", 20), ("unipc-clip", 20))
TRAIN_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
IMAGE_STEPS = 10  # DDIM steps of the image-error check


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 for fp32 matmuls and convolutions on or off (cuDNN allows it by default), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5, allow_tf32: bool = False) -> float:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs), best of ``repeats`` after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    with tf32(allow_tf32):
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def device_used_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**30


def error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


class Record:
    """The JSON file, rewritten (atomically) after every row: a killed run keeps what it measured."""

    def __init__(self, path: Path, extra: dict):
        self.path, self.rows, self.extra = path, [], extra

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        status = row.get("status", "")
        what = " ".join(str(row[k]) for k in ("section", "preset", "path", "precision", "solver", "batch") if k in row)
        print(f"[gpu] {what}: {status}" + (f" {row['images_per_s']:.2f} img/s" if "images_per_s" in row else ""),
              flush=True)
        return row

    def write(self) -> None:
        import json

        from medi_fast.io import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"name": self.path.stem, "machine": machine_info(),
                   "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]), "rows": self.rows, **self.extra}
        atomic_write_text(self.path, json.dumps(payload, indent=1, default=float))


# -- the paths -----------------------------------------------------------------------------------
def model_files(preset: str, work: Path, batches: tuple[int, ...], need: set[str]) -> dict:
    """The model files the paths open: a random checkpoint, its fp32 ONNX (and engine) when needed."""
    from medi_fast import checkpoint
    from medi_fast.backends.contract import BatchRange
    from medi_fast.engines.export import ExportConfig, export_onnx

    _, ck = random_checkpoint(preset, work, ["LUAD", "LUSC"], ["05", "44"])
    files = {"checkpoint": ck}
    if need & {"onnx", "fp16", "engine"}:
        files["onnx"] = export_onnx(checkpoint.load(ck), work / preset / "model.onnx",
                                    ExportConfig(batch=BatchRange(1, max(batches), max(batches))))
    if "fp16" in need:  # the default-stage fp16 graph an export directory gives ort-trt
        from medi_fast.engines.gate import write_fp16_ungated

        files["fp16"] = write_fp16_ungated(files["onnx"], work / preset / "model.fp16.onnx")
    return files


def open_path(p: GpuPath, files: dict, work: Path):
    from medi_fast import backends

    if p.file == "engine":
        from medi_fast.engines.tensorrt_build import cached_engine

        return backends.create(p.backend, backends.open_model(cached_engine(files["onnx"], work / "engines")))
    return backends.create(p.backend, backends.open_model(files[p.file]))


class Runner:
    """A path's denoiser, with the path it runs."""

    def __init__(self, path: GpuPath, denoiser):
        self.path, self.denoiser = path, denoiser
        self.device = getattr(denoiser, "device", torch.device("cpu"))

    def __call__(self, x, t, cond):
        return self.denoiser(x, t, cond)

    def close(self):
        close = getattr(self.denoiser, "close", None)
        if close is not None:
            close()


def inputs(info, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, info.resolution, info.resolution, generator=g)
    cond = {k: torch.zeros_like(v) for k, v in info.spec.null(batch).items()}  # the first class and site
    return x.to(device), {k: v.to(device) for k, v in cond.items()}


def ddim_images(runner: Runner, info, batch: int, steps: int) -> np.ndarray:
    from medi_fast.pixels import to_uint8
    from medi_fast.samplers import get_sampler, timesteps_for

    x, cond = inputs(info, batch, runner.device, seed=1)
    with torch.no_grad():
        out = get_sampler("ddim")(runner, x, timesteps_for("ddim", info.schedule, steps), info.schedule, cond)
    return to_uint8(out.float().cpu())


def timed(runner: Runner, info, solver: str, steps: int, batch: int, segment: int | None = None) -> float:
    """Seconds of ``solver`` at ``steps`` (or of its first ``segment`` steps) at ``batch``."""
    from medi_fast.backends import sampling_threads
    from medi_fast.samplers import get_sampler, timesteps_for

    x, cond = inputs(info, batch, runner.device)
    ts = timesteps_for(solver, info.schedule, steps)
    if segment is not None:
        ts = ts[:segment]
    with sampling_threads(runner), torch.no_grad():
        sync(runner.device)
        t0 = time.perf_counter()
        get_sampler(solver)(runner, x, ts, info.schedule, cond)
        sync(runner.device)
    return time.perf_counter() - t0


def check_path(runner: Runner, info, batch: int, reference: dict | None) -> dict:
    """First call, eps and image error against the reference, memory: one row's accuracy fields."""
    device = runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x, cond = inputs(info, batch, device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        eps = runner(x, t, cond).float().cpu()
    sync(device)
    first_call = time.perf_counter() - t0
    images = ddim_images(runner, info, batch, IMAGE_STEPS)
    row = {"first_call_s": first_call, "finite": bool(torch.isfinite(eps).all()),
           "torch_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "device_used_gib": device_used_gib(device)}
    if reference is not None:
        ref_eps, ref_images = reference["eps"], reference["images"]
        row["eps_rel_err"] = float((eps - ref_eps).norm() / ref_eps.norm())
        diff = np.abs(images.astype(np.int16) - ref_images.astype(np.int16))
        row.update(image_max_levels=int(diff.max()), image_mean_levels=float(diff.mean()),
                   image_frac_over_8=float((diff > 8).mean()))
    return row, {"eps": eps, "images": images}


def run_preset(rec: Record, budget: Budget, preset: str, batch: int, paths, work: Path, args, rates: dict,
               gflop: float, extrapolate: bool) -> None:
    from medi_fast import backends

    base = {"section": "inference", "preset": preset, "batch": batch}
    # What a path costs before its timing: open + first call + DDIM-10 check (a compile takes longer).
    est = {"tiny-32": 20.0}.get(preset, 45.0)
    try:
        need = {p.file for p in paths if backends.BACKENDS[p.backend].availability()[0]}
        files = model_files(preset, work / preset, (batch,), need)
    except Exception as e:
        rec.add({**base, "path": "(model files)", "status": f"FAIL {error_text(e)}"})
        return
    info = backends.open_model(files["checkpoint"])
    opened, reference, checks = {}, None, {}
    for p in paths:
        ok, why = backends.BACKENDS[p.backend].availability()
        if not ok:
            rec.add({**base, "path": p.name, "backend": p.backend, "status": f"absent: {why}"})
            continue
        cost = est * (3 if p.backend == "torch-compile" and preset != "tiny-32" else 1)
        if not budget.fits(cost + 30):
            rec.add({**base, "path": p.name, "backend": p.backend,
                     "status": f"skipped: ~{cost:.0f} s needed, {budget.left():.0f} s of the budget left"})
            continue
        try:
            t_open = time.perf_counter()
            runner = Runner(p, open_path(p, files, work))
            open_s = time.perf_counter() - t_open
            fields, outputs = check_path(runner, info, batch, reference)
        except Exception as e:
            traceback.print_exc()
            rec.add({**base, "path": p.name, "backend": p.backend, "status": f"FAIL {error_text(e)}"})
            continue
        if reference is None and p.name == paths[0].name:
            reference = outputs
        opened[p.name] = runner
        checks[p.name] = {"open_s": open_s, **fields}
    if not opened:
        return
    # Timing: the paths alternate inside each round, best round per path.
    plan = [("ddim", 100, args.segment)] if extrapolate else [(s, n, None) for s, n in args.solvers]
    best = {(n, s): float("inf") for n in opened for s, _, _ in plan}
    per_round = sum(1 for _ in opened) * len(plan)
    rounds = 0
    for r in range(args.repeats):
        # a round costs about what the checks did, per path: stop alternating when it would not fit
        if r and not budget.fits(10 + per_round * 5):
            break
        for solver, steps, segment in plan:
            for name, runner in opened.items():
                try:
                    if r == 0:  # one untimed warm-up per path and solver (autotuning, graph capture)
                        timed(runner, info, solver, steps, batch, segment=2 if extrapolate else None)
                    best[(name, solver)] = min(best[(name, solver)], timed(runner, info, solver, steps, batch, segment))
                except Exception as e:
                    checks[name]["status"] = f"FAIL {error_text(e)}"
        rounds += 1
    fp32_step = None
    for name, runner in opened.items():
        row_base = {**base, "path": name, "backend": runner.path.backend, **checks[name], "rounds": rounds}
        if "status" in checks[name]:
            rec.add(row_base)
            continue
        for solver, steps, segment in plan:
            seconds = best[(name, solver)]
            per_step = seconds / (segment or steps)
            if name == paths[0].name and solver == "ddim":
                fp32_step = per_step
            solver_rows = [(solver, steps)] if not extrapolate else list(args.solvers)
            for s_name, s_steps in solver_rows:
                ips = batch / (per_step * s_steps)
                row = {**row_base, "status": "ok", "solver": s_name, "steps": s_steps, "images_per_s": ips,
                       "seconds_per_step": per_step}
                if extrapolate:
                    row["extrapolated_from_steps"] = segment
                if fp32_step is not None:
                    row["vs_fp32_eager"] = fp32_step / per_step
                rate = rates.get(runner.path.precision)
                if rate:
                    row["fraction_of_matmul_rate"] = batch * gflop / per_step / 1e3 / rate
                rec.add(row)
    for runner in opened.values():
        runner.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- training --------------------------------------------------------------------------------------
AMP = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def train_setup(preset: str, precision: str, batch: int, device: torch.device, ddp: bool = False):
    """A random ``preset`` model, AdamW and the project's training step (training/step.py) on a fixed batch."""
    from medi_fast.model import PRESETS, build_model
    from medi_fast.schedule import Schedule
    from medi_fast.training.step import TrainStep

    torch.manual_seed(0)
    model = build_model(preset, classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44"]}).to(device)
    channels_last = AMP[precision] is not None and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index or 0] if device.type == "cuda" else None) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = TrainStep(model, opt, device_type=device.type, amp=AMP[precision], forward=forward, grad_clip=1.0)
    g = torch.Generator().manual_seed(1)
    r = PRESETS[preset].resolution
    x0 = torch.rand(batch, 3, r, r, generator=g) * 2 - 1
    noise = torch.randn(batch, 3, r, r, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    x_t = Schedule().add_noise(x0, noise, t).to(device)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    cond = {"class": (torch.arange(batch) % 2).to(device), "tss": (torch.arange(batch) % 2).to(device)}
    return model, step, (x_t, t.to(device), cond), noise.to(device)


def one_step(step, inputs, target) -> float:
    step.zero_grad()
    loss = torch.nn.functional.mse_loss(step.forward(*inputs).float(), target)
    step.backward(loss)
    step.step()
    return float(loss.detach())


def train_rate(preset: str, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """Steps/s of the training step in one precision (after two warm-up steps) and its losses."""
    model, step, inputs, target = train_setup(preset, precision, batch, device)
    with tf32(precision == "tf32"):
        first = [one_step(step, inputs, target) for _ in range(2)]
        sync(device)
        t0 = time.perf_counter()
        losses = [one_step(step, inputs, target) for _ in range(steps)]
        sync(device)
    seconds = time.perf_counter() - t0
    out = {"steps": steps, "steps_per_s": steps / seconds, "images_per_s": batch * steps / seconds,
           "first_loss": first[0], "last_loss": losses[-1], "finite": all(np.isfinite(first + losses))}
    if device.type == "cuda":
        out["torch_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, step
    return out


def training_rows(rec: Record, budget: Budget, preset: str, batch: int, device: torch.device, steps: int,
                  precisions) -> None:
    for precision in precisions:
        base = {"section": "training", "preset": preset, "precision": precision, "batch": batch}
        if not budget.fits(30 if preset == "tiny-32" else 60):
            rec.add({**base, "status": f"skipped: {budget.left():.0f} s of the budget left"})
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rec.add({**base, "status": "ok", **train_rate(preset, precision, batch, steps, device)})
        except Exception as e:
            traceback.print_exc()
            rec.add({**base, "status": f"FAIL {error_text(e)}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def ddp_row(rec: Record, budget: Budget, device: torch.device) -> None:
    """doctor's one-rank process group check (NCCL on a GPU, gloo on a CPU) with the DDP wrapper."""
    from medi_fast.doctor import check_ddp_one_rank

    base = {"section": "ddp", "world_size": 1}
    if not budget.fits(20):
        rec.add({**base, "status": f"skipped: {budget.left():.0f} s of the budget left"})
        return
    row = check_ddp_one_rank(device)
    rec.add({**base, "check": row.path, "status": row.status if row.status != "FAIL" else f"FAIL {row.detail}",
             **row.metrics})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny-32, CPU paths, 2-step solvers: the script end to end")
    ap.add_argument("--budget-s", type=float, default=480, help="seconds the whole run may take (default 480)")
    ap.add_argument("--preset", default="medi-128")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--segment", type=int, default=5, help="DDIM steps timed per path for the large preset")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=8192, help="N of the N x N x N matmuls")
    ap.add_argument("--paths", default=None, help="comma-separated path names (default: all)")
    ap.add_argument("--no-tiny", action="store_true", help="skip tiny-32 (inference and training): --preset only")
    ap.add_argument("--json", type=Path, default=None, help="where to write (default results/gpu-<gpu>.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("benchmarks/gpu.py needs a CUDA GPU; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "dry-run"
    all_paths = PATHS if cuda else DRY_PATHS
    if args.paths:
        wanted = args.paths.split(",")
        unknown = [w for w in wanted if w not in {p.name for p in all_paths}]
        if unknown:
            print(f"unknown path(s) {unknown}; choose from {[p.name for p in all_paths]}", file=sys.stderr)
            return 2
        by_name = {p.name: p for p in all_paths}
        all_paths = tuple(by_name[w] for w in wanted)  # in the order given: the first is the reference
    args.solvers = [(s, 2) for s, _ in SOLVERS] if args.dry_run else list(SOLVERS)
    if args.dry_run:
        args.preset, args.batch, args.segment, args.train_batch, args.matmul = "tiny-32", 2, 2, 2, 256

    from medi_fast.model import PRESETS

    path = args.json or RESULTS / f"gpu-{slug(gpu)}.json"
    extra = {"gpu": gpu, "dry_run": args.dry_run, "budget_s": args.budget_s, "torch": torch.__version__,
             "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
             "matmul": {}}
    rec = Record(path, extra)
    rates = extra["matmul"]
    kinds = (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False), ("fp32", torch.float32, False),
             ("tf32", torch.float32, True))
    for name, dtype, allow in kinds:
        if not cuda and name != "fp32":
            continue
        try:
            rates[name] = matmul_rate(args.matmul, dtype, device, allow_tf32=allow)
        except Exception as e:
            rates[f"{name}_error"] = error_text(e)
    rec.write()
    print(f"[gpu] {gpu}: matmul TFLOP/s {', '.join(f'{k} {v:.3g}' for k, v in rates.items() if isinstance(v, float))}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="medi-gpu-bench-") as tmp:
        work = Path(tmp)
        presets = ["tiny-32"] if args.preset == "tiny-32" else ["tiny-32", args.preset]
        if args.no_tiny and args.preset != "tiny-32":
            presets = [args.preset]
        for preset in presets:
            large = preset != "tiny-32"
            run_preset(rec, budget, preset, args.batch, all_paths, work, args, rates,
                       PRESETS[preset].gflop_per_step, extrapolate=large)
        for preset in presets:
            precisions = [p for p in TRAIN_PRECISIONS if cuda or p in ("fp32", "bf16")]
            training_rows(rec, budget, preset, args.train_batch if preset != "tiny-32" else 8, device,
                          2 if args.dry_run else 10, precisions)
        ddp_row(rec, budget, device)
    extra["seconds"] = args.budget_s - budget.left()
    rec.write()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
