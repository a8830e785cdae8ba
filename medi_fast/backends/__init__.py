"""Runtime backends: each implements the denoiser call ``backend(x, t, cond) -> eps``.

A small explicit registry maps names to classes.  Each entry says which model files it runs
(``checkpoint``: .pt/.safetensors, ``onnx``: .onnx, ``tensorrt``: .engine/.plan) and its rank for
``auto``, which picks the highest-ranked entry that is available here for the given file.  Ranks
follow the measurements in benchmarks/RESULTS.md.

The runtime never imports ``medi_fast.training`` or ``medi_fast.engines``: it loads the files they
wrote.
"""
from __future__ import annotations

import importlib
import inspect
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..conditioning import ConditionSpec
from ..errors import MediFastError, suggest
from ..schedule import Schedule
from .contract import IOContract

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


@dataclass
class ModelInfo:
    """What a runtime needs to know about a model file, without its weights."""

    path: Path
    kind: str  # "checkpoint" | "onnx" | "tensorrt"
    spec: ConditionSpec
    schedule: Schedule
    resolution: int
    preset: str
    model_hash: str
    provenance: dict = field(default_factory=dict)
    # Kind-specific, typed: the engine I/O contract (.onnx, .engine), the engine sidecar (.engine),
    # the loaded checkpoint (.pt/.safetensors, so the weights are read once).
    contract: IOContract | None = None
    sidecar: dict | None = None
    checkpoint: "Checkpoint | None" = None
    # Informational extras of the file's metadata (precision, unet_config, raw metadata), for reports.
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str  # "module:Class" under medi_fast.backends
    kinds: tuple[str, ...]
    rank: int  # higher is preferred by `auto`
    description: str

    def load_class(self):
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def availability(self) -> tuple[bool, str]:
        """(available, reason-if-not) on this machine."""
        try:
            cls = self.load_class()
        except ImportError as e:
            return False, f"not installed ({e.name or e})"
        return cls.available()


BACKENDS: dict[str, BackendEntry] = {}


def register(name: str, target: str, kinds: tuple[str, ...], rank: int, description: str) -> None:
    BACKENDS[name] = BackendEntry(name, target, kinds, rank, description)


register("torch", "torch_backend:TorchBackend", ("checkpoint",), 10,
         "PyTorch eager fp32 (CPU, or CUDA when present)")
register("torch-tf32", "torch_backend:TorchTF32Backend", ("checkpoint",), 12,
         "PyTorch CUDA, fp32 with TF32 matmuls and convolutions")
# fp16 above bf16: on an H200 the two ran at the same speed, fp16's eps error 8x smaller
# (medi-128, batch 64: 1.0e-3 against 8.2e-3 relative; benchmarks/results/gpu-nvidia-h200.json).
register("torch-fp16", "torch_backend:TorchFP16Backend", ("checkpoint",), 31,
         "PyTorch CUDA, fp16 autocast + channels_last")
register("torch-bf16", "torch_backend:TorchBF16Backend", ("checkpoint",), 30,
         "PyTorch bf16 autocast + channels_last (CUDA; CPUs with bf16 units, gated per model)")
register("torch-compile", "torch_backend:TorchCompileBackend", ("checkpoint",), 5,
         "torch.compile (CUDA: fp16 + channels_last + CUDA graphs; CPU: fp32)")
register("ort-cpu", "onnxruntime_backend:OrtCPUBackend", ("onnx",), 20, "ONNX Runtime CPU, threads = physical cores")
register("openvino", "openvino_backend:OpenVINOBackend", ("onnx",), 15, "OpenVINO CPU fp32 (optional extra; --backend openvino)")
# Above ort-cpu: on a CPU with bf16 units it ran 1.9-3.8x ort-cpu's speed (benchmarks/backends.py, bf16
# run), its DDIM images within a few grey levels of fp32's (benchmarks/cpu_bf16_quality.py).
register("openvino-bf16", "openvino_backend:OpenVINOBF16Backend", ("onnx",), 25,
         "OpenVINO CPU bf16 (CPUs with bf16 units, gated per model; optional extra)")
register("ort-cuda", "onnxruntime_backend:OrtCUDABackend", ("onnx",), 40, "ONNX Runtime CUDA, IO binding (+ CUDA graph)")
register("ort-trt", "onnxruntime_backend:OrtTensorRTBackend", ("onnx",), 50, "ONNX Runtime TensorRT EP, fp16, engine cache")
register("tensorrt", "tensorrt_backend:TensorRTBackend", ("tensorrt",), 60, "TensorRT engine, execute_async_v3 + CUDA graph")

