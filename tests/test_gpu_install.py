"""The GPU install as the `gpu` extra brings it, tested on the CPU with stand-ins shaped like each
version's documented API: the TensorRT 10 and 11 engine build (strongly typed from the fp16 graph,
verified with the engine inspector), the extras (one ONNX Runtime distribution, floors that pair),
the doctor's collision row and its ORT GPU rows, and ort-trt (the graph's precision, TensorRT
imported before its provider is probed)."""
from __future__ import annotations

import configparser
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from packaging.requirements import Requirement  # noqa: E402

from medi_fast import backends, checkpoint, doctor  # noqa: E402
from medi_fast.backends import BACKENDS, BackendEntry, open_model  # noqa: E402
from medi_fast.backends import onnxruntime_backend as ortb  # noqa: E402
from medi_fast.backends.contract import BatchRange  # noqa: E402
from medi_fast.backends.onnx_info import read_props  # noqa: E402
from medi_fast.backends.tensorrt_backend import sidecar_path  # noqa: E402
from medi_fast.engines import tensorrt_build  # noqa: E402
from medi_fast.engines.export import ExportConfig, export_onnx  # noqa: E402
from medi_fast.engines.gate import write_fp16_gated, write_fp16_ungated  # noqa: E402
from medi_fast.errors import MediFastError  # noqa: E402
from medi_fast.model import build_model  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(5)
    model = build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44"]})
    d = tmp_path_factory.mktemp("install")
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32"), d / "m.pt")
    return export_onnx(checkpoint.load(d / "m.pt"), d / "model.onnx", ExportConfig(batch=BatchRange(1, 4, 8)))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    ortb.provider_loads.cache_clear()
    yield
    ortb.provider_loads.cache_clear()


# -- stand-in TensorRT modules, one per major version ----------------------------------------------
def layer_table(major: int, precision: str) -> str:
    """The engine inspector's JSON (ProfilingVerbosity.DETAILED) in each major version's schema:
    10 writes the type inside "Format/Datatype", 11 splits it into "Format" and "DataType" and
    replaces "Bindings" by "I/O Tensors"."""
    def tensor(p):
        if major >= 11:
            return {"Name": "t", "Format": "Row major linear", "DataType": {"fp16": "Half", "fp32": "Float"}[p]}
        return {"Name": "t", "Format/Datatype": f"Row major linear {p.upper()} format"}

    layers = [{"Name": "conv_in", "LayerType": "CaskConvolution", "Outputs": [tensor(precision)]},
              {"Name": "norm", "LayerType": "Normalization", "Outputs": [tensor("fp32")]},  # a pin: fp32 either way
              {"Name": "ids", "LayerType": "Gather",
               "Outputs": [{"Name": "i", "Format/Datatype": "Row major linear Int64 format", "DataType": "Int64"}]},
              {"Name": "conv_out", "LayerType": "CaskConvolution", "Outputs": [tensor(precision)]}]
    io = {"I/O Tensors": [{"Name": "sample", "DataType": "Float"}]} if major >= 11 else {"Bindings": ["sample"]}
    return json.dumps({"Layers": layers, **io})


