import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread per process: test processes (pytest, CLI subprocesses, DDP ranks) run side by
# side, and oversubscribed OpenMP threads spin-wait each other into 10-30x slowdowns.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_METADATA = REPO.parent / "shared" / "data" / "tcga_ut_slide_metadata.csv"


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own empty directory: commands that keep per-directory state
    (`export` records the default model in ./.medi-fast/, ./medi-fast.toml holds option defaults)
    neither see the checkout's nor leave anything in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDI_FAST_MODEL", raising=False)


def _run_cli(*args, cwd=None, timeout=600):
    """Run `medi-fast ARGS` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "medi_fast.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def run_cli():
    """`run_cli("generate", ...)`: the CLI in a subprocess, as a user runs it."""
    return _run_cli


@pytest.fixture
def refused(capsys):
    """`refused([...])`: the CLI in-process; asserts a one-line refusal (exit 2, no traceback) and returns it."""
    def run(args) -> str:
        from medi_fast.cli import main

        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]
    return run


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny-32 checkpoint conditioned on class + tss (LUAD, LUSC x 05, 44, 49)."""
    from medi_fast import checkpoint
    from medi_fast.model import build_model
    from medi_fast.schedule import Schedule

    torch.manual_seed(0)
    model = build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44", "49"]})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32", provenance={"kind": "test"}), path)
    return path


@pytest.fixture(scope="session")
def tiny_cls_ckpt(tmp_path_factory) -> Path:
    from medi_fast import checkpoint
    from medi_fast.model import build_model
    from medi_fast.schedule import Schedule

    torch.manual_seed(1)
    model = build_model("tiny-32", classes=["LUAD", "LUSC"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny_cls.pt"
    checkpoint.save(checkpoint.from_model(model, Schedule(), preset="tiny-32"), path)
    return path


@pytest.fixture(scope="module")
def tiny_sampler_case():
    """A tiny random MeDiUNet, conditioning for 2 samples and their x_T: the sampler parity tests' case."""
    from medi_fast.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny-32", classes=["A", "B"], metadata={"tss": ["1", "2"]}).eval()
    cond = model.spec.encode({"class": ["B", "A"], "tss": ["1", "2"]}, 2)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    return model, cond, x_T


@pytest.fixture(scope="session")
def distill_teacher(tmp_path_factory) -> Path:
    """A tiny 16 px MeDi teacher trained for 2 steps on the synthetic set (with cond-drop, for guidance): the
    teacher of the distillation tests (progressive and consistency)."""
    from medi_fast.cli import main
    from medi_fast.data.index import build_index
    from medi_fast.data.pack import pack_index
    from medi_fast.data.synth import SynthConfig, render_dataset

    root = tmp_path_factory.mktemp("distill")
    render_dataset(SynthConfig.full(("LUAD", "LUSC"), ("S1", "S2"), n_per_combo=4, resolution=16), root / "ds")
    df = build_index(root / "ds", root / "ds" / "clinical.csv")
    pack = pack_index(df, 16, root / "pack16")
    main(["train", "--data", str(pack), "--preset", "tiny-32", "--resolution", "16", "--batch-size", "4",
          "--steps", "2", "--out", str(root / "run"), "--workers", "0", "--checkpoint-every", "2",
          "--grid-every", "0", "--device", "cpu", "--cond-drop", "0.1"])
    return root / "run" / "checkpoints" / "step-00000002.pt"


@pytest.fixture
def interrupt_on_call(monkeypatch):
    """``interrupt_on_call(module, name, n)``: ``module.name`` raises KeyboardInterrupt (Ctrl-C) on its n-th
    call; returns the original, to put back with ``monkeypatch.setattr(module, name, original)``."""
    def arm(module, name: str, n: int):
        real = getattr(module, name)
        calls = {"n": 0}

        def interrupted(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(module, name, interrupted)
        return real
    return arm


@pytest.fixture
def generates_with_own_sampler(capsys):
    """``check(student, tmp_path, steps, sampler)``: the student exported to ONNX, and generating from the
    checkpoint (torch) and from the export (ort-cpu) with no warning, runs its own ``sampler``-``steps``
    (manifest.csv says so).  Returns the ONNX path."""
    import pandas as pd

    from medi_fast.cli import main

    def check(student, tmp_path, steps: int, sampler: str):
        exp = tmp_path / "exp"
        assert main(["export", str(student), "--out", str(exp), "--no-fp16", "--parity-steps", "2"]) == 0
        for model, backend in ((student, "torch"), (exp / "model.onnx", "ort-cpu")):
            dest = tmp_path / f"synth-{backend}"
            capsys.readouterr()
            assert main(["generate", str(model), "--class", "LUSC", "--tss", "S1", "--n", "2", "--out", str(dest),
                         "--backend", backend, "--quiet"]) == 0
            assert "warning" not in capsys.readouterr().err
            m = pd.read_csv(dest / "manifest.csv")
            assert set(m["steps"]) == {steps} and set(m["sampler"]) == {sampler} and len(m) == 2
        return exp / "model.onnx"
    return check
