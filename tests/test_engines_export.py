"""ONNX export with folded conditioning, its metadata, parity vs torch, and the ort-cpu backend."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from medi_fast import checkpoint  # noqa: E402
from medi_fast.backends import create, open_model  # noqa: E402
from medi_fast.backends.contract import BatchRange, IOContract  # noqa: E402
from medi_fast.cli import main  # noqa: E402
from medi_fast.engines import parity  # noqa: E402
from medi_fast.engines.export import ExportConfig, export_onnx  # noqa: E402
from medi_fast.engines.fp16 import convert_to_fp16  # noqa: E402
from medi_fast.errors import MediFastError  # noqa: E402
from medi_fast.model import build_model  # noqa: E402
from medi_fast.schedule import Schedule  # noqa: E402


@pytest.fixture(scope="module")
def age_ckpt(tmp_path_factory):
    """class + tss (categorical) + age (continuous, float input with NaN = null)."""
    torch.manual_seed(3)
    model = build_model("tiny-32", classes=["LUAD", "LUSC", "BRCA"], metadata={"tss": ["05", "44"], "age": None})
    path = tmp_path_factory.mktemp("eng") / "age.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(timestep_spacing="trailing"), preset="tiny-32"), path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def exported(age_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "model.onnx"
    return export_onnx(age_ckpt, out, ExportConfig(batch=BatchRange(1, 4, 8)))


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.tensor([0, 999, 500, 1, 250, 750, 17][:batch])
    cond = {"class": torch.tensor([0, 1, 2, 3, 1, 0, 2][:batch]),  # 3 = null id
            "tss": torch.tensor([0, 1, 2, 0, 2, 1, 0][:batch]),  # 2 = null id
            "age": torch.tensor([55.0, math.nan, 71.5, 30.0, math.nan, 90.0, 1.0][:batch])}
    return x, t, cond


def test_contract_declares_names_dtypes_axes_and_profile(age_ckpt):
    c = IOContract.from_spec(age_ckpt.spec, 32, BatchRange.parse("2,8,32"))
    assert c.input_names == ["sample", "timestep", "class", "tss", "age"]
    assert [s.dtype for s in c.inputs] == ["float32", "int64", "int64", "int64", "float32"]
    assert c.output_names == ["eps"] and c.dynamic_axes()["sample"] == {0: "batch"}
    assert c.profile()["sample"] == ((2, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert c.profile()["tss"] == ((2,), (8,), (32,))
    assert IOContract.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(MediFastError, match="MIN <= OPT <= MAX"):
        BatchRange.parse("8,4,16")
    with pytest.raises(MediFastError, match="MIN,OPT,MAX"):
        BatchRange.parse("1,x")
    with pytest.raises(MediFastError, match="outside this engine's profile 2,8,32"):
        c.check_batch(64)


def test_graph_has_contract_inputs_folded_tables_and_metadata(exported, age_ckpt):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    io = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
          for i in model.graph.input}
    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert io == {"sample": (F, ["batch", 3, 32, 32]), "timestep": (I64, ["batch"]), "class": (I64, ["batch"]),
                  "tss": (I64, ["batch"]), "age": (F, ["batch"])}
    out = model.graph.output[0]
    assert out.name == "eps" and out.type.tensor_type.shape.dim[0].dim_param == "batch"
    # the embedding tables are graph constants of shape (len(vocab) + 1, width)
    shapes = {tuple(i.dims) for i in model.graph.initializer}
    assert (4, age_ckpt.spec["class"].dim) in shapes and (3, age_ckpt.spec["tss"].dim) in shapes
    assert model.opset_import[0].version == 18
    info = open_model(exported)
    assert info.kind == "onnx" and info.model_hash == age_ckpt.hash and info.resolution == 32
    assert info.preset == "tiny-32" and info.schedule == age_ckpt.schedule
    assert info.spec.to_dict() == age_ckpt.spec.to_dict()
    assert info.spec.encode({"class": "TCGA-LUSC", "tss": "44"})["class"].tolist() == [1]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["medi_fast.vocabularies"])["tss"] == ["05", "44"]


@pytest.mark.parametrize("batch", [1, 5])
def test_ort_cpu_matches_torch_fp32_on_dynamic_batch(exported, age_ckpt, batch):
    info = open_model(exported)
    backend = create("ort-cpu", info)
    ref_model = age_ckpt.build()
    x, t, cond = _inputs(batch, seed=batch)
    eps = backend(x, t, cond)
    with torch.no_grad():
        ref = ref_model(x, t, cond)
    assert eps.dtype == torch.float32 and eps.shape == (batch, 3, 32, 32) and eps.device == backend.device
    assert (eps - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 0.1  # a real comparison, not zeros vs zeros


@pytest.mark.slow
def test_parity_report_thresholds_and_ddim_uint8_figure(exported, age_ckpt):
    contract = open_model(exported).contract
    ref = parity.torch_reference(age_ckpt.build(), contract, ddim_steps=8)
    assert ref.eps.shape == (2, 3, 32, 32) and sorted(ref.inputs[1].tolist()) == [0, 999]
    report = parity.compare(ref, exported, contract)
    rows = {(r.check.split(" ")[0], r.metric): r.value for r in report.rows}
    assert report.ok, report.table()
    assert 0 < rows[("fp32", "max abs error")] <= 1e-4
    assert rows[("DDIM-8", "max level difference")] <= 3
    assert "max level difference" in report.table()


def test_fp16_graph_keeps_norms_and_timestep_encoding_fp32(exported):
    m16 = convert_to_fp16(onnx.load(str(exported)))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m16.graph.value_info) + list(m16.graph.input)}
    types.update({i.name: i.data_type for i in m16.graph.initializer})
    F, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    norms = [n for n in m16.graph.node if n.op_type == "InstanceNormalization"]
    sins = [n for n in m16.graph.node if n.op_type in ("Sin", "Cos")]
    convs = [n for n in m16.graph.node if n.op_type == "Conv"]
    assert norms and sins and convs
    assert all(types[n.input[0]] == F and types[n.output[0]] == F for n in norms + sins)
    assert all(types[n.input[1]] == F16 for n in convs)  # weights stored in half
    assert [o.type.tensor_type.elem_type for o in m16.graph.output] == [F]


def test_external_data_above_threshold(age_ckpt, tmp_path):
    path = export_onnx(age_ckpt, tmp_path / "model.onnx", ExportConfig(external_data_threshold=0))
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medi-tmp")]
    backend = create("ort-cpu", open_model(path))
    x, t, cond = _inputs(2)
    with torch.no_grad():
        ref = age_ckpt.build()(x, t, cond)
    assert (backend(x, t, cond) - ref).abs().max().item() <= 1e-4


def test_unknown_and_missing_attribute_names_are_refused(exported):
    backend = create("ort-cpu", open_model(exported))
    x, t, cond = _inputs(2)
    with pytest.raises(MediFastError, match=r"not conditioned on 'tsss' \(closest: 'tss'\); it takes class, tss, age"):
        backend(x, t, {**cond, "tsss": cond["tss"]})
    del cond["age"]
    with pytest.raises(MediFastError, match="no value for age"):
        backend(x, t, cond)


def test_missing_corrupt_and_foreign_onnx_files(exported, tmp_path):
    with pytest.raises(MediFastError, match="does not exist"):
        open_model(tmp_path / "nope.onnx")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(MediFastError, match="truncated or not an ONNX file"):
        open_model(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file at all" * 10)
    with pytest.raises(MediFastError, match="truncated or not an ONNX file"):
        open_model(garbage)
    foreign = onnx.load(str(exported))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(MediFastError, match="not exported by medi-fast"):
        open_model(tmp_path / "foreign.onnx")


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr()


@pytest.mark.slow
def test_cli_export_then_generate_without_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "engines" / "tiny"
    main(["export", str(tiny_ckpt), "--out", str(out), "--batch", "1,4,8", "--parity-steps", "4"])
    text = capsys.readouterr().out
    assert "fp32 graph vs torch fp32" in text and "max level difference" in text
    assert json.loads((out / "parity.json").read_text())["ok"] is True
    assert json.loads((out / "export.json").read_text())["batch"] == "1,4,8"
    main(["generate", str(out / "model.onnx"), "--class", "LUAD", "--tss", "05", "--n", "3", "--steps", "3",
          "--batch-size", "2", "--out", str(tmp_path / "synth")])
    capsys.readouterr()
    pngs = sorted((tmp_path / "synth").rglob("*.png"))
    assert len(pngs) == 3


def test_cli_export_errors_exit_2(tiny_ckpt, tmp_path, capsys):
    code, io = _cli(["export", tmp_path / "missing.pt", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in io.err and len(io.err.strip().splitlines()) == 1
    code, io = _cli(["export", tiny_ckpt, "--out", tmp_path / "o", "--batch", "4,2,1"], capsys)
    assert code == 2 and "MIN <= OPT <= MAX" in io.err
    code, io = _cli(["export", tiny_ckpt, "--out", tmp_path / "o", "--opset", "12"], capsys)
    assert code == 2 and "--opset 12 is not supported" in io.err
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if not has_trt:
        code, io = _cli(["export", tiny_ckpt, "--out", tmp_path / "o", "--tensorrt"], capsys)
        assert code == 2 and "--tensorrt needs" in io.err
    assert not (tmp_path / "o" / "model.onnx").exists()  # nothing partial was written


def test_ort_cpu_uses_physical_cores_and_full_optimisation(exported):
    from medi_fast.backends.onnxruntime_backend import physical_cores

    backend = create("ort-cpu", open_model(exported))
    assert backend.threads == physical_cores() >= 1
    opts = backend.session.get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.intra_op_num_threads == physical_cores()


@pytest.mark.gpu
def test_ort_cuda_io_binding_matches_cpu(exported):
    ok, why = __import__("medi_fast.backends", fromlist=["BACKENDS"]).BACKENDS["ort-cuda"].availability()
    if not ok:
        pytest.skip(why)
    info = open_model(exported)
    cpu, gpu = create("ort-cpu", info), create("ort-cuda", info, cuda_graph=True)
    for batch in (2, 5, 2):
        x, t, cond = _inputs(batch)
        a = cpu(x, t, cond)
        b = gpu(x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()})
        assert b.device.type == "cuda"
        assert np.abs(a.numpy() - b.cpu().numpy()).max() <= 1e-3


@pytest.mark.parametrize("name", ["ort-cpu", "openvino"])
def test_every_onnx_cpu_backend_matches_torch(exported, age_ckpt, name):
    from medi_fast.backends import BACKENDS

    if name not in BACKENDS:
        pytest.skip(f"{name} is not registered")
    ok, why = BACKENDS[name].availability()
    if not ok:
        pytest.skip(why)
    backend = create(name, open_model(exported))
    x, t, cond = _inputs(3, seed=7)
    with torch.no_grad():
        ref = age_ckpt.build()(x, t, cond)
    eps = backend(x, t, cond)
    assert eps.dtype == torch.float32 and eps.shape == ref.shape
    assert (eps - ref).abs().max().item() <= 1e-4
