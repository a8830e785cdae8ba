"""The fp16 accuracy gate with the ONNX Runtime fp16 model (on the CPU here, where its figures are
fp16 storage, not arithmetic: enough to exercise the stages): a healthy model passes at the default
stage; a model whose conditioning activations overflow fp16 engages the fallback; a model nothing
can fix is refused in one line and nothing is written.  Without a GPU an export writes the
default-stage graph marked as not yet gated."""
from __future__ import annotations

import json

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from medi_fast import backends, checkpoint  # noqa: E402
from medi_fast.backends.contract import BatchRange  # noqa: E402
from medi_fast.conditioning import ConditionSpec  # noqa: E402
from medi_fast.engines.export import ExportConfig, export_onnx  # noqa: E402
from medi_fast.engines.gate import (PENDING, STAGES, fp16_gate, stage_nodes, write_fp16_gated,  # noqa: E402
                                    write_fp16_ungated)
from medi_fast.errors import MediFastError  # noqa: E402
from medi_fast.model import build_model, get_preset  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402


def _export(tmp_path, name, overflow: bool):
    torch.manual_seed(5)
    d_t = get_preset("tiny-32").d_t
    spec = ConditionSpec.build(d_t, ["LUAD", "LUSC"], {"tss": ["05", "44"]}, mode="linear")
    model = build_model("tiny-32", spec)
    if overflow:
        # Same function in fp32 (the scale cancels in the linear combination), but the embedding
        # tables hold values ~1e5: not representable in fp16 (max 65504), so an fp16 build gives inf/NaN.
        with torch.no_grad():
            for table in model.conditioner.tables.values():
                table.weight.mul_(1e5)
            model.conditioner.linear_comb.weight.mul_(1e-5)
    ck = tmp_path / f"{name}.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32"), ck)
    return export_onnx(checkpoint.load(ck), tmp_path / name / "model.onnx", ExportConfig(batch=BatchRange(1, 4, 8)))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("gate"), "healthy", overflow=False)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("gate"), "overflow", overflow=True)


def _gate_record(path):
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props["medi_fast.precision"], json.loads(props["medi_fast.fp16_gate"])


def test_a_healthy_model_passes_at_the_default_stage(healthy):
    out = healthy.with_name("model.fp16.onnx")
    result = write_fp16_gated(healthy, out, backend="ort-cpu")
    assert result.stage == "default" and [s for s, _ in result.attempts] == ["default"]
    # random weights: the eps error is what fp16 changes; no DDIM image figure is judged
    assert 0 < result.check.rel <= 1e-2 and result.check.image_levels is None
    precision, record = _gate_record(out)
    assert precision == "fp16" and record["stage"] == "default" and record["ok"] is True
    assert record["backend"] == "ort-cpu"
    g = onnx.load(str(out))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer)


def test_overflow_in_the_conditioning_path_engages_the_fallback(overflowing):
    info = backends.open_model(overflowing)
    # the fp32 graph is fine: the overflow exists only in fp16
    ref = backends.create("ort-cpu", info)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    cond = {"class": torch.tensor([0, 2]), "tss": torch.tensor([1, 2])}
    assert torch.isfinite(ref(x, t, cond)).all()
    out = overflowing.with_name("model.fp16.onnx")
    result = write_fp16_gated(overflowing, out, backend="ort-cpu")
    (first, failed), (second, passed) = result.attempts
    assert (first, second) == ("default", "conditioning") and result.stage == "conditioning"
    assert not failed.ok and failed.nonfinite > 0
    assert passed.ok and passed.nonfinite == 0 and passed.rel <= 1e-2
    assert _gate_record(out)[1]["stage"] == "conditioning"
    graph = onnx.load(str(overflowing)).graph
    assert stage_nodes(graph, "default") == set() and stage_nodes(graph, "conditioning")
    assert stage_nodes(graph, "conditioning") < stage_nodes(graph, "matmul")


def test_nothing_passes_refuses_in_one_line_and_writes_nothing(overflowing):
    out = overflowing.with_name("refused.fp16.onnx")
    with pytest.raises(MediFastError) as e:
        write_fp16_gated(overflowing, out, backend="ort-cpu", stages=("default",))
    msg = str(e.value)
    assert "does not match fp32 even with default layers pinned" in msg and "NaN/inf" in msg and "\n" not in msg
    assert "export without it (--no-fp16)" in msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".medi-tmp")]


def test_the_gate_tries_every_stage_and_closes_failed_candidates(healthy):
    info = backends.open_model(healthy)
    ref = backends.create("ort-cpu", info)
    closed = []

    class Off:
        def __init__(self, stage):
            self.stage = stage

        def __call__(self, x, t, c):
            return ref(x, t, c) * 1.5

        def close(self):
            closed.append(self.stage)

    with pytest.raises(MediFastError, match="even with matmul layers pinned"):
        fp16_gate(ref, Off, info.contract, info.spec)
    assert closed == list(STAGES)


def test_without_a_gpu_the_default_stage_is_written_marked_pending(healthy):
    out = healthy.with_name("pending.fp16.onnx")
    assert write_fp16_ungated(healthy, out) == out
    precision, record = _gate_record(out)
    assert precision == "fp16" and record == {"stage": "default", "ok": None, "pending": PENDING}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".medi-tmp")]
    half, full = backends.create("ort-cpu", backends.open_model(out)), backends.create("ort-cpu", backends.open_model(healthy))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 999])
    cond = {"class": torch.tensor([0, 2]), "tss": torch.tensor([1, 2])}
    a, b = half(x, t, cond), full(x, t, cond)
    assert 0 < float((a - b).norm() / b.norm()) <= 1e-2  # really fp16, and the same function
