"""The GPU code's logic, tested on the CPU with stand-ins for TensorRT, ONNX Runtime's GPU providers
and the CUDA device queries: device indexing, provider fallback, CUDA-graph-safe export, fp32 pins,
timing cache and engine writing, bf16 detection, backend options, the torch floor, guidance vs the
engine profile, and the engine parity check."""
from __future__ import annotations

import configparser
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from medi_fast import backends, checkpoint  # noqa: E402
from medi_fast.backends import BACKENDS, cuda_device, open_model  # noqa: E402
from medi_fast.backends import onnxruntime_backend as ortb  # noqa: E402
from medi_fast.backends.contract import BatchRange  # noqa: E402
from medi_fast.backends.tensorrt_backend import SIDECAR_FORMAT, sidecar_path  # noqa: E402
from medi_fast.engines.export import (ConstantScaleAttnProcessor, ExportConfig, export_onnx,  # noqa: E402
                                      host_float_nodes)
from medi_fast.errors import MediFastError  # noqa: E402
from medi_fast.model import build_model  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def age_ckpt(tmp_path_factory):
    """class + tss (categorical) + age (continuous: its sine arguments are the fp16 hazard)."""
    torch.manual_seed(3)
    model = build_model("tiny-32", classes=["LUAD", "LUSC", "BRCA"], metadata={"tss": ["05", "44"], "age": None})
    path = tmp_path_factory.mktemp("gpu") / "age.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32"), path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def exported(age_ckpt, tmp_path_factory):
    return export_onnx(age_ckpt, tmp_path_factory.mktemp("gpu") / "model.onnx", ExportConfig(batch=BatchRange(1, 4, 8)))


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA 'present' for availability and device queries; set_device keeps torch's index check."""
    from torch.cuda._utils import _get_device_index

    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", _get_device_index(d)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    ortb.provider_loads.cache_clear()
    yield calls
    ortb.provider_loads.cache_clear()


# -- 1. a bare "cuda" device gets an index -------------------------------------------------------
def test_cuda_device_always_has_an_index(fake_gpu):
    assert cuda_device(None) == torch.device("cuda", 0)
    assert cuda_device("cuda") == torch.device("cuda", 0)
    assert cuda_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MediFastError, match="runs on a CUDA GPU, not cpu"):
        cuda_device("cpu")


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.float32, trt.float16, trt.int32, trt.int8, trt.bool, trt.int64 = "f32", "f16", "i32", "i8", "b", "i64"

    class Engine:
        def get_tensor_dtype(self, name):
            return "i64" if name not in ("sample", "eps", "age") else "f32"

        def create_execution_context(self):
            return object()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt.Runtime, trt.Logger = Runtime, Logger
    return trt


def test_tensorrt_backend_starts_with_the_default_device(exported, fake_gpu, monkeypatch):
    """`generate model.engine` passes no device: the constructor must not hand set_device a bare 'cuda'."""
    from medi_fast.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    engine = exported.with_name("model.engine")
    engine.write_bytes(b"engine")
    from medi_fast.backends.onnx_info import read_props

    sidecar_path(engine).write_text(json.dumps({"format": SIDECAR_FORMAT, "tensorrt_version": "10.3.0",
                                                "gpu_name": "Fake GPU", "compute_capability": "9.0",
                                                "metadata": read_props(exported)}))
    backend = TensorRTBackend(open_model(engine))
    assert backend.device == torch.device("cuda", 0) and fake_gpu["set_device"] == 0
    assert backend.dtypes["sample"] == torch.float32 and backend.dtypes["timestep"] == torch.int64


# -- 2. ORT must not silently fall back from the requested provider ------------------------------
def test_ort_gpu_providers_that_cannot_load_are_unavailable_and_refused(exported, fake_gpu, monkeypatch):
    # onnxruntime built with CUDA/TensorRT whose libraries do not load: the real ORT (CPU build here)
    # warns and falls back to the CPU provider, which is what a broken GPU install does.
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    ok, why = BACKENDS["ort-cuda"].availability()
    assert not ok and "libcudnn" in why
    ok, why = BACKENDS["ort-trt"].availability()
    assert not ok and "the tensorrt package does not import" in why  # no tensorrt here (with it: tests/test_gpu_install.py)
    info = open_model(exported)
    # auto does not rank a provider that cannot load: a CPU backend (openvino-bf16 on a CPU with bf16 units)
    assert backends.resolve("auto", info) in ("ort-cpu", "openvino-bf16")
    with pytest.raises(MediFastError) as e:
        ortb._session(exported, [("CUDAExecutionProvider", {"device_id": 0})])
    msg = str(e.value)
    assert "could not load CUDAExecutionProvider" in msg and "fell back to CPUExecutionProvider" in msg
    assert "libcudnn" in msg and "--backend ort-cpu" in msg and "\n" not in msg


