"""FP16 TensorRT engine from an exported .onnx, with the TensorRT Python API (never a shell-out).

build -> parity check -> save engine + sidecar JSON.  The sidecar (``model.engine.json``) carries
everything the runtime needs without TensorRT (the .onnx metadata: vocabularies, ConditionSpec,
schedule, contract, checkpoint hash) plus what the engine is tied to: TensorRT version, GPU name and
compute capability.  The runtime (medi_fast.backends.tensorrt_backend) refuses a mismatch with the
rebuild command.

Precision: FP16 everywhere except the nodes the fp16 ONNX keeps in fp32 (engines/fp16.py:
normalisations, Softmax, and every ancestor of a Sin/Cos, i.e. the timestep and continuous-attribute
encodings, whose arguments near 1000 have a spacing of 0.5 in fp16).  The set is computed on the
ONNX graph and matched to TensorRT layers by ONNX node name, with precision constraints obeyed.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from medi_fast.backends import onnx_info
from medi_fast.backends.contract import IOContract
from medi_fast.backends.tensorrt_backend import SIDECAR_FORMAT, sidecar_path
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_files, atomic_write_bytes, atomic_write_text

from .fp16 import fp32_node_names
from .gate import STAGES


@dataclass(frozen=True)
class BuildConfig:
    fp16: bool = True  # the point of the engine; fp32 engines are for debugging parity
    # 3 is TensorRT's default: good kernels in minutes; 5 searches longer for a few % more.
    optimization_level: int = 3
    # Bytes of scratch memory the builder may use; None lets TensorRT take what the GPU has.
    workspace: int | None = None
    # Timing cache file shared by rebuilds (kernel timings keyed by GPU); None: beside the engine.
    timing_cache: str | None = None


def check_can_build(flag: str = "--tensorrt", instead: str = "drop --tensorrt to export ONNX only") -> None:
    """Raise one line when TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MediFastError(f"{flag} needs the tensorrt package and a CUDA GPU (pip install 'medi-fast[gpu]'); "
                            f"{instead}") from None
    import torch

    if not torch.cuda.is_available():
        raise MediFastError(f"{flag} needs a CUDA GPU; build the engine on the machine that will run it, or {instead}")