def fake_tensorrt(version: str, log: dict, *, engine_precision=None, layer_names_only=False):
    """``tensorrt`` as documented for ``version``: 10 has the weak-typing flags and an opt-in
    STRONGLY_TYPED creation flag; 11 has no FP16/OBEY_PRECISION_CONSTRAINTS flags (AttributeError, as
    in the real bindings) and types every network strongly.  The built engine's layers run in the
    parsed graph's precision (``engine_precision`` overrides it: an engine that ignored the types);
    ``layer_names_only``: an inspector that gives no layer details."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int32, trt.int64, trt.int8, trt.bool = "f32", "f16", "i32", "i64", "i8", "b"
    if major >= 11:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)  # deprecated, ignored
        trt.BuilderFlag = types.SimpleNamespace(TF32=7)
    else:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        trt.BuilderFlag = types.SimpleNamespace(FP16=0, TF32=7, OBEY_PRECISION_CONSTRAINTS=11)
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY=0, NONE=1, DETAILED=2)
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE=0, JSON=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Network:
        num_layers = 0

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.precision = read_props(path).get("medi_fast.precision", "fp32")
            log.setdefault("parsed", []).append(Path(path))
            log.setdefault("parsed_precision", []).append(self.network.precision)
            return True

    class Config:
        profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        builder_optimization_level = 3

        def set_flag(self, flag):
            log.setdefault("builder_flags", []).append(flag)

        def set_memory_pool_limit(self, pool, size):
            pass

        def create_timing_cache(self, data):
            return object()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return None

        def add_optimization_profile(self, profile):
            pass

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            log["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            weak_fp16 = major < 11 and trt.BuilderFlag.FP16 in log.get("builder_flags", [])
            precision = engine_precision or ("fp16" if network.precision == "fp16" or weak_fp16 else "fp32")
            detailed = config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED and not layer_names_only
            return json.dumps({"precision": precision, "detailed": detailed}).encode()

    class Inspector:
        def __init__(self, data):
            self.data = data

        def get_engine_information(self, fmt):
            assert fmt == trt.LayerInformationFormat.JSON
            if not self.data["detailed"]:
                return json.dumps({"Layers": ["conv_in", "norm", "ids", "conv_out"]})
            return layer_table(major, self.data["precision"])

    class Engine:
        def __init__(self, data):
            self.data = json.loads(bytes(data))

        def create_engine_inspector(self):
            return Inspector(self.data)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data)

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, Parser, Runtime
    return trt


def use_trt(monkeypatch, version, **kw):
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, log, **kw))
    return log


# -- 1. the engine build on TensorRT 10 and 11: strongly typed, from the fp16 graph -----------------
@pytest.mark.parametrize("version,flags", [("10.13.3", 1 << 1), ("11.4.0", 0)])
def test_engine_build_is_strongly_typed_from_the_fp16_graph_on_tensorrt_10_and_11(exported, fake_gpu, monkeypatch,
                                                                                  version, flags):
    log = use_trt(monkeypatch, version)
    fp16 = write_fp16_ungated(exported, exported.with_name("model.fp16.onnx"))
    engine = tensorrt_build.build_engine(exported, exported.with_name("a.engine"), fp16_onnx=fp16, check_parity=False)
    assert log["network_flags"] == flags  # STRONGLY_TYPED on 10; every network is strongly typed on 11
    assert log.get("builder_flags", []) == []  # no FP16 / OBEY_PRECISION_CONSTRAINTS (gone in 11)
    assert log["parsed"] == [fp16]  # the export's fp16 graph: its fp32 pins are casts in the graph
    side = json.loads(sidecar_path(engine).read_text())
    assert side["network"] == "strongly typed" and side["precision_source"] == "model.fp16.onnx"
    assert side["layer_precisions"] == {"fp16": 2, "fp32": 1, "conv": 2, "conv_fp32": 0}
    assert side["tensorrt_version"] == version and side["metadata"] == read_props(exported)
    assert not list(exported.parent.glob("*.graphs*"))  # no scratch folder left


@pytest.mark.parametrize("version", ["10.13.3", "11.4.0"])
@pytest.mark.parametrize("stand_in,message", [
    ({"engine_precision": "fp32"}, "is not an fp16 engine: 0 layers run in fp16, 3 in fp32 (2 of 2 convolutions in fp32)"),
    ({"layer_names_only": True}, "gave no per-layer types"),
])
def test_an_engine_whose_layers_are_not_fp16_is_refused_and_not_saved(exported, fake_gpu, monkeypatch, version,
                                                                      stand_in, message):
    use_trt(monkeypatch, version, **stand_in)
    engine = exported.with_name("b.engine")
    with pytest.raises(MediFastError, match=re.escape(message)):
        tensorrt_build.build_engine(exported, engine, check_parity=False)
    assert not engine.exists() and not sidecar_path(engine).exists()


def test_layer_precisions_reads_both_inspector_schemas():
    for major in (10, 11):
        assert tensorrt_build.layer_precisions(layer_table(major, "fp16")) == {"fp16": 2, "fp32": 1, "conv": 2,
                                                                              "conv_fp32": 0}
        assert tensorrt_build.layer_precisions(layer_table(major, "fp32"))["conv_fp32"] == 2
    spelled = [{"LayerType": "Convolution", "Outputs": [{"DataType": t}]} for t in ("Float16", "BFloat16", "Float")]
    assert tensorrt_build.layer_precisions(json.dumps({"Layers": spelled})) == {"fp16": 1, "fp32": 1, "conv": 2,
                                                                              "conv_fp32": 1}


def test_gate_stages_build_from_the_gated_graph_then_converted_stage_graphs(exported, fake_gpu, monkeypatch,
                                                                             tmp_path):
    """A gated fp16 graph (stage ``conditioning``) is the first candidate; the gate's next stage is
    converted from the fp32 graph; the stand-in engine passes at ``matmul`` only."""
    log = use_trt(monkeypatch, "11.4.0")
    d = tmp_path / "exp"
    d.mkdir()
    onnx_path = d / "model.onnx"
    onnx_path.write_bytes(exported.read_bytes())
    fp16 = d / "model.fp16.onnx"
    write_fp16_gated(onnx_path, fp16, backend="ort-cpu", stages=("conditioning",))
    assert tensorrt_build.stage_sources(onnx_path, fp16) == {"conditioning": fp16, "matmul": None}
    assert tensorrt_build.stage_sources(onnx_path, None) == {"default": None, "conditioning": None, "matmul": None}
    assert tensorrt_build.stage_sources(fp16, None) == {"given": fp16}

    real_create = backends.create
    cpu = real_create("ort-cpu", open_model(onnx_path))

    class StandIn:  # the tensorrt backend on the engine just built: right only from the matmul stage
        device = torch.device("cpu")

        def __init__(self, info):
            self.stage = info.sidecar["fp32_stage"]

        def __call__(self, x, t, c):
            return cpu(x, t, c) + (0.0 if self.stage == "matmul" else 1.0)

        def close(self):
            pass

    monkeypatch.setattr(backends, "create", lambda name, info, **o: StandIn(info) if name == "tensorrt"
                        else real_create(name, info, **o))
    engine = tensorrt_build.build_engine(onnx_path, d / "model.engine", fp16_onnx=fp16)
    assert log["parsed"][0] == fp16 and log["parsed_precision"] == ["fp16", "fp16"]
    assert log["parsed"][1].name == "model.fp16.onnx" and log["parsed"][1].parent.name == "matmul"
    gate = json.loads(sidecar_path(engine).read_text())["fp16_gate"]
    assert gate["stage"] == "matmul" and [a["stage"] for a in gate["attempts"]] == ["conditioning", "matmul"]
    # the converted stage graphs were scratch files: nothing else is left beside the export
    assert sorted(p.name for p in d.iterdir()) == ["model.engine", "model.engine.json", "model.fp16.onnx", "model.onnx"]
    cpu.close()


# -- 2. extras: one ONNX Runtime distribution on every platform, floors that pair --------------------
PLATFORMS = {
    "linux x86_64": {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"},
    "linux aarch64": {"platform_system": "Linux", "platform_machine": "aarch64", "sys_platform": "linux"},
    "macos arm64": {"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"},
    "windows x64": {"platform_system": "Windows", "platform_machine": "AMD64", "sys_platform": "win32"},
    "windows arm64": {"platform_system": "Windows", "platform_machine": "ARM64", "sys_platform": "win32"},
}


def requirements(extras: tuple[str, ...], env: dict, python: str = "3.11") -> dict[str, Requirement]:
    """What ``pip install -e ".[extras]"`` asks for on ``env``: install_requires plus each extra, markers
    evaluated (the extras' own names resolved through setup.cfg, not the index)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += cfg["options.extras_require"][extra].splitlines()
    out = {}
    full = {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "os_name": "nt" if env["platform_system"] == "Windows" else "posix", "extra": "", **env}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(full):
            out[req.name.lower()] = req
    return out


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.13"])
def test_every_install_command_gets_exactly_one_onnxruntime(platform, python):
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    all_extras = tuple(cfg["options.extras_require"])
    for extras in [(), ("gpu",), ("dev",), ("gpu", "dev"), all_extras]:
        reqs = requirements(extras, PLATFORMS[platform], python)
        ort_dists = sorted(n for n in reqs if n in ("onnxruntime", "onnxruntime-gpu"))
        assert len(ort_dists) == 1, f"pip install -e '.[{','.join(extras)}]' on {platform} installs {ort_dists}"
        # onnxruntime-gpu has no Python 3.10 wheel after 1.23 (CUDA 12): the CPU build there
        assert ort_dists == (["onnxruntime-gpu"] if platform in ("linux x86_64", "windows x64") and python != "3.10"
                             else ["onnxruntime"])


def test_gpu_install_pairs_cuda_13_and_the_tensorrt_major_onnx_runtime_links():
    reqs = requirements(("gpu",), PLATFORMS["linux x86_64"])
    ort_gpu, trt = reqs["onnxruntime-gpu"], reqs["tensorrt-cu13"]
    # onnxruntime-gpu 1.27 is its first CUDA 13 build (torch's PyPI CUDA major); its TensorRT provider
    # links libnvinfer.so.10, so TensorRT stays on major 10 (docs/engines.md, "Install")
    assert ort_gpu.specifier.contains("1.27.0") and not ort_gpu.specifier.contains("1.26.0")
    assert trt.specifier.contains("10.13.3.9") and not trt.specifier.contains("11.0.0")
    assert not trt.specifier.contains("10.12.0.36")  # no tensorrt-cu13 wheel before 10.13
    assert not {"tensorrt", "tensorrt-cu12"} & set(reqs)  # `tensorrt` 11 is CUDA 13 but TensorRT 11


def test_no_requirement_that_nothing_imports():
    reqs = set(requirements(("gpu",), PLATFORMS["linux x86_64"]))
    assert not {"polygraphy", "cuda-python"} & reqs
    source = "\n".join(p.read_text() for d in ("medi_fast", "engines") for p in (REPO / d).rglob("*.py"))
    assert "import tensorrt" in source and "import onnxruntime" in source


# -- 3. doctor names the collision ------------------------------------------------------------------
def test_doctor_names_the_onnxruntime_collision(monkeypatch, capsys):
    import importlib.metadata

    from medi_fast.cli import main

    real = importlib.metadata.version
    installed = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}

    def version(name):
        if name not in installed:
            return real(name)
        if installed[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    line = doctor.onnxruntime_collision()
    assert line.startswith("onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are both installed")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu" in line
    assert main(["doctor"]) == 0
    assert f"COLLISION: {line}" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "check_inference",
                        lambda *a, on_row, **k: on_row(doctor.Row("inference", "ort-cpu", "ok")))
    report = doctor.run_checks(training=False)
    assert [(r.area, r.path, r.status, r.detail) for r in report.rows] == [
        ("install", "onnxruntime", "FAIL", line), ("inference", "ort-cpu", "ok", "")]  # the next row still runs
    installed["onnxruntime"] = None
    assert doctor.onnxruntime_collision() == "" and doctor.environment()["onnxruntime_collision"] is None