# -- 3. the exported graph can be captured in a CUDA graph ---------------------------------------
def test_export_has_no_shape_derived_float_math(exported):
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(exported))).graph
    assert host_float_nodes(graph) == []
    assert not [n for n in graph.node if n.op_type == "Sqrt"]
    assert any(n.op_type == "Softmax" for n in graph.node)  # the attention is still there


def _attention_graph(tmp_path, processor):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    if processor is not None:
        attn.set_processor(processor)
    path = tmp_path / "attn.onnx"
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        torch.onnx.export(attn, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=18, dynamo=False)
    return onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph, attn, x


def test_default_attention_exports_host_float_math_and_ours_does_not(tmp_path):
    default, attn, x = _attention_graph(tmp_path, None)
    flagged = [n.op_type for n in host_float_nodes(default)]
    assert "Sqrt" in flagged  # the check sees the Shape -> ... -> Sqrt chain ORT puts on the CPU
    ours, attn2, _ = _attention_graph(tmp_path, ConstantScaleAttnProcessor())
    assert host_float_nodes(ours) == []
    with torch.no_grad():
        assert torch.allclose(attn(x), attn2(x), atol=1e-6)


def test_constant_scale_processor_matches_the_default_on_the_unet(age_ckpt):
    from medi_fast.engines.export import use_constant_scale_attention

    model = age_ckpt.build().eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 900])
    cond = {"class": torch.tensor([0, 3]), "tss": torch.tensor([1, 2]), "age": torch.tensor([61.0, math.nan])}
    with torch.no_grad():
        ref = model(x, t, cond)
        assert use_constant_scale_attention(model) >= 1
        assert (model(x, t, cond) - ref).abs().max().item() <= 1e-5


# -- 4. fp32 pins by ONNX node name: every ancestor of Sin/Cos -----------------------------------
def test_tensorrt_pins_the_fp16_graphs_fp32_set_by_node_name(exported):
    from medi_fast.engines.fp16 import _fp32_nodes, fp32_node_names
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(exported))).graph
    pinned = fp32_node_names(graph)
    assert pinned == {graph.node[i].name for i in _fp32_nodes(graph)}
    # the producers of the age encoding's sine arguments are in the set although no name says Sin/Cos
    producer = {o: n for n in graph.node for o in n.output}
    sin_inputs = [producer[i] for n in graph.node if n.op_type in ("Sin", "Cos") for i in n.input if i in producer]
    assert sin_inputs and all(n.name in pinned for n in sin_inputs)
    old_rule = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "ReduceMean", "Pow", "Sqrt",
                "Softmax", "Sin", "Cos", "time_proj")
    missed_before = [n for n in sin_inputs if not any(op in n.name for op in old_rule)]
    assert missed_before, "the test must cover nodes the old substring rule left in fp16"

    # the TensorRT engine takes these pins from the fp16 graph's casts (a strongly typed network):
    # tests/test_gpu_install.py


# -- 5. timing cache and engine + sidecar --------------------------------------------------------
class _BuilderConfig:
    """set_timing_cache refuses caches whose bytes say another TensorRT version/GPU."""

    def __init__(self):
        self.attached = None

    def create_timing_cache(self, data):
        if data == b"corrupt":
            raise RuntimeError("bad cache")
        return {"data": bytes(data)}

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache["data"].startswith(b"other-version"):
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize("content,reused", [(None, False), (b"this-version", True), (b"other-version:123", False),
                                             (b"corrupt", False)])