def device_fingerprint() -> dict:
    """What a TensorRT engine is tied to: TensorRT version, GPU name, compute capability."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\]")


def onnx_node_of(layer) -> str:
    """The ONNX node a TensorRT layer came from.

    TensorRT 10's ONNX parser writes ``[ONNX Layer: <node name>]`` into every layer's ``metadata``
    (also the helper layers one node expands into); older parsers only name the main layer after the node.
    """
    match = _ONNX_LAYER.search(getattr(layer, "metadata", "") or "")
    return match.group(1) if match else layer.name


def fp32_layers(network, trt, pinned: set[str]) -> list[int]:
    """Indices of the network's layers to pin to fp32: those of the ``pinned`` ONNX nodes with float outputs.

    Integer layers (shape arithmetic, ids) take no float precision constraint.
    """
    floats = (trt.float32, trt.float16)
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if onnx_node_of(layer) not in pinned:
            continue
        if all(layer.get_output(k).dtype in floats for k in range(layer.num_outputs)):
            out.append(i)
    return out


def use_timing_cache(bc, path: Path) -> bool:
    """Attach the timing cache at ``path`` to builder config ``bc``; an empty one where it is refused.

    A cache written by another TensorRT version or GPU is refused by ``set_timing_cache`` (returns
    False with ``ignore_mismatch=False``; ignoring the mismatch risks wrong kernels).  Returns True
    when the file's cache was used.
    """
    data = path.read_bytes() if path.is_file() else b""
    if data:
        try:
            cache = bc.create_timing_cache(data)
        except Exception:  # a corrupt file: TensorRT raises its own errors
            cache = None
        if cache is not None and bc.set_timing_cache(cache, ignore_mismatch=False):
            return True
    if not bc.set_timing_cache(bc.create_timing_cache(b""), ignore_mismatch=False):
        raise MediFastError("TensorRT refused an empty timing cache; check the TensorRT installation")
    return False


def write_engine(engine_path: Path, engine: bytes, sidecar: dict) -> Path:
    """Write the engine and its sidecar together: both are staged in full first, then renamed.

    Everything that can fail (serialising, the sidecar's content, disk space) happens before the
    renames, so an interrupted build never leaves a new engine beside an old or missing sidecar
    that would describe it wrongly (an engine without a sidecar is refused with the rebuild command).
    """
    side = sidecar_path(engine_path)
    # atomic_files removes the old sidecar before the new engine lands: never an old sidecar beside it
    with atomic_files(engine_path, side) as tmp:
        (tmp / engine_path.name).write_bytes(engine)
        (tmp / side.name).write_text(json.dumps(sidecar, indent=2))
    return engine_path


def build_engine(onnx_path, engine_path, config: BuildConfig = BuildConfig(), *, rebuild_command: str = "",
                 check_parity: bool = True) -> Path:
    """Parse ``onnx_path``, build with one optimisation profile from its contract, save engine + sidecar.

    With ``check_parity`` the build goes through the fp16 gate (engines/gate.py): the engine is run
    against the fp32 graph on ONNX Runtime CPU, and rebuilt with more layers pinned to fp32 while it
    fails; when no stage passes the engine is deleted and the build refused.
    """
    check_can_build()
    import onnx

    from .gate import stage_nodes

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def build_stage(stage: str) -> None:
        extra = stage_nodes(graph, stage) if config.fp16 else set()
        _build_once(onnx_path, engine_path, config, extra, rebuild_command, stage)

    if not check_parity:
        build_stage("default")
        return engine_path
    return gated_build(engine_path, onnx_path, build_stage, STAGES if config.fp16 else ("default",))


def gated_build(engine_path: Path, onnx_path: Path, build_stage, stages) -> Path:
    """Build stage by stage (``build_stage(stage)`` writes engine + sidecar) until the engine passes
    the gate against the fp32 graph on ONNX Runtime CPU; record the stage in the sidecar."""
    from medi_fast import backends

    from .gate import fp16_gate

    info = backends.open_model(onnx_path)
    reference = backends.create("ort-cpu", info)

    def candidate(stage: str):
        build_stage(stage)
        return backends.create("tensorrt", backends.open_model(engine_path))

    try:
        result = fp16_gate(reference, candidate, info.contract, info.spec, stages=stages,
                           what="the built TensorRT engine", instead="export without it (--no-tensorrt)")
    except MediFastError:
        engine_path.unlink(missing_ok=True)
        sidecar_path(engine_path).unlink(missing_ok=True)
        raise
    finally:
        reference.close()
    if hasattr(result.candidate, "close"):
        result.candidate.close()
    side = sidecar_path(engine_path)
    data = json.loads(side.read_text())
    data["fp16_gate"] = result.to_dict()
    atomic_write_text(side, json.dumps(data, indent=2))
    return engine_path


def _build_once(onnx_path: Path, engine_path: Path, config: BuildConfig, extra_fp32: set[str],
                rebuild_command: str, stage: str) -> None:
    import onnx
    import tensorrt as trt

    info = onnx_info.read_onnx_info(onnx_path)
    contract: IOContract = info.contract
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MediFastError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}; re-export with --opset 18")

    bc = builder.create_builder_config()
    pinned: list[str] = []
    if config.fp16:
        bc.set_flag(trt.BuilderFlag.FP16)
        # honour the fp32 pins below instead of treating them as hints
        bc.set_flag(getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"))
        names = fp32_node_names(onnx.load(str(onnx_path), load_external_data=False).graph) | set(extra_fp32)
        for i in fp32_layers(network, trt, names):
            layer = network.get_layer(i)
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned.append(layer.name)
    bc.builder_optimization_level = int(config.optimization_level)
    if config.workspace:
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace))

    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in contract.profile().items():
        profile.set_shape(name, mn, opt, mx)
    bc.add_optimization_profile(profile)

    cache_path = Path(config.timing_cache or engine_path.with_name("timing.cache"))
    reused_cache = use_timing_cache(bc, cache_path)

    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        raise MediFastError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above); "
                            f"try a smaller --batch MAX or --optimization-level 3")
    sidecar = {"format": SIDECAR_FORMAT, **device_fingerprint(), "build": asdict(config),
               "fp32_stage": stage, "fp32_layers": len(pinned), "timing_cache_reused": reused_cache,
               "onnx": onnx_path.name, "rebuild_command": rebuild_command or
               f"medi-fast export CHECKPOINT --out {engine_path.parent} --tensorrt --batch {contract.batch}",
               "metadata": onnx_info.read_props(onnx_path)}
    write_engine(engine_path, bytes(serialized), sidecar)
    timing = bc.get_timing_cache()
    if timing is not None:
        save_timing_cache(timing, cache_path)


def save_timing_cache(timing, path: Path) -> bool:
    """Write a builder's timing cache at ``path``; False where it cannot be written.  A cache: losing it
    costs build time on the next build, never correctness, so it never fails the build."""
    try:
        atomic_write_bytes(path, bytes(timing.serialize()))
    except MediFastError:  # how the atomic write reports a full disk or a permission error
        return False
    return True


def cached_engine(onnx_path, cache_dir=None, config: BuildConfig = BuildConfig()) -> Path:
    """The TensorRT engine for ``onnx_path`` from the content-keyed cache, built on first use.

    Keyed by the .onnx bytes, TensorRT version, GPU, precision, batch profile and build options
    (engines/cache.py); processes asking for the same key at once build it once.
    """
    from dataclasses import replace

    from .cache import EngineCache, key_fields

    check_can_build("--backend tensorrt", "use --backend auto to run the .onnx with ONNX Runtime")
    onnx_path = Path(onnx_path)
    info = onnx_info.read_onnx_info(onnx_path)
    cache = EngineCache(cache_dir)
    options = {k: v for k, v in asdict(config).items() if k not in ("fp16", "timing_cache")}
    fields = key_fields(onnx_path, fingerprint=device_fingerprint(), precision="fp16" if config.fp16 else "fp32",
                        batch=info.contract.batch, options=options)
    # one timing cache for the whole cache directory: kernel timings carry over between models
    config = replace(config, timing_cache=config.timing_cache or str(cache.root / "timing.cache"))
    path, _ = cache.get_or_build(fields, lambda out: build_engine(
        onnx_path, out, config, rebuild_command=f"medi-fast generate {onnx_path} --backend tensorrt"))
    return path
