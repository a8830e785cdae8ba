"""bf16 generation on a CPU (torch-bf16 for checkpoints, openvino-bf16 for ONNX files): offered only
where the CPU has bf16 units, run when asked by name (auto keeps fp32), gated per model against fp32
when it starts, and batch-invariant."""
from __future__ import annotations

import pytest
import torch

from medi_fast import backends
from medi_fast.backends import BACKENDS, accuracy, cpu_bf16_native, create, open_model
from medi_fast.backends.accuracy import AccuracyGateError
from medi_fast.cli import main
from medi_fast.errors import MediFastError

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def ckpt(tiny_ckpt):
    """conftest's random tiny-32 checkpoint (tiny.pt: LUAD, LUSC x 05, 44, 49)."""
    return tiny_ckpt


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bf16 units and no GPU (torch's bf16 arithmetic is the same where it is emulated)."""
    from medi_fast.backends import torch_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch_backend, "cpu_bf16_native", lambda: True)


def test_cpu_bf16_flags_are_read_from_cpuinfo():
    assert cpu_bf16_native(SAPPHIRE_RAPIDS) and cpu_bf16_native(NEOVERSE_V1)
    assert not cpu_bf16_native(ZEN3) and not cpu_bf16_native("")


def test_without_bf16_units_it_is_not_offered_and_refused_in_one_line(ckpt, monkeypatch):
    from medi_fast.backends import torch_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch_backend, "cpu_bf16_native", lambda: False)
    ok, why = BACKENDS["torch-bf16"].availability()
    assert not ok and why.startswith("this CPU has no bf16 units") and why.endswith("use --backend torch")
    info = open_model(ckpt)
    assert backends.resolve("auto", info) == "torch"
    with pytest.raises(MediFastError, match="^backend torch-bf16 is not available here: this CPU has no bf16 units"):
        create("torch-bf16", info)


def test_by_name_on_a_bf16_cpu_after_its_gate_and_auto_keeps_fp32(ckpt, bf16_cpu):
    info = open_model(ckpt)
    assert backends.resolve("auto", info) == "torch" and create("auto", info).name == "torch"
    den = create("torch-bf16", info)
    assert den.name == "torch-bf16" and den.device.type == "cpu"
    # bf16's 8 mantissa bits: an eps error of about 1e-2, inside the 3e-2 bound, none non-finite
    assert 1e-3 < den.gate.rel < accuracy.BF16_REL and den.gate.nonfinite == 0
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 990])
    cond = {"class": torch.tensor([0, 1, 2]), "tss": torch.tensor([0, 1, 2])}
    eps, ref = den(x, t, cond), create("torch", info)(x, t, cond)
    assert eps.dtype == torch.float32 and eps.is_contiguous()
    assert float((eps - ref).norm() / ref.norm()) < accuracy.BF16_REL


def test_a_failed_gate_is_refused_in_one_line_and_writes_nothing(ckpt, bf16_cpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(accuracy, "BF16_REL", 1e-6)
    with pytest.raises(AccuracyGateError, match="^torch-bf16 fails its accuracy gate on tiny.pt: relative eps error "):
        create("torch-bf16", open_model(ckpt))
    out = tmp_path / "synth"
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", "2", "--steps", "2",
              "--backend", "torch-bf16", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("medi-fast: error: torch-bf16 fails its accuracy gate on tiny.pt")
    assert "(bound 1e-06)" in err[-1] and err[-1].endswith("against the same model in fp32")
    assert not out.exists()


def test_generate_runs_bf16_by_name(ckpt, bf16_cpu, tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", "3", "--steps", "2",
                 "--backend", "torch-bf16", "--out", str(out)]) == 0
    assert ", backend torch-bf16\n" in capsys.readouterr().err
    assert len(list(out.rglob("*.png"))) == 3


def test_an_images_eps_does_not_depend_on_its_batch(ckpt, bf16_cpu):
    """bf16 kernels round differently per batch shape: the backend runs fixed chunks of rows, so an
    image gives the same eps alone, in a batch of 7, or in a batch of 40 (bit for bit)."""
    from medi_fast.backends.torch_backend import cpu_bf16_rows

    assert [cpu_bf16_rows(r) for r in (32, 64, 128, 256)] == [16, 4, 1, 1]
    den = create("torch-bf16", open_model(ckpt))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 1000, (40,), generator=g)
    cond = {"class": torch.randint(0, 3, (40,), generator=g), "tss": torch.randint(0, 3, (40,), generator=g)}

    def part(a, b):
        return den(x[a:b], t[a:b], {k: v[a:b] for k, v in cond.items()})

    whole = part(0, 40)
    assert whole.shape == (40, 3, 32, 32)
    assert torch.equal(whole, torch.cat([part(0, 7), part(7, 40)]))
    assert torch.equal(whole, torch.cat([part(i, i + 1) for i in range(40)]))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, tiny_ckpt):
    pytest.importorskip("openvino")
    from medi_fast import checkpoint
    from medi_fast.backends.contract import BatchRange
    from medi_fast.engines.export import ExportConfig, export_onnx

    return export_onnx(checkpoint.load(tiny_ckpt), tmp_path_factory.mktemp("ov") / "model.onnx",
                       ExportConfig(batch=BatchRange(1, 16, 64)))


@pytest.fixture
def bf16_units(monkeypatch):
    monkeypatch.setattr(backends, "cpu_bf16_native", lambda cpuinfo=None: True)


def test_openvino_bf16_by_name_gated_and_batch_invariant(onnx_model, bf16_units):
    info = open_model(onnx_model)
    assert "openvino-bf16" not in backends.auto_candidates("onnx") and backends.resolve("auto", info) == "ort-cpu"
    den = create("openvino-bf16", info)
    # more of the graph in bf16 than torch's autocast: a larger error, inside its own 5e-2 bound
    assert den.name == "openvino-bf16" and 1e-3 < den.gate.rel < accuracy.OPENVINO_BF16_REL == 5e-2
    assert den.gate.nonfinite == 0
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 1000, (20,), generator=g)
    cond = {"class": torch.randint(0, 3, (20,), generator=g), "tss": torch.randint(0, 4, (20,), generator=g)}
    whole = den(x, t, cond)
    alone = torch.cat([den(x[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()}) for i in range(20)])
    assert torch.equal(whole, alone)


def test_openvino_bf16_refused_without_bf16_units_or_past_its_gate(onnx_model, monkeypatch):
    monkeypatch.setattr(backends, "cpu_bf16_native", lambda cpuinfo=None: False)
    ok, why = BACKENDS["openvino-bf16"].availability()
    assert not ok and why.startswith("this CPU has no bf16 units")
    monkeypatch.setattr(backends, "cpu_bf16_native", lambda cpuinfo=None: True)
    monkeypatch.setattr(accuracy, "OPENVINO_BF16_REL", 1e-6)
    with pytest.raises(AccuracyGateError, match="^openvino-bf16 fails its accuracy gate on model.onnx"):
        create("openvino-bf16", open_model(onnx_model))