def test_timing_cache_falls_back_to_an_empty_one_when_refused(tmp_path, content, reused):
    from medi_fast.engines.tensorrt_build import use_timing_cache

    path = tmp_path / "timing.cache"
    if content is not None:
        path.write_bytes(content)
    bc = _BuilderConfig()
    assert use_timing_cache(bc, path) is reused
    assert bc.attached == {"data": content if reused else b""}


def test_engine_and_sidecar_are_written_together(tmp_path):
    from medi_fast.engines.tensorrt_build import write_engine

    engine = tmp_path / "model.engine"
    write_engine(engine, b"old", {"format": SIDECAR_FORMAT, "v": 1})
    with pytest.raises(TypeError):  # the sidecar cannot be written: nothing changes
        write_engine(engine, b"new", {"format": SIDECAR_FORMAT, "v": object()})
    assert engine.read_bytes() == b"old" and json.loads(sidecar_path(engine).read_text())["v"] == 1
    write_engine(engine, b"new", {"format": SIDECAR_FORMAT, "v": 2})
    assert engine.read_bytes() == b"new" and json.loads(sidecar_path(engine).read_text())["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json"]


# -- 6. bf16 only where the GPU has bf16 units ---------------------------------------------------
@pytest.mark.parametrize("capability,native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_needs_native_units_for_auto_precision_and_backends(fake_gpu, monkeypatch, capability, native):
    from medi_fast.backends.torch_backend import TorchBF16Backend
    from medi_fast.training.loop import autocast_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # T4: emulated
    assert autocast_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else None)
    ok, why = TorchBF16Backend.available()
    assert ok is native and (native or "no bf16 units" in why)


# -- 7. ort-trt refuses cuda_graph; its options are documented ones --------------------------------
# The documented provider options (onnxruntime.ai, CUDA and TensorRT execution provider pages).
CUDA_OPTIONS = {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
                "do_copy_in_default_stream", "enable_cuda_graph", "cudnn_conv_use_max_workspace",
                "tunable_op_enable", "prefer_nhwc", "use_tf32"}
TRT_OPTIONS = {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
               "trt_timing_cache_enable", "trt_timing_cache_path", "trt_builder_optimization_level",
               "trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes",
               "trt_max_workspace_size", "trt_int8_enable", "trt_dump_subgraphs"}