# Reader for each model-file suffix: "module:function" returning a ModelInfo.
READERS: dict[str, str] = {
    ".pt": "torch_backend:read_checkpoint_info",
    ".safetensors": "torch_backend:read_checkpoint_info",
    ".onnx": "onnx_info:read_onnx_info",
    ".engine": "tensorrt_backend:read_engine_info",
    ".plan": "tensorrt_backend:read_engine_info",
}


def open_model(path) -> ModelInfo:
    """Read a model file's description (conditioning, schedule, hash) and check it can be used."""
    path = Path(path)
    if path.is_dir():
        if is_export_dir(path):  # an export directory: the fastest file this machine runs
            path = pick_export_file(path)
        else:
            candidates = [p for p in sorted(path.iterdir()) if p.suffix in READERS]
            if len(candidates) != 1:
                raise MediFastError(f"{path} is a directory; pass the model file inside it "
                                    f"({', '.join(p.name for p in candidates) or 'none found'})")
            path = candidates[0]
    if not path.exists():
        raise MediFastError(f"model file {path} does not exist; check the path")
    reader = READERS.get(path.suffix)
    if reader is None:
        raise MediFastError(f"{path} is not a model file; expected one of {', '.join(sorted(READERS))}")
    module, func = reader.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)(path)


def available(kind: str | None = None) -> list[str]:
    return [n for n, e in sorted(BACKENDS.items(), key=lambda kv: -kv[1].rank)
            if (kind is None or kind in e.kinds) and e.availability()[0]]


# Files of an export directory, in the order they are preferred when their backend is available here.
EXPORT_FILES = (("model.engine", ("tensorrt",)), ("model.fp16.onnx", ("ort-trt", "ort-cuda")),
                ("model.onnx", None))
# Written last by `medi-fast export`: a directory without it is an export that did not finish.
EXPORT_RECORD = "export.json"
# The fp16 gate's result for an fp16 graph exported without a GPU, written on its first GPU use.
FP16_GATE_FILE = "fp16_gate.json"


def check_export_dir(directory) -> dict:
    """The export record of a finished export directory; one line refusing any other.

    ``medi-fast export`` removes ``export.json`` before writing a model file and writes it last, so
    a directory without it was interrupted (killed, out of disk) and may hold a half-written model.
    """
    directory = Path(directory)
    rerun = f"rerun `medi-fast export CKPT --out {directory}`"
    path = directory / EXPORT_RECORD
    if not path.is_file():
        raise MediFastError(f"export directory {directory} is incomplete (no {EXPORT_RECORD}: its export was "
                            f"interrupted or failed); {rerun}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        record = None
    if not isinstance(record, dict):
        raise MediFastError(f"{path} is corrupt; {rerun}")
    if record.get("parity_ok") is not True:
        raise MediFastError(f"export directory {directory} failed its parity check (see its parity.json) and must "
                            f"not be used; {rerun} after fixing the checkpoint, or report it")
    return record


def fp16_gate_here(directory, backend: str, record: dict) -> str:
    """"" when the export directory's fp16 graph may run on ``backend`` (a GPU backend), else why not.

    ``record``: the directory's export.json.  A graph exported on a machine with a GPU passed the
    fp16 gate there (its ``fp16_gate`` says ``ok``; exports from before the key existed were gated
    when written).  One exported without a GPU (``ok: null``) is gated here, on its first use: the
    fp16 graph on ``backend`` against the fp32 graph in fp32 on the GPU (accuracy.check_denoiser:
    relative eps error and NaN/inf over the probe set); the result is kept in ``fp16_gate.json``
    per GPU model.
    """
    import torch

    from . import accuracy

    directory = Path(directory)
    gate = record.get("fp16_gate", {"ok": True})
    if not isinstance(gate, dict) or gate.get("ok") not in (True, None):
        raise MediFastError(f"{directory / EXPORT_RECORD} has a corrupt fp16_gate entry; rerun "
                            f"`medi-fast export CKPT --out {directory}`")
    if gate["ok"] is True:
        return ""
    fp16 = directory / "model.fp16.onnx"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else backend
    saved_path = directory / FP16_GATE_FILE
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    except (ValueError, OSError):
        saved = {}
    numbers = ("rel", "rel_bound", "nonfinite")
    if not (isinstance(saved, dict) and saved.get("gpu") == gpu and isinstance(saved.get("ok"), bool)
            and all(type(saved.get(k)) in (int, float) for k in numbers)):  # anything else: gate again
        info = open_model(directory / "model.onnx")
        # the fp32 graph in fp32: ort-trt would build it as an fp16 engine, and judge fp16 by fp16
        reference = create("ort-cuda" if "ort-cuda" in available("onnx") else "ort-cpu", info)
        candidate = create(backend, open_model(fp16))
        try:
            check = accuracy.check_denoiser(reference, candidate, info.contract, info.spec)
        finally:
            reference.close()
            candidate.close()
        saved = {"gpu": gpu, "backend": backend, **check.to_dict()}
        try:
            from ..io import atomic_write_text

            atomic_write_text(saved_path, json.dumps(saved, indent=2))
        except MediFastError:  # a read-only export directory (a shared model): gated again next time
            pass
    if saved["ok"]:
        return ""
    return (f"failed the fp16 gate on {gpu} (relative eps error {saved['rel']:.3g}, bound {saved['rel_bound']:g}, "
            f"{saved['nonfinite']} NaN/inf); rerun `medi-fast export CKPT --out {directory}` on this machine to pin "
            f"more layers to fp32")


def export_candidates(directory) -> list[tuple[Path, str | None, str]]:
    """Each model file of a finished export directory with the backend that would run it here (or
    None) and why."""
    record = check_export_dir(directory)
    out = []
    for name, wanted in EXPORT_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        kind = "tensorrt" if path.suffix == ".engine" else "onnx"
        names = [n for n in available(kind) if wanted is None or n in wanted]
        if wanted is not None and not names:
            out.append((path, None, f"needs {' or '.join(wanted)}, not available here"))
        elif not names:
            out.append((path, None, "no backend available here"))
        elif name == "model.fp16.onnx" and (why := fp16_gate_here(directory, names[0], record)):
            out.append((path, None, why))
        else:
            out.append((path, names[0], ""))
    return out


def pick_export_file(directory) -> Path:
    """The fastest file of an export directory that this machine can run (engine > fp16 on GPU > fp32)."""
    candidates = export_candidates(directory)
    for path, backend, _ in candidates:
        if backend is not None:
            return path
    found = ", ".join(p.name for p, _, _ in candidates) or "no model files"
    raise MediFastError(f"no file of export directory {directory} runs here ({found}); "
                        f"re-export with `medi-fast export CKPT --out {directory}`")


def is_export_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name, _ in EXPORT_FILES)