# -- 4. doctor's ORT GPU rows run the file an export directory gives them --------------------------
def test_doctor_runs_the_fp16_graph_on_the_backends_an_export_directory_gives_it(monkeypatch, tmp_path):
    stand_in = BackendEntry("ort-cuda", "onnxruntime_backend:OrtCPUBackend", ("onnx",), 40, "stand-in")
    monkeypatch.setattr(backends, "BACKENDS", {"torch": BACKENDS["torch"], "ort-cpu": BACKENDS["ort-cpu"],
                                               "ort-cuda": stand_in})
    rows = {r.path: r for r in doctor.check_inference(tmp_path, ddim_steps=1, timed_steps=1, batch=2)}
    # a reduced precision's DDIM images are not gated on the doctor's random weights (chaotic), fp32's are
    assert rows["ort-cuda"].detail == ("doctor.fp16.onnx vs torch fp32 (CPU); images not gated on random weights "
                                       "(--model CKPT gates them)"), rows["ort-cuda"].detail
    assert rows["ort-cuda"].metrics["rel_bound"] == doctor.FP16_REL and rows["ort-cuda"].metrics["image_bound"] is None
    assert rows["ort-cpu"].detail == "doctor.onnx vs torch fp32 (CPU)"
    assert rows["ort-cpu"].metrics["rel_bound"] == doctor.FP32_REL and rows["ort-cpu"].metrics["image_bound"] == 8