def test_ort_trt_refuses_cuda_graph_and_takes_documented_options(exported, fake_gpu, monkeypatch, tmp_path):
    seen = {}
    def session(path, providers, *a, **k):
        seen["providers"] = providers

    monkeypatch.setattr(ortb, "_session", session)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    be = ortb.OrtTensorRTBackend(open_model(exported), cache_dir=str(tmp_path / "c"))
    (trt_name, trt_opts), (cuda_name, cuda_opts) = seen["providers"]
    assert (trt_name, cuda_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert set(trt_opts) <= TRT_OPTIONS and set(cuda_opts) <= CUDA_OPTIONS
    assert "trt_cuda_graph_enable" not in trt_opts and be.cuda_graph is False
    assert trt_opts["trt_profile_max_shapes"].startswith("sample:8x3x32x32,timestep:8")
    with pytest.raises(MediFastError, match="ort-trt cannot keep a CUDA graph per batch size"):
        ortb.OrtTensorRTBackend(open_model(exported), cuda_graph=True, cache_dir=str(tmp_path / "c"))
    ortb.OrtCUDABackend(open_model(exported), cuda_graph=True)
    assert set(seen["providers"][0][1]) <= CUDA_OPTIONS


# -- 8. the declared torch floor covers the APIs the code uses ------------------------------------
# API (as written in the source) -> first torch release that has it
TORCH_APIS = {"torch.OutOfMemoryError": (2, 5), "torch.amp.GradScaler(": (2, 3),
              "including_emulation": (2, 4)}


def test_declared_torch_floor_has_every_api_used():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    floor = re.search(r"torch>=([\d.]+)", cfg["options"]["install_requires"]).group(1)
    floor = tuple(int(p) for p in floor.split(".")[:2])
    source = "\n".join(p.read_text() for d in ("medi_fast", "training", "engines", "benchmarks")
                       for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)
    used = {api: v for api, v in TORCH_APIS.items() if api in source}
    assert "torch.OutOfMemoryError" in used
    assert all(floor >= v for v in used.values()), f"torch>={floor} lacks {used}"


# -- 9. guidance vs the profile, ORT CUDA graphs per batch, engine parity ---------------------------
def test_guidance_doubled_batch_beyond_the_engine_profile_is_refused(exported):
    from medi_fast.generate import check_unet_batch

    den = types.SimpleNamespace(contract=open_model(exported).contract)  # profile 1,4,8
    check_unet_batch(den, 8, 1.0)
    check_unet_batch(den, 4, 3.0)
    with pytest.raises(MediFastError) as e:
        check_unet_batch(den, 8, 3.0)
    msg = str(e.value)
    assert "2 x 8 = 16, above this engine's profile maximum 8" in msg
    assert "--batch-size 4" in msg and "--batch 1,4,16" in msg
    with pytest.raises(MediFastError, match="--batch-size 9, above this engine's profile maximum 8"):
        check_unet_batch(den, 9, 1.0)
    check_unet_batch(types.SimpleNamespace(), 1000, 3.0)  # no contract (torch): no limit


def test_generate_refuses_before_writing_when_guidance_overflows_the_profile(exported, tmp_path):
    import medi_fast

    pipe = medi_fast.load(exported, backend="ort-cpu", steps=2)
    with pytest.raises(MediFastError, match="2 x 6 = 12"):
        pipe.generate(class_="LUAD", tss="05", age=60, n=6, guidance=2.0, batch_size=6)
    assert pipe.generate(class_="LUAD", tss="05", age=60, n=2, guidance=2.0, batch_size=6).shape == (2, 32, 32, 3)


class _FakeBinding:
    def __init__(self, log):
        self.log = log

    def bind_input(self, name, dev, idx, dtype, shape, ptr):
        self.log.setdefault("ptrs", {})[name] = ptr

    bind_output = bind_input


class _FakeSession:
    def __init__(self):
        self.runs = []

    def io_binding(self):
        self.log = {}
        return _FakeBinding(self.log)

    def run_with_iobinding(self, binding, run_options):
        self.runs.append((run_options.get_run_config_entry("gpu_graph_id"), dict(self.log["ptrs"])))


def test_ort_cuda_graph_uses_one_graph_and_fixed_buffers_per_batch(exported, monkeypatch):
    info = open_model(exported)
    be = ortb.OrtCUDABackend.__new__(ortb.OrtCUDABackend)
    be.info, be.contract, be.device, be.cuda_graph, be._bufs = info, info.contract, torch.device("cpu"), True, {}
    be.session = _FakeSession()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(synchronize=lambda: None))
    cond = lambda b: {"class": torch.zeros(b, dtype=torch.long), "tss": torch.zeros(b, dtype=torch.long),  # noqa: E731
                      "age": torch.zeros(b)}
    for b in (4, 4, 2, 4):
        be(torch.randn(b, 3, 32, 32), torch.zeros(b, dtype=torch.long), cond(b))
    ids = [r[0] for r in be.session.runs]
    assert ids == ["4", "4", "2", "4"]
    assert be.session.runs[0][1] == be.session.runs[1][1] == be.session.runs[3][1]  # same addresses: replayable
    assert be.session.runs[2][1]["sample"] != be.session.runs[0][1]["sample"]


def test_check_denoiser_passes_fp16_and_fails_a_broken_candidate(exported, tmp_path):
    from medi_fast.engines.fp16 import convert_to_fp16
    from medi_fast.backends.accuracy import check_denoiser

    info = open_model(exported)
    fp16 = tmp_path / "model.fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(str(exported))), str(fp16))
    ref = backends.create("ort-cpu", info)
    half = backends.create("ort-cpu", open_model(fp16))
    good = check_denoiser(ref, half, info.contract, info.spec, ddim_steps=4)
    assert good.ok and 0 < good.rel <= 1e-2 and good.nonfinite == 0 and good.image_levels is not None

    def nan_at_late_steps(x, t, c):
        eps = ref(x, t, c)
        return torch.where((t > 900).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)

    bad = check_denoiser(ref, nan_at_late_steps, info.contract, info.spec)
    assert not bad.ok and bad.nonfinite > 0 and "NaN/inf" in bad.summary()
    off = check_denoiser(ref, lambda x, t, c: ref(x, t, c) * 1.05, info.contract, info.spec)
    assert not off.ok and 0.04 < off.rel < 0.06


