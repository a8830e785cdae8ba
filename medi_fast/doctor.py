"""``medi-fast doctor``: what this machine has, and (``--check``) whether each path works on it.

The environment: Python, torch with its CUDA and cuDNN, each GPU (name, compute capability, free
memory), onnxruntime and its providers (and a CPU onnxruntime installed over onnxruntime-gpu),
TensorRT, OpenVINO, ray.

The self-test (``run_checks``), on a small random model (or ``model=FILE``):

- inference: every backend that says it is available here runs the file an export directory gives
  it here (``backends.EXPORT_FILES``: the fp16 graph for the ONNX Runtime GPU backends, an engine
  built from the fp16 graph for ``tensorrt``, the fp32 graph otherwise) and is compared with torch
  fp32 on the CPU on one probe set (backends/accuracy.check_denoiser: timesteps 0..999, every id, continuous values and
  NaN; a DDIM-10 run from the same x_T), then timed on a short DDIM run (images/s).  Backends that
  are not available are listed with the reason.
- training: a few SGD steps of the same model in each precision the device offers (fp32,
  channels_last, bf16/fp16 autocast with the loss scaler, torch.compile on CUDA), taken by the
  trainer's own ``training.step.TrainStep``, compared with CPU fp32 on the same batch and seed
  (first-step loss, parameter change).

Each row has a bound; a row over its bound is ``FAIL`` and ``failures()`` lists it.  This is an
orchestrator (like the demo): it may import the engines and training code, lazily.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .backends.accuracy import BF16_REL, FP16_REL, OPENVINO_BF16_REL
from .errors import MediFastError

PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino", "ray", "diffusers")
# Relative eps error allowed per backend against torch fp32 on the CPU: fp32 paths agree to float
# rounding; fp16 to 1e-2 (the export parity bound); bf16 has 8 mantissa bits, hence 3e-2; TF32 has
# 10 (an H200 gave 7.6e-4 on tiny-32), hence 3e-3.
FP32_REL, TF32_REL = 1e-4, 3e-3
REL_BOUND = {"torch-fp16": FP16_REL, "torch-bf16": BF16_REL, "torch-compile": FP16_REL, "torch-tf32": TF32_REL,
             "openvino-bf16": OPENVINO_BF16_REL,
             "ort-trt": FP16_REL, "tensorrt": FP16_REL, "ort-cuda": 1e-3}  # ort-cuda: fp32 with TF32 convolutions allowed
# Training: relative difference of the parameter change after the steps, vs CPU fp32.
# One rank under DDP against no wrapper, deterministic kernels: equal up to the all-reduce's rounding.
DDP_ONE_RANK_BOUND = 1e-6
TRAIN_BOUND = {"fp32": 1e-2, "channels_last": 1e-2, "bf16": 1e-1, "fp16": 5e-2, "compiled": 1e-1}


@dataclass
class Row:
    area: str  # "inference" | "training"
    path: str  # backend name or training precision
    status: str  # "ok" | "FAIL" | "absent" | "skipped"
    detail: str = ""
    metrics: dict = field(default_factory=dict)


@dataclass
class Report:
    environment: dict
    rows: list[Row] = field(default_factory=list)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def to_dict(self, complete: bool = True) -> dict:
        """``complete`` False: written while the checks still run (a run cut short leaves its rows)."""
        return {"environment": self.environment, "rows": [asdict(r) for r in self.rows],
                "ok": not self.failures(), "complete": complete}


# -- environment -------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def onnxruntime_collision() -> str:
    """One line when both ONNX Runtime distributions are installed, else "".

    ``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` package directory
    (onnxruntime issue 26996): whichever was installed last owns the shared files, so the GPU
    providers may be missing although ``onnxruntime-gpu`` is listed.
    """
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    if not (cpu and gpu):
        return ""
    return (f"onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed and overwrite each other's files; "
            f"pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu (or the CPU "
            f"onnxruntime alone on a machine without a GPU)")


def environment() -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                         "free_gib": round(free / 2**30, 1), "total_gib": round(total / 2**30, 1)})
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "torch_cuda": torch.version.cuda, "cudnn": cudnn, "gpus": gpus, "onnxruntime_providers": providers,
            "packages": {p: _version(p) for p in PACKAGES}, "cpu_threads": torch.get_num_threads(),
            "onnxruntime_collision": onnxruntime_collision() or None}


def format_environment(env: dict) -> str:
    lines = [f"python       {env['python']} ({env['platform']})",
             f"torch        {env['packages']['torch']} (CUDA {env['torch_cuda'] or '-'}, cuDNN {env['cudnn'] or '-'})"]
    if env["gpus"]:
        for g in env["gpus"]:
            lines.append(f"gpu {g['index']}        {g['name']} (sm {g['compute_capability']}, "
                         f"{g['free_gib']} of {g['total_gib']} GiB free)")
    else:
        lines.append("gpu          none (torch sees no CUDA device)")
    lines.append(f"onnxruntime  {env['packages']['onnxruntime'] or env['packages']['onnxruntime-gpu'] or 'absent'} "
                 f"(providers: {', '.join(env['onnxruntime_providers']) or '-'})")
    if env.get("onnxruntime_collision"):
        lines.append(f"             COLLISION: {env['onnxruntime_collision']}")
    for p in ("tensorrt", "openvino", "ray", "diffusers"):
        lines.append(f"{p:<12} {env['packages'][p] or 'absent'}")
    return "\n".join(lines)


# -- inference ---------------------------------------------------------------------------------
def _small_model(workdir: Path) -> Path:
    from . import checkpoint
    from .model import build_model
    from .schedule import Schedule

    torch.manual_seed(0)
    model = build_model("tiny-32", classes=["LUAD", "LUSC", "BRCA"], metadata={"tss": ["05", "44"], "age": None})
    path = workdir / "doctor.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32", provenance={"kind": "doctor"}), path)
    return path


def _model_files(workdir: Path, model) -> dict[str, Path]:
    """kind -> file: the checkpoint, its ONNX export and the export's default-stage fp16 graph ("fp16";
    the engine is built on demand)."""
    from .backends.contract import BatchRange
    from .engines.export import ExportConfig, export_onnx

    model = Path(model) if model is not None else _small_model(workdir)
    if model.suffix == ".onnx":
        return {"onnx": model}
    if model.suffix not in (".pt", ".safetensors"):
        raise MediFastError(f"doctor --model takes a checkpoint (.pt/.safetensors) or an .onnx, not {model.name}; "
                            f"omit --model to use a small random model")
    from . import checkpoint

    from .engines.gate import write_fp16_ungated

    onnx_path = export_onnx(checkpoint.load(model), workdir / "doctor.onnx", ExportConfig(batch=BatchRange(1, 8, 16)))
    fp16_path = write_fp16_ungated(onnx_path, workdir / "doctor.fp16.onnx")
    return {"checkpoint": model, "onnx": onnx_path, "fp16": fp16_path}


def _images_per_s(denoiser, info, steps: int, batch: int) -> float:
    from .backends import sampling_threads
    from .samplers import ddim

    dev = getattr(denoiser, "device", torch.device("cpu"))
    res = info.resolution
    x = torch.randn(batch, 3, res, res, device=dev)
    cond = {k: v.to(dev) for k, v in info.spec.null(batch).items()}
    ts = info.schedule.timesteps(steps)
    with sampling_threads(denoiser), torch.no_grad():
        ddim(denoiser, x.clone(), ts[-1:], info.schedule, cond)  # warm-up (lazy allocations, graph capture)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        ddim(denoiser, x.clone(), ts, info.schedule, cond)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return batch / (time.perf_counter() - t0)


def check_inference(workdir: Path, model=None, *, ddim_steps: int = 10, timed_steps: int = 10, batch: int = 4,
                    engine_cache=None, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    from . import backends
    from .backends.accuracy import IMAGE_LEVELS, check_denoiser

    files = _model_files(workdir, model)
    infos = {kind: backends.open_model(p) for kind, p in files.items()}
    onnx_info = infos["onnx"]
    # the backends an export directory hands its fp16 graph to: the same file here
    fp16_backends = dict(backends.EXPORT_FILES)["model.fp16.onnx"] if "fp16" in infos else ()
    if "checkpoint" in infos:
        reference, ref_name = backends.create("torch", infos["checkpoint"], device="cpu"), "torch fp32 (CPU)"
    else:
        reference, ref_name = backends.create("ort-cpu", onnx_info), "ort-cpu fp32"
    rows = []
    add = _collector(rows, on_row)
    for name, entry in sorted(backends.BACKENDS.items(), key=lambda kv: -kv[1].rank):
        ok, why = entry.availability()
        if not ok:
            add(Row("inference", name, "absent", why))
            continue
        kind = next((k for k in entry.kinds if k in infos or k == "tensorrt"), None)
        if kind is None or (kind == "tensorrt" and "onnx" not in infos):
            add(Row("inference", name, "skipped", f"needs a {'/'.join(entry.kinds)} file"))
            continue
        if name == "torch-compile" and not torch.cuda.is_available():
            add(Row("inference", name, "skipped", "compiles for minutes on a CPU; checked where CUDA is present"))
            continue
        bound = FP16_REL if name in fp16_backends else REL_BOUND.get(name, FP32_REL)
        # A DDIM run amplifies a reduced precision's eps rounding chaotically on random weights (150 levels
        # for bf16 at 1e-2 eps error on the doctor's model, 1 level on the same model trained 200 steps):
        # its images are gated on a trained --model only; fp32 paths agree to rounding on any weights.
        image_bound = IMAGE_LEVELS if bound <= FP32_REL or model is not None else None
        try:
            if kind == "tensorrt":
                from .engines.tensorrt_build import cached_engine

                info = backends.open_model(cached_engine(files["onnx"], engine_cache or workdir / "engines"))
            else:
                info = infos["fp16" if name in fp16_backends else kind]
            den = backends.create(name, info)
            try:
                check = check_denoiser(reference, den, onnx_info.contract, onnx_info.spec, rel_bound=bound,
                                       ddim_steps=ddim_steps, image_bound=image_bound)
                metrics = {**check.to_dict(), "images_per_s": _images_per_s(den, info, timed_steps, batch)}
            finally:
                den.close()
        except MediFastError as e:
            add(Row("inference", name, "FAIL", str(e)))
            continue
        except Exception as e:  # a GPU path's own error (CUDA, TensorRT, ORT): reported, not raised
            add(Row("inference", name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            continue
        what = f"{info.path.name} vs {ref_name}" + ("" if image_bound else "; images not gated on random weights "
                                                     "(--model CKPT gates them)")
        add(Row("inference", name, "ok" if check.ok else "FAIL",
                        what if check.ok else f"{check.summary()}, {what}", metrics))
    reference.close()
    return rows


# -- training ----------------------------------------------------------------------------------
def _train_steps(device: torch.device, variant: str, steps: int = 3, seed: int = 0,
                 ddp_rank: tuple[int, int] | None = None) -> tuple[float, torch.Tensor]:
    """(first-step loss, parameter change) after ``steps`` SGD steps on a fixed batch (with
    ``ddp_rank=(rank, world)``: under DistributedDataParallel, on this rank's slice of the batch)."""
    from .backends import bf16_native
    from .model import build_model
    from .schedule import Schedule
    from .training.step import TrainStep

    torch.manual_seed(seed)
    model = build_model("tiny-32", classes=["LUAD", "LUSC", "BRCA"], metadata={"tss": ["05", "44"], "age": None})
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    model = model.to(device)
    if variant in ("channels_last", "bf16", "fp16", "compiled"):
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant == "compiled" else model
    if ddp_rank is not None:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "compiled": torch.bfloat16}.get(variant)
    if variant == "compiled" and not bf16_native(device):
        amp = torch.float16
    # the trainer's own step (autocast, loss scaler, optimiser step), without clipping: plain SGD steps
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.05), device_type=device.type, amp=amp,
                     forward=forward)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(8, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    cond = {"class": torch.arange(8) % 4, "tss": torch.arange(8) % 3, "age": torch.linspace(20, 90, 8)}
    x_t = Schedule().add_noise(x0, noise, t)
    x_t, noise, t = x_t.to(device), noise.to(device), t.to(device)
    cond = {k: v.to(device) for k, v in cond.items()}
    if variant in ("channels_last", "bf16", "fp16", "compiled"):
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    if ddp_rank is not None:  # this rank's contiguous slice; the all-reduce averages the two halves
        rank, world = ddp_rank
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        x_t, noise, t = x_t[part], noise[part], t[part]
        cond = {k: v[part] for k, v in cond.items()}
    first = None
    for _ in range(steps):
        step.zero_grad()
        loss = torch.nn.functional.mse_loss(step.forward(x_t, t, cond).float(), noise)
        step.backward(loss)
        step.step()
        first = float(loss.detach()) if first is None else first
    after = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    return first, after - before


def training_variants(device: torch.device) -> list[str]:
    from .backends import bf16_native, cpu_bf16_native

    if device.type != "cuda":  # bf16 where the CPU has bf16 units (train --precision bf16; the demo uses it)
        return ["fp32", "channels_last"] + (["bf16"] if cpu_bf16_native() else [])
    return ["fp32", "channels_last"] + (["bf16"] if bf16_native(device) else []) + ["fp16", "compiled"]


def check_training(device=None, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref_loss, ref_delta = _train_steps(torch.device("cpu"), "fp32")
    rows = []
    add = _collector(rows, on_row)
    for variant in training_variants(device):
        name = f"{variant} ({device.type})"
        try:
            loss, delta = _train_steps(device, variant)
        except Exception as e:  # the device's own error: reported, not raised
            add(Row("training", name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            continue
        loss_rel = abs(loss - ref_loss) / abs(ref_loss)
        delta_rel = float((delta - ref_delta).norm() / ref_delta.norm())
        bound = TRAIN_BOUND[variant]
        ok = delta_rel <= bound and loss_rel <= bound and bool(torch.isfinite(delta).all())
        add(Row("training", name, "ok" if ok else "FAIL", "vs CPU fp32, same batch and seed",
                        {"loss_rel": loss_rel, "param_change_rel": delta_rel, "bound": bound}))
    add(check_ddp(ref_delta))
    if device.type == "cuda" and torch.cuda.device_count() == 1:
        add(check_ddp_one_rank(device))
    return rows


def check_ddp_one_rank(device) -> Row:
    """A one-rank process group (NCCL on a GPU, gloo on a CPU) with the DDP wrapper on ``device``:
    the step under the wrapper must change the weights exactly as the same step without it (one rank
    averages over one).  The two-process check above runs on gloo where there is a single GPU, so
    this is the only row that exercises NCCL there.  cuDNN's default algorithms are not deterministic
    (an H200 gave 4.4e-5 relative between the two steps without this), so both run with
    deterministic kernels and TF32 off."""
    import torch.distributed as dist

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    name = f"ddp (1 process, {backend})"
    if dist.is_initialized():
        return Row("training", name, "skipped", "a process group is already running in this process")
    with tempfile.TemporaryDirectory(prefix="medi-fast-ddp1-") as tmp:
        try:
            with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                            deterministic=True, allow_tf32=False):
                _, plain = _train_steps(device, "fp32")
                dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
                try:
                    _, wrapped = _train_steps(device, "fp32", ddp_rank=(0, 1))
                finally:
                    dist.destroy_process_group()
        except Exception as e:  # the platform's own error: reported, not raised
            return Row("training", name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    rel = float((wrapped - plain).norm() / plain.norm())
    ok = rel <= DDP_ONE_RANK_BOUND and bool(torch.isfinite(wrapped).all())
    return Row("training", name, "ok" if ok else "FAIL", "vs the same steps without the wrapper, same device",
               {"param_change_rel": rel, "bound": DDP_ONE_RANK_BOUND})


def _ddp_worker(rank: int, world: int, backend: str, port: int, out: str) -> None:
    """One rank of the two-process step: the same model and seed, half of the fixed batch each."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        _, delta = _train_steps(device, "fp32", ddp_rank=(rank, world))
        torch.save(delta, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_ddp(ref_delta: torch.Tensor) -> Row:
    """Two processes under DistributedDataParallel (NCCL on two GPUs, else gloo on the CPU), each on
    half of the batch: both ranks must hold the same weights, and their change must match one
    process on the whole batch (all-reduced gradients are the full-batch mean)."""
    import socket

    import torch.multiprocessing as mp

    backend = "nccl" if torch.cuda.device_count() > 1 else "gloo"
    name = f"ddp (2 processes, {backend})"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="medi-fast-ddp-") as tmp:
        try:
            mp.spawn(_ddp_worker, args=(2, backend, port, tmp), nprocs=2, join=True)
            d0, d1 = (torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        except Exception as e:  # the platform's own error: reported, not raised
            return Row("training", name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    same = bool(torch.equal(d0, d1))
    rel = float((d0 - ref_delta).norm() / ref_delta.norm())
    ok = same and rel <= TRAIN_BOUND["fp32"] and bool(torch.isfinite(d0).all())
    return Row("training", name, "ok" if ok else "FAIL",
               "ranks identical, vs one CPU fp32 process on the whole batch" if same else "ranks differ",
               {"param_change_rel": rel, "bound": TRAIN_BOUND["fp32"]})


# -- the whole report ----------------------------------------------------------------------------
def _collector(rows: list[Row], on_row) -> Callable[[Row], None]:
    """Append a finished row and hand it on at once (``doctor --json`` rewrites its file per row)."""
    def add(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return add


def run_checks(model=None, *, training: bool = True, engine_cache=None,
               on_row: Callable[[Report], None] | None = None, **inference) -> Report:
    """The environment and every check; ``inference``: check_inference's step/batch settings.
    ``on_row(report)`` runs after each row is added (each check is independent: one failing row never
    stops the next)."""
    report = Report(environment())
    add = _collector(report.rows, None if on_row is None else (lambda row: on_row(report)))
    if report.environment["onnxruntime_collision"]:
        add(Row("install", "onnxruntime", "FAIL", report.environment["onnxruntime_collision"]))
    with tempfile.TemporaryDirectory(prefix="medi-fast-doctor-") as tmp:
        check_inference(Path(tmp), model, engine_cache=engine_cache, on_row=add, **inference)
    if training:
        check_training(on_row=add)
    return report


def format_rows(rows: list[Row]) -> str:
    from tabulate import tabulate

    def fig(r: Row, key: str, fmt: str) -> str:
        v = r.metrics.get(key)
        return "" if v is None else format(v, fmt)

    table = [[r.area, r.path, r.status, fig(r, "rel", ".2e") or fig(r, "param_change_rel", ".2e"),
              fig(r, "nonfinite", "d"), fig(r, "image_levels", "d"), fig(r, "images_per_s", ".1f"), r.detail]
             for r in rows]
    return tabulate(table, headers=["area", "path", "status", "rel. error", "NaN/inf", "DDIM levels", "images/s",
                                    "detail"])