# -- 5. ort-trt: the graph's precision; TensorRT imported before its provider is probed -------------
@pytest.mark.parametrize("fp16", [False, True])
def test_ort_trt_precision_follows_the_graph(exported, fake_gpu, monkeypatch, tmp_path, fp16):
    seen = {}
    monkeypatch.setattr(ortb, "_session", lambda path, providers, *a, **k: seen.setdefault("providers", providers))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.3", {}))
    path = write_fp16_ungated(exported, tmp_path / "model.fp16.onnx") if fp16 else exported
    ortb.OrtTensorRTBackend(open_model(path), cache_dir=str(tmp_path / "c"))
    assert seen["providers"][0][1]["trt_fp16_enable"] == str(fp16)


class _Session:
    """ONNX Runtime with the TensorRT provider built in: it registers only when libnvinfer is already
    loaded (the fake ``tensorrt`` package's import sets the flag), else falls back to CUDA."""

    def __init__(self, model, sess_options=None, providers=()):
        wanted = providers[0]
        loaded = wanted != "TensorrtExecutionProvider" or "MEDI_FAST_TEST_LIBNVINFER" in __import__("os").environ
        self.providers = [wanted] if loaded else ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_providers(self):
        return self.providers


def test_tensorrt_is_imported_before_the_provider_probe_and_a_failed_probe_is_not_kept(fake_gpu, monkeypatch,
                                                                                       tmp_path):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _Session)
    monkeypatch.delenv("MEDI_FAST_TEST_LIBNVINFER", raising=False)
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    ok, why = BACKENDS["ort-trt"].availability()  # tensorrt is not installed yet
    assert not ok and "the tensorrt package does not import" in why
    # now installed: a package whose import loads libnvinfer, as the pip wheels' tensorrt does
    pkg = tmp_path / "site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nos.environ['MEDI_FAST_TEST_LIBNVINFER'] = '1'\n__version__ = '10.13.3'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert BACKENDS["ort-trt"].availability() == (True, "")  # the earlier failure was not kept
    assert "MEDI_FAST_TEST_LIBNVINFER" in __import__("os").environ
    sys.modules.pop("tensorrt", None)


def test_ort_trt_beside_another_tensorrt_major_says_which_is_installed(fake_gpu, monkeypatch):
    """TensorRT 11 imported, onnxruntime-gpu's TensorRT provider linked against 10: it falls back."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _Session)
    monkeypatch.delenv("MEDI_FAST_TEST_LIBNVINFER", raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", {}))
    ok, why = BACKENDS["ort-trt"].availability()
    assert not ok and why == ("TensorRT's libnvinfer (and the CUDA libraries) did not load (tensorrt 11.4.0 is installed; "
                              "onnxruntime-gpu 1.31's TensorRT provider links TensorRT 10)")