@pytest.mark.parametrize("passing_stage", ["conditioning", None])
def test_engine_build_falls_back_through_the_gate_and_deletes_a_failing_engine(exported, monkeypatch, passing_stage):
    """gated_build with a stand-in builder and a stand-in TensorRT backend: eps off by one until
    ``passing_stage`` (None: never) is built."""
    from medi_fast.backends.onnx_info import read_props
    from medi_fast.engines.tensorrt_build import gated_build, write_engine

    engine = exported.with_name("gated.engine")
    built = []

    def build_stage(stage):
        built.append(stage)
        write_engine(engine, stage.encode(), {"format": SIDECAR_FORMAT, "metadata": read_props(exported)})

    real_create = backends.create
    cpu = real_create("ort-cpu", open_model(exported))

    class StandIn:  # the TensorRT backend on the engine just built
        device = torch.device("cpu")

        def __init__(self):
            self.stage = engine.read_bytes().decode()

        def __call__(self, x, t, c):
            return cpu(x, t, c) + (0.0 if self.stage == passing_stage else 1.0)

        def close(self):
            pass

    monkeypatch.setattr(backends, "create",
                        lambda name, info, **o: StandIn() if name == "tensorrt" else real_create(name, info))
    if passing_stage:
        assert gated_build(engine, exported, build_stage, ("default", "conditioning", "matmul")) == engine
        assert built == ["default", "conditioning"]
        record = json.loads(sidecar_path(engine).read_text())["fp16_gate"]
        assert record["stage"] == "conditioning" and [a["ok"] for a in record["attempts"]] == [False, True]
    else:
        with pytest.raises(MediFastError, match="the built TensorRT engine does not match fp32 even with matmul"):
            gated_build(engine, exported, build_stage, ("default", "conditioning", "matmul"))
        assert built == ["default", "conditioning", "matmul"]
        assert not engine.exists() and not sidecar_path(engine).exists()


# -- the TensorRT backend's CUDA graphs: one per batch size, kept when the batch size changes -------
class _Context:
    def __init__(self):
        self.shapes, self.launches = [], 0

    def set_input_shape(self, name, shape):
        self.shapes.append((name, tuple(shape)))

    def set_tensor_address(self, name, ptr):
        pass

    def execute_async_v3(self, stream):
        self.launches += 1
        return True


def test_tensorrt_backend_captures_one_graph_per_batch_size_and_keeps_it(exported, monkeypatch):
    import contextlib

    from medi_fast.backends.tensorrt_backend import TensorRTBackend

    graphs = []

    class Graph:
        def __init__(self):
            self.replays = 0
            graphs.append(self)

        def replay(self):
            self.replays += 1

    fake_stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None, wait_stream=lambda s: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: fake_stream)
    info = open_model(exported)
    be = TensorRTBackend.__new__(TensorRTBackend)
    be.info, be.contract, be.device, be.stream, be.context = info, info.contract, torch.device("cpu"), fake_stream, _Context()
    be.dtypes = {s.name: s.torch_dtype for s in info.contract.inputs + info.contract.outputs}
    be.cuda_graph, be._batch, be._bufs, be._graphs = True, None, {}, {}

    def call(b):
        cond = {"class": torch.zeros(b, dtype=torch.long), "tss": torch.zeros(b, dtype=torch.long), "age": torch.zeros(b)}
        return be(torch.randn(b, 3, 32, 32), torch.zeros(b, dtype=torch.long), cond)

    for b in (4, 4, 4, 2, 2, 4, 2):
        assert call(b).shape == (b, 3, 32, 32)
    # captures at the first 4 and the first 2 only: back at 4 (and 2) the graph captured there is replayed;
    # a capture is one eager launch and one recorded launch
    assert len(graphs) == 2 and [g.replays for g in graphs] == [4, 3]
    assert be.context.launches == 2 * 2
    # the context is rebound (shapes, addresses) at each change, to the buffers the graph was captured with
    assert [s for n, s in be.context.shapes if n == "sample"] == [(4, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32),
                                                                  (2, 3, 32, 32)]
    assert sorted(be._bufs) == [2, 4]
    with pytest.raises(MediFastError, match="outside this engine's profile 1,4,8"):
        call(9)
    assert len(graphs) == 2  # refused before binding or capturing