def resolve(name: str, info: ModelInfo) -> str:
    """The backend name to use: ``auto`` becomes the best available one for this model file."""
    if name == "auto":
        names = available(info.kind)
        if not names:
            raise MediFastError(f"no backend can run {info.path.name} here; see `medi-fast backends`")
        return names[0]
    if name not in BACKENDS:
        raise MediFastError(f"unknown backend {name!r}{suggest(name, BACKENDS)}; choose from auto, {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if info.kind not in entry.kinds:
        hint = "export it first with `medi-fast export`" if info.kind == "checkpoint" else "use --backend auto"
        raise MediFastError(f"backend {name} cannot run a {info.kind} file ({info.path.name}); {hint}")
    ok, why = entry.availability()
    if not ok:
        raise MediFastError(f"backend {name} is not available here: {why}; use --backend auto")
    return name


def idle_gpu_warning(requested: str, denoiser, info: ModelInfo) -> str | None:
    """``auto`` chose a CPU backend on a machine with a CUDA GPU (an ONNX file without a GPU runtime
    for it): one line saying so and how to use the GPU, since the run may be 100x slower than it could."""
    device = getattr(denoiser, "device", None)
    if requested != "auto" or info.kind == "checkpoint" or device is None or torch.device(device).type != "cpu" \
            or not torch.cuda.is_available():
        return None
    return (f"{getattr(denoiser, 'name', 'the backend')} runs {info.path.name} on the CPU although this machine has "
            "a CUDA GPU: no ONNX Runtime GPU provider or TensorRT is installed (pip install 'medi-fast[gpu]'); "
            "or pass the checkpoint (medi-fast generate CKPT ...) to run it through PyTorch on the GPU")


def backend_options(cls) -> list[str]:
    """The keyword options a backend class takes (its ``__init__`` after ``info``, bases included
    where a subclass passes ``**kw`` on)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]  # self, info
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def check_options(name: str, cls, options: dict) -> None:
    """Refuse options the backend does not take, naming the closest one (a typo must not be ignored)."""
    valid = backend_options(cls)
    for key in options:
        if key not in valid:
            raise MediFastError(f"backend {name} has no option {key!r}{suggest(key, valid)}; it takes "
                                f"{', '.join(valid) or 'no options'}")


def create(name: str, info: ModelInfo, **options) -> Callable:
    """Instantiate a backend (``auto`` allowed) for a model file; unknown options are refused.

    Under ``auto`` a backend that fails its accuracy gate on this model (``AccuracyGateError``: bf16
    on a CPU) gives way to the next available one; why is kept in the created backend's ``notes``
    (``run_job`` shows them as warnings).  Asked by name, the gate's error is the answer."""
    from .accuracy import AccuracyGateError

    candidates = available(info.kind) if name == "auto" else [resolve(name, info)]
    if not candidates:
        resolve(name, info)  # the usual "no backend can run" error
    if name == "auto" and options:  # options name the kind of backend wanted: auto picks among those taking them
        takes = {c: backend_options(BACKENDS[c].load_class()) for c in candidates}
        fits = [c for c in candidates if set(options) <= set(takes[c])]
        if not fits:
            valid = list(dict.fromkeys(o for c in candidates for o in takes[c]))
            key = next((k for k in options if k not in valid), next(iter(options)))
            raise MediFastError(f"no backend that auto picks here takes option {key!r}{suggest(key, valid)}; they "
                                f"take {', '.join(valid)} (see `medi-fast backends`, or name one with --backend)")
        candidates = fits
    notes: list[str] = []
    for i, chosen in enumerate(candidates):
        cls = BACKENDS[chosen].load_class()
        check_options(chosen, cls, options)
        try:
            backend = cls(info, **options)
        except AccuracyGateError as e:
            if name != "auto" or i == len(candidates) - 1:
                raise
            notes.append(f"{e}; using {candidates[i + 1]}")
            continue
        backend.name = chosen
        backend.notes = tuple(notes)
        return backend


class Backend:
    """Base class: subclasses set ``device`` and implement ``__call__``.

    ``__call__(x, t, cond)``: x (B, 3, H, W) float32 on ``self.device``, t (B,) long,
    cond {name: (B,)} -> eps (B, 3, H, W) float32 on ``self.device``.
    """

    name = "base"
    device = torch.device("cpu")
    # Lines for the user about how this backend was chosen (``create``'s fallbacks under ``auto``).
    notes: tuple[str, ...] = ()
    # True for CPU runtimes with their own thread pool (ONNX Runtime, OpenVINO): see sampling_threads.
    own_cpu_threads = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def gated_here(cls) -> bool:
        """True where this backend checks itself against fp32 on each model when it starts (bf16 on a CPU)."""
        return False

    def __call__(self, x, t, cond):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release device memory, sessions, engines."""


def cuda_device(device=None) -> torch.device:
    """``device`` (None, "cuda", "cuda:1", a torch.device) as a CUDA device WITH an index.

    ``torch.cuda.set_device``, ORT's ``device_id`` and TensorRT's stream all need the index; a bare
    "cuda" means the current device, as torch reads it.
    """
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        raise MediFastError(f"this backend runs on a CUDA GPU, not {dev}; use --device cuda or another --backend")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def bf16_native(device=None) -> bool:
    """True where the GPU has bf16 units (compute capability >= 8.0, or ROCm).

    ``torch.cuda.is_bf16_supported()`` also says True for GPUs that only emulate bf16 (T4, V100),
    where bf16 autocast is several times slower than fp16: ``auto`` choices must not count them.
    """
    if not torch.cuda.is_available():
        return False
    if getattr(torch.version, "hip", None):
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


# CPU flags of native bf16 arithmetic: AVX512-BF16 and AMX-BF16 (Intel Cooper Lake / Sapphire Rapids
# and later, AMD Zen 4 and later), the Armv8.6 BF16 extension ("bf16" in /proc/cpuinfo's Features).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """True where the CPU computes in bf16 natively (oneDNN then runs bf16 convolutions about 2-3x
    faster than fp32); elsewhere torch emulates bf16, slower than fp32.  Reads /proc/cpuinfo (Linux);
    False where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return any(f in flags for f in CPU_BF16_FLAGS)


@contextmanager
def sampling_threads(denoiser):
    """Run a sampling loop's torch arithmetic on one thread while ``denoiser`` owns the CPU cores.

    A sampler does a few element-wise torch ops between denoiser calls.  With a CPU runtime that
    keeps its own thread pool, torch's OpenMP workers (still spinning after those ops) and the
    runtime's workers fight over the same cores: on 2 cores that cost ONNX Runtime ~20 % of its
    speed (benchmarks/backends.py, "torch sampler math" rows).  The ops are tiny, so one thread
    loses nothing.  ``torch.set_num_threads`` is process-wide: the count is restored when the last
    of the loops running at the same time (in several Python threads) ends, also after an error.
    """
    if not getattr(denoiser, "own_cpu_threads", False):
        yield
        return
    global _handoff_depth, _handoff_saved
    with _handoff_lock:  # loops in several Python threads: the first in saves, the last out restores
        if _handoff_depth == 0:
            _handoff_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _handoff_depth += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff_depth -= 1
            if _handoff_depth == 0:
                torch.set_num_threads(_handoff_saved)


_handoff_lock = threading.Lock()
_handoff_depth = 0
_handoff_saved = 1
