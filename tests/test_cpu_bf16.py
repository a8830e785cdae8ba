"""bf16 generation on a CPU (torch-bf16 for checkpoints, openvino-bf16 for ONNX files): offered only
where the CPU has bf16 units, what auto picks there, gated per model against fp32 when it starts (auto
falls back to fp32 saying why), batch-invariant, and on a trained model within a few grey levels of fp32."""
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


def test_auto_picks_bf16_on_a_bf16_cpu_after_its_gate(ckpt, bf16_cpu):
    info = open_model(ckpt)
    assert backends.resolve("auto", info) == "torch-bf16"
    assert BACKENDS["torch-bf16"].load_class().gated_here() and not BACKENDS["torch"].load_class().gated_here()
    den = create("auto", info)
    assert den.name == "torch-bf16" and den.device.type == "cpu" and den.notes == ()
    # bf16's 8 mantissa bits: an eps error of about 1e-2, inside the 3e-2 bound, none non-finite
    assert 1e-3 < den.gate.rel < accuracy.BF16_REL and den.gate.nonfinite == 0
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 990])
    cond = {"class": torch.tensor([0, 1, 2]), "tss": torch.tensor([0, 1, 2])}
    eps, ref = den(x, t, cond), create("torch", info)(x, t, cond)
    assert eps.dtype == torch.float32 and eps.is_contiguous()
    assert float((eps - ref).norm() / ref.norm()) < accuracy.BF16_REL


def test_auto_falls_back_to_fp32_past_a_failed_gate_and_says_why(ckpt, bf16_cpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(accuracy, "BF16_REL", 1e-6)
    den = create("auto", open_model(ckpt))
    assert den.name == "torch" and len(den.notes) == 1
    assert den.notes[0].startswith("torch-bf16 fails its accuracy gate on tiny.pt: relative eps error ")
    assert den.notes[0].endswith("against the same model in fp32; using torch")
    out = tmp_path / "synth"
    assert main(["generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert ", backend torch\n" in err and "torch-bf16 fails its accuracy gate on tiny.pt" in err
    assert len(list(out.rglob("*.png"))) == 2


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


def test_generate_runs_bf16_by_default_and_fp32_by_name(ckpt, bf16_cpu, tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    assert ", backend torch-bf16\n" in capsys.readouterr().err
    assert len(list(out.rglob("*.png"))) == 3
    assert main(["generate", str(ckpt), "--class", "LUAD", "--tss", "05", "--n", "3", "--steps", "2",
                 "--backend", "torch", "--out", str(tmp_path / "fp32")]) == 0
    assert ", backend torch\n" in capsys.readouterr().err


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


def test_openvino_bf16_is_autos_choice_gated_and_batch_invariant(onnx_model, bf16_units):
    info = open_model(onnx_model)
    assert backends.available("onnx")[:2] == ["openvino-bf16", "ort-cpu"]
    den = create("auto", info)
    # more of the graph in bf16 than torch's autocast: a larger error, inside its own 5e-2 bound (OpenVINO
    # computes in fp32 where the CPU has no bf16 units: the error is then fp32's)
    assert den.name == "openvino-bf16" and den.gate.rel < accuracy.OPENVINO_BF16_REL == 5e-2
    assert den.gate.nonfinite == 0 and (den.gate.rel > 1e-3 or not cpu_bf16_native())
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
    assert backends.available("onnx")[0] == "ort-cpu" and create("auto", open_model(onnx_model)).name == "ort-cpu"
    monkeypatch.setattr(backends, "cpu_bf16_native", lambda cpuinfo=None: True)
    monkeypatch.setattr(accuracy, "OPENVINO_BF16_REL", 1e-6)
    with pytest.raises(AccuracyGateError, match="^openvino-bf16 fails its accuracy gate on model.onnx"):
        create("openvino-bf16", open_model(onnx_model))
    den = create("auto", open_model(onnx_model))  # auto: ONNX Runtime's fp32, saying why
    assert den.name == "ort-cpu" and den.notes[0].startswith("openvino-bf16 fails its accuracy gate on model.onnx")
    assert den.notes[0].endswith("; using ort-cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-32 trained 200 steps in fp32 on a small demo cohort (about 20 s on 2 cores), and its ONNX export:
    a model whose DDIM run is not chaotic, as a random one's is."""
    from medi_fast.demo import DemoConfig, stages

    out = tmp_path_factory.mktemp("trained")
    cfg = DemoConfig(out=str(out), n_per_combo=20, n_test_per_combo=2, render_resolution=32, preset="tiny-32",
                     train_steps=200, batch_size=16, k=4, probe_ratio=1.0, n_synthetic_per_combo=3, precision="fp32")
    stages.build_data(cfg, out)
    ckpt = stages.train_model(cfg, out, "medi", "class,tss")
    return ckpt, stages.export_model(ckpt, out, "medi")


@pytest.mark.skipif(not cpu_bf16_native(), reason="this CPU has no bf16 units (avx512_bf16/amx_bf16): bf16 is not offered")
def test_on_a_trained_model_bf16_images_are_within_a_few_grey_levels_of_fp32(trained):
    """The demo's sampler (DDIM-15) from the same noise: each bf16 path against fp32 on 64 images.  Bound:
    at most accuracy.IMAGE_LEVELS (8) levels anywhere, 0.5 on average (measured: 1 and 0.12; on the demo's
    700-step model 10 and 0.17 for openvino-bf16, benchmarks/cpu_bf16_quality.py)."""
    import numpy as np
    import pandas as pd

    import medi_fast
    from medi_fast import plan as plans

    ckpt, onnx = trained
    spec = open_model(ckpt).spec
    combos = pd.DataFrame([(c, s, 4) for c in spec["class"].vocab.names for s in ("S1", "S2", "S3", "S4")],
                          columns=["class", "tss", "count"])
    plan = plans.from_counts(spec, combos, 0)
    assert len(plan) == 64

    def images(path, backend):
        pipe = medi_fast.load(path, backend=backend, steps=15, batch_size=64)
        assert pipe.backend == backend
        return pipe.run(plan).astype(np.int16)

    fp32 = images(onnx, "ort-cpu")
    paths = [(ckpt, "torch-bf16")] + ([(onnx, "openvino-bf16")] if BACKENDS["openvino-bf16"].availability()[0] else [])
    for path, backend in paths:
        diff = np.abs(images(path, backend) - fp32)
        assert diff.max() <= accuracy.IMAGE_LEVELS and diff.mean() <= 0.5, (backend, diff.max(), diff.mean())
        assert diff.max() > 0  # bf16 arithmetic did run
