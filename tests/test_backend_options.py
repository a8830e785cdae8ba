"""Backend options are the constructor's keyword arguments: unknown ones fail with the closest name;
ModelInfo carries the contract, sidecar and checkpoint as typed fields."""
from __future__ import annotations

import inspect

import pytest

pytest.importorskip("onnxruntime")

import medi_fast  # noqa: E402
from medi_fast import checkpoint  # noqa: E402
from medi_fast.backends import BACKENDS, backend_options, create, open_model  # noqa: E402
from medi_fast.backends.contract import BatchRange, IOContract  # noqa: E402
from medi_fast.engines.export import ExportConfig, export_onnx  # noqa: E402
from medi_fast.errors import MediFastError  # noqa: E402


@pytest.fixture(scope="module")
def onnx_path(tiny_ckpt, tmp_path_factory):
    return export_onnx(checkpoint.load(tiny_ckpt), tmp_path_factory.mktemp("opt") / "model.onnx",
                       ExportConfig(batch=BatchRange(1, 4, 8)))


def test_unknown_option_names_the_closest_valid_one(onnx_path, tiny_ckpt):
    with pytest.raises(MediFastError) as e:
        medi_fast.load(onnx_path, thread=1)
    msg = str(e.value)  # auto: among every backend it could pick here
    assert msg.startswith("no backend that auto picks here takes option 'thread' (closest: 'threads'); they take ")
    assert "threads, opt_level, sequential" in msg
    with pytest.raises(MediFastError) as e:
        medi_fast.load(onnx_path, backend="ort-cpu", thread=1)
    msg = str(e.value)
    assert "backend ort-cpu has no option 'thread' (closest: 'threads')" in msg
    assert msg.endswith("it takes threads, opt_level, sequential, device")
    # an option auto's first choice does not take (openvino-bf16 on a CPU with bf16 units): the best that does
    assert medi_fast.load(onnx_path, threads=1).backend == "ort-cpu"
    with pytest.raises(MediFastError, match="backend torch has no option 'devcie' \\(closest: 'device'\\)"):
        medi_fast.load(tiny_ckpt, backend="torch", devcie="cpu")
    with pytest.raises(MediFastError, match="backend ort-cpu has no option 'cuda_graph'"):
        create("ort-cpu", open_model(onnx_path), cuda_graph=True)


def test_known_options_reach_the_backend(onnx_path):
    assert medi_fast.load(onnx_path, backend="ort-cpu", threads=1).denoiser.threads == 1
    with pytest.raises(MediFastError, match="backend ort-cpu runs on the CPU, not cuda"):
        create("ort-cpu", open_model(onnx_path), device="cuda")


def test_every_backend_declares_its_options():
    """No backend swallows options: **kwargs only where a subclass hands them to its base."""
    for name, entry in BACKENDS.items():
        try:
            cls = entry.load_class()
        except ImportError:
            continue
        opts = backend_options(cls)
        assert opts and len(set(opts)) == len(opts), name
        base_init = [k for k in cls.__mro__ if "__init__" in k.__dict__][-2]  # the last before Backend/object
        params = inspect.signature(base_init.__init__).parameters.values()
        assert not any(p.kind == p.VAR_KEYWORD for p in params), f"{name}: {base_init.__name__} swallows options"
    assert backend_options(BACKENDS["ort-trt"].load_class()) == ["device", "cuda_graph", "cache_dir"]
    assert backend_options(BACKENDS["torch-compile"].load_class()) == ["device", "mode", "ema"]


def test_model_info_has_typed_fields(onnx_path, tiny_ckpt):
    info = open_model(onnx_path)
    assert isinstance(info.contract, IOContract) and info.sidecar is None and info.checkpoint is None
    assert "contract" not in info.extra and info.extra["precision"] == "fp32"
    ck = open_model(tiny_ckpt)
    assert ck.checkpoint is not None and ck.checkpoint.hash == ck.model_hash and ck.contract is None
