"""FP16 TensorRT engine from an exported .onnx, with the TensorRT Python API (never a shell-out).

build -> parity check -> save engine + sidecar JSON.  The sidecar (``model.engine.json``) carries
everything the runtime needs without TensorRT (the .onnx metadata: vocabularies, ConditionSpec,
schedule, contract, checkpoint hash) plus what the engine is tied to: TensorRT version, GPU name and
compute capability.  The runtime (medi_fast.backends.tensorrt_backend) refuses a mismatch with the
rebuild command.

Precision: fp16 by construction, on TensorRT 10 and 11 alike.  The network is strongly typed and
parsed from an fp16 ONNX graph (engines/fp16.py; the gated ``model.fp16.onnx`` when the export wrote
one): every tensor's type is the graph's, so the fp32 pins (normalisations, Softmax, every ancestor
of a Sin/Cos) are the graph's explicit casts, not per-layer hints.  TensorRT 11 removed the
weak-typing API this replaces (``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``, layer
``precision``/``set_output_type``) and makes every network strongly typed; TensorRT 10 takes the
``STRONGLY_TYPED`` creation flag.  After the build the engine inspector's layer table is read and an
engine that does not run its convolutions in fp16 is refused: never an fp32 engine labelled fp16.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medi_fast.backends import onnx_info
from medi_fast.backends.contract import IOContract
from medi_fast.backends.tensorrt_backend import SIDECAR_FORMAT, sidecar_path
from medi_fast.errors import MediFastError
from medi_fast.io import atomic_files, atomic_write_bytes, atomic_write_text

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


def build_engine(onnx_path, engine_path, config: BuildConfig = BuildConfig(), *, fp16_onnx=None,
                 rebuild_command: str = "", check_parity: bool = True) -> Path:
    """Build ``engine_path`` from the exported graph ``onnx_path``: one optimisation profile from its
    contract, a strongly typed network, engine + sidecar.

    fp16 (``config.fp16``): the network is parsed from an fp16 graph, one per gate stage.
    ``fp16_onnx`` (the export's ``model.fp16.onnx``) is used for the stage its gate passed (or, not
    yet gated, the default stage) and the stages after it are converted from ``onnx_path``; without
    it every stage is converted.  An fp16 ``onnx_path`` is built as it is.  With ``check_parity``
    the build goes through the fp16 gate (engines/gate.py): the engine is run against ``onnx_path``
    on ONNX Runtime CPU and rebuilt from the next stage's graph while it fails; when no stage passes
    the engine is deleted and the build refused.
    """
    check_can_build()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    sources = stage_sources(onnx_path, Path(fp16_onnx) if fp16_onnx else None) if config.fp16 else {"fp32": onnx_path}
    # the converted stage graphs are scratch files: staged beside the engine, removed with the staging folder
    with atomic_files(engine_path.with_name(engine_path.name + ".graphs")) as scratch:
        def build_stage(stage: str) -> None:
            source = sources[stage]
            if source is None:
                source = write_stage_graph(onnx_path, scratch / stage / "model.fp16.onnx", stage)
            _build_once(source, onnx_path, engine_path, config, rebuild_command, stage)
            if sources[stage] is None:  # built: one fp16 copy of the weights on disk at a time
                shutil.rmtree(source.parent, ignore_errors=True)

        stages = tuple(sources)
        if not check_parity:
            build_stage(stages[0])
            return engine_path
        return gated_build(engine_path, onnx_path, build_stage, stages)


def stage_sources(onnx_path: Path, fp16_onnx: Path | None) -> dict[str, Path | None]:
    """Gate stage -> the fp16 graph its engine is parsed from (None: converted from ``onnx_path`` when
    that stage is built), in the order the gate tries them."""
    props = onnx_info.read_props(onnx_path)
    if props.get("medi_fast.precision") == "fp16":  # an fp16 graph given as the model: built as it is
        return {"given": onnx_path}
    if fp16_onnx is None:
        return dict.fromkeys(STAGES)
    try:
        gate = json.loads(onnx_info.read_props(fp16_onnx).get("medi_fast.fp16_gate") or "{}")
    except ValueError:
        gate = {}
    stage = gate.get("stage") if isinstance(gate, dict) else None
    if stage not in STAGES:
        raise MediFastError(f"{fp16_onnx} has no readable fp16 gate record; rerun `medi-fast export` for this directory")
    # the stages before the one the fp16 graph passed failed its gate: the engine starts where the graph does
    return {s: (fp16_onnx if s == stage else None) for s in STAGES[STAGES.index(stage):]}


def write_stage_graph(onnx_path: Path, path: Path, stage: str) -> Path:
    """The fp16 graph of gate stage ``stage`` converted from the fp32 graph ``onnx_path``, saved at ``path``."""
    from .export import save_checked
    from .gate import fp16_graph

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checked(fp16_graph(onnx_path, stage, None), path)


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


def network_flags(trt) -> int:
    """``create_network`` flags of a strongly typed network: TensorRT 10 opts in with ``STRONGLY_TYPED``;
    TensorRT 11 types every network strongly (the flag is deprecated there and ignored)."""
    if trt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def layer_precisions(info_json: str) -> dict[str, int]:
    """Layers of an engine by the type of their float outputs, from the engine inspector's JSON
    (``ProfilingVerbosity.DETAILED``): ``{"fp16": n, "fp32": n, "conv_fp32": n, "conv": n}``.

    TensorRT 10 writes a tensor's type inside ``Format/Datatype`` ("Row major linear FP16 format");
    TensorRT 11 splits it into ``Format`` and ``DataType`` ("Half", "Float").
    """
    try:
        layers = json.loads(info_json).get("Layers", [])
    except (ValueError, AttributeError):
        layers = None
    if not layers or not all(isinstance(layer, dict) for layer in layers):
        raise MediFastError("TensorRT's engine inspector gave no per-layer types (it needs "
                            "ProfilingVerbosity.DETAILED), so the engine's precision cannot be verified; "
                            "check the TensorRT installation or export without it (--no-tensorrt)")

    def kind(tensor) -> str | None:
        text = " ".join(str(tensor.get(k, "")) for k in ("Format/Datatype", "DataType", "Format")).lower()
        if "bf16" in text or "bfloat16" in text:
            return "bf16"  # never in an engine built from an fp16 graph; counted as neither
        if "fp16" in text or "half" in text or "float16" in text:
            return "fp16"
        if "fp32" in text or "float" in text:
            return "fp32"
        return None  # integer and boolean tensors carry no float precision

    counts = {"fp16": 0, "fp32": 0, "conv": 0, "conv_fp32": 0}
    for layer in layers:
        kinds = {kind(t) for t in layer.get("Outputs", []) if isinstance(t, dict)} - {None, "bf16"}
        if not kinds:
            continue
        precision = "fp16" if "fp16" in kinds else "fp32"
        counts[precision] += 1
        if "conv" in str(layer.get("LayerType", "")).lower():
            counts["conv"] += 1
            counts["conv_fp32"] += precision == "fp32"
    return counts


def check_fp16_engine(counts: dict[str, int], source: str) -> None:
    """Refuse an engine built as fp16 whose layers do not run in fp16: no fp16 layer at all, or a
    convolution (the UNet's cost; never pinned to fp32) in fp32."""
    if counts["fp16"] == 0 or counts["conv_fp32"]:
        raise MediFastError(f"the TensorRT engine built from {source} is not an fp16 engine: {counts['fp16']} layers "
                            f"run in fp16, {counts['fp32']} in fp32 ({counts['conv_fp32']} of {counts['conv']} "
                            f"convolutions in fp32); it was not saved; check that {source} is an fp16 graph "
                            f"(re-export) or report this with the TensorRT version")


def _build_once(source: Path, onnx_path: Path, engine_path: Path, config: BuildConfig, rebuild_command: str,
                stage: str) -> None:
    """Parse ``source`` into a strongly typed network, build, verify the precision, write engine + sidecar.
    ``onnx_path``: the exported graph whose metadata and contract the engine carries."""
    import tensorrt as trt

    info = onnx_info.read_onnx_info(onnx_path)
    contract: IOContract = info.contract
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MediFastError(f"TensorRT cannot parse {source.name}: {errors[:300]}; re-export with --opset 18")

    bc = builder.create_builder_config()
    # the inspector's per-layer types are what the precision check below reads
    bc.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
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
        raise MediFastError(f"TensorRT could not build an engine from {source.name} (see the TensorRT log above); "
                            f"try a smaller --batch MAX or --optimization-level 3")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise MediFastError(f"TensorRT could not load the engine it built from {source.name}; check the TensorRT "
                            f"installation")
    counts = layer_precisions(engine.create_engine_inspector().get_engine_information(
        trt.LayerInformationFormat.JSON))
    del engine
    if config.fp16:
        check_fp16_engine(counts, source.name)
    sidecar = {"format": SIDECAR_FORMAT, **device_fingerprint(), "build": asdict(config),
               "network": "strongly typed", "fp32_stage": stage, "precision_source": source.name,
               "layer_precisions": counts, "timing_cache_reused": reused_cache,
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
