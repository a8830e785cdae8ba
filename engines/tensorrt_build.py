"""FP16 TensorRT engine from an exported .onnx, with the TensorRT Python API (never a shell-out).

build -> save engine + sidecar JSON.  The sidecar (``model.engine.json``) carries everything the
runtime needs without TensorRT (the .onnx metadata: vocabularies, ConditionSpec, schedule, contract,
checkpoint hash) plus what the engine is tied to: TensorRT version, GPU name and compute capability.
The runtime (medi_fast.backends.tensorrt_backend) refuses a mismatch with the rebuild command.

Precision: FP16 everywhere except normalisation layers (TensorRT's INormalizationLayer from
InstanceNormalization/GroupNormalization/LayerNormalization, and the ReduceMean/Pow/Sqrt of
decomposed norms), the Softmax, and the sinusoidal timestep encoding, which are pinned to fp32 with
precision constraints: their fp16 accumulations overflow or lose the timestep.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from medi_fast.backends import onnx_info
from medi_fast.backends.contract import IOContract
from medi_fast.backends.tensorrt_backend import SIDECAR_FORMAT, sidecar_path
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_path, atomic_write_bytes, atomic_write_text

# ONNX op names whose TensorRT layers stay fp32 (layer names carry the ONNX node names).
FP32_ONNX_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "ReduceMean", "Pow", "Sqrt",
                 "Softmax", "Sin", "Cos", "time_proj")


@dataclass(frozen=True)
class BuildConfig:
    fp16: bool = True  # the point of the engine; fp32 engines are for debugging parity
    # 3 is TensorRT's default: good kernels in minutes; 5 searches longer for a few % more.
    optimization_level: int = 3
    # Bytes of scratch memory the builder may use; None lets TensorRT take what the GPU has.
    workspace: int | None = None
    # Timing cache file shared by rebuilds (kernel timings keyed by GPU); None: beside the engine.
    timing_cache: str | None = None


def check_can_build() -> None:
    """Raise one line when TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MediFastError("--tensorrt needs the tensorrt package and a CUDA GPU (pip install 'medi-fast[gpu]'); "
                            "drop --tensorrt to export ONNX only") from None
    import torch

    if not torch.cuda.is_available():
        raise MediFastError("--tensorrt needs a CUDA GPU; build the engine on the machine that will run it")


def device_fingerprint() -> dict:
    """What a TensorRT engine is tied to: TensorRT version, GPU name, compute capability."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def _fp32_layer(layer, trt) -> bool:
    if layer.type == trt.LayerType.NORMALIZATION or layer.type == trt.LayerType.SOFTMAX:
        return True
    return any(op in layer.name for op in FP32_ONNX_OPS)


def build_engine(onnx_path, engine_path, config: BuildConfig = BuildConfig(), *, rebuild_command: str = "") -> Path:
    """Parse ``onnx_path``, build with one optimisation profile from its contract, save engine + sidecar."""
    check_can_build()
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = onnx_info.read_onnx_info(onnx_path)
    contract: IOContract = info.extra["contract"]
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
    if config.fp16:
        bc.set_flag(trt.BuilderFlag.FP16)
        # honour the fp32 pins below instead of treating them as hints
        bc.set_flag(getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"))
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if _fp32_layer(layer, trt):
                layer.precision = trt.float32
                for k in range(layer.num_outputs):
                    if layer.get_output(k).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(k, trt.float32)
    bc.builder_optimization_level = int(config.optimization_level)
    if config.workspace:
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace))

    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in contract.profile().items():
        profile.set_shape(name, mn, opt, mx)
    bc.add_optimization_profile(profile)

    cache_path = Path(config.timing_cache or engine_path.with_name("timing.cache"))
    cache = bc.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    bc.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        raise MediFastError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above); "
                            f"try a smaller --batch MAX or --optimization-level 3")
    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    atomic_write_bytes(cache_path, bytes(bc.get_timing_cache().serialize()))
    sidecar = {"format": SIDECAR_FORMAT, **device_fingerprint(), "build": asdict(config),
               "onnx": onnx_path.name, "rebuild_command": rebuild_command or
               f"medi-fast export CHECKPOINT --out {engine_path.parent} --tensorrt --batch {contract.batch}",
               "metadata": onnx_info.read_props(onnx_path)}
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2))
    return engine_path

