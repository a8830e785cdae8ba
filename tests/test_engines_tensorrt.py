"""TensorRT engines: sidecar reading and the version/GPU check run everywhere (fake sidecars);
building and running engines needs TensorRT + a CUDA GPU (marked, skipped where absent)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")

from medi_fast import checkpoint  # noqa: E402
from medi_fast.backends import BACKENDS, create, open_model  # noqa: E402
from medi_fast.backends.contract import BatchRange  # noqa: E402
from medi_fast.backends.onnx_info import read_props  # noqa: E402
from medi_fast.backends.tensorrt_backend import SIDECAR_FORMAT, check_compatible, sidecar_path  # noqa: E402
from medi_fast.engines.export import ExportConfig, export_onnx  # noqa: E402
from medi_fast.errors import MediFastError  # noqa: E402

REBUILD = "medi-fast export ckpt.pt --out engines/tiny --tensorrt --batch 1,4,8"
BUILT = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3",
         "compute_capability": "9.0", "rebuild_command": REBUILD}


@pytest.fixture(scope="module")
def onnx_path(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "model.onnx"
    return export_onnx(checkpoint.load(tiny_ckpt), out, ExportConfig(batch=BatchRange(1, 4, 8)))


def _fake_engine(onnx_path, **overrides):
    engine = onnx_path.with_name("model.engine")
    engine.write_bytes(b"not a real engine")
    sidecar_path(engine).write_text(json.dumps({**BUILT, "metadata": read_props(onnx_path), **overrides}))
    return engine


def test_same_tensorrt_and_gpu_is_accepted():
    check_compatible(BUILT, tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_other_tensorrt_version_is_refused_with_rebuild_command():
    with pytest.raises(MediFastError) as e:
        check_compatible(BUILT, tensorrt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    msg = str(e.value)
    assert "TensorRT 10.3.0 (this machine: 10.7.0)" in msg and f"`{REBUILD}`" in msg and "\n" not in msg
    assert "GPU" not in msg


def test_other_gpu_is_refused_with_rebuild_command():
    with pytest.raises(MediFastError) as e:
        check_compatible(BUILT, tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
    msg = str(e.value)
    assert "GPU NVIDIA H100 80GB HBM3 sm 9.0 (this machine: NVIDIA A100-SXM4-40GB sm 8.0)" in msg
    assert msg.endswith(f"rebuild it here with `{REBUILD}`")


def test_engine_info_comes_from_the_sidecar_without_tensorrt(onnx_path, tiny_ckpt):
    engine = _fake_engine(onnx_path)
    info = open_model(engine)
    ck = checkpoint.load(tiny_ckpt)
    assert info.kind == "tensorrt" and info.model_hash == ck.hash
    assert info.spec.to_dict() == ck.spec.to_dict() and info.schedule == ck.schedule
    assert info.contract.batch == BatchRange(1, 4, 8)
    assert info.sidecar["gpu_name"] == BUILT["gpu_name"]


def test_engine_without_or_with_corrupt_sidecar_is_refused(onnx_path, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    with pytest.raises(MediFastError, match="has no sidecar model.engine.json; rebuild it"):
        open_model(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(MediFastError, match="sidecar .* is corrupt"):
        open_model(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MediFastError, match="not a medi-fast engine sidecar"):
        open_model(engine)


def test_tensorrt_backend_is_unavailable_with_a_reason_when_absent(onnx_path):
    ok, why = BACKENDS["tensorrt"].availability()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    assert why
    with pytest.raises(MediFastError, match="backend tensorrt is not available here"):
        create("tensorrt", open_model(_fake_engine(onnx_path)))


def _need_tensorrt():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.tensorrt
def test_build_and_run_fp16_engine_matches_torch(onnx_path, tiny_ckpt):
    _need_tensorrt()
    from medi_fast.engines.tensorrt_build import BuildConfig, build_engine

    engine = build_engine(onnx_path, onnx_path.with_name("built.engine"), BuildConfig(optimization_level=2))
    side = json.loads(sidecar_path(engine).read_text())
    assert side["tensorrt_version"] and side["compute_capability"]
    info = open_model(engine)
    model = checkpoint.load(tiny_ckpt).build().cuda()
    backend = create("tensorrt", info)
    for batch in (1, 5, 5, 8):  # 5 twice: the second call replays the captured CUDA graph
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        t = torch.randint(0, 1000, (batch,), device="cuda")
        cond = {"class": torch.randint(0, 3, (batch,), device="cuda"), "tss": torch.randint(0, 4, (batch,), device="cuda")}
        with torch.no_grad():
            ref = model(x, t, cond)
        eps = backend(x, t, cond)
        assert ((eps - ref).norm() / ref.norm()).item() <= 1e-2
    with pytest.raises(MediFastError, match="outside this engine's profile"):
        backend(torch.randn(9, 3, 32, 32, device="cuda"), torch.zeros(9, dtype=torch.long, device="cuda"),
                {"class": torch.zeros(9, dtype=torch.long), "tss": torch.zeros(9, dtype=torch.long)})


@pytest.mark.tensorrt
def test_ort_tensorrt_provider_matches_torch(onnx_path, tiny_ckpt):
    ok, why = BACKENDS["ort-trt"].availability()
    if not ok:
        pytest.skip(why)
    model = checkpoint.load(tiny_ckpt).build().cuda()
    backend = create("ort-trt", open_model(onnx_path))
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.tensor([0, 10, 500, 999], device="cuda")
    cond = {"class": torch.tensor([0, 1, 2, 0], device="cuda"), "tss": torch.tensor([0, 1, 2, 3], device="cuda")}
    with torch.no_grad():
        ref = model(x, t, cond)
    assert ((backend(x, t, cond) - ref).norm() / ref.norm()).item() <= 1e-2
