"""The trainer end to end on the synthetic set: run directory, checkpoints usable for generation,
sample grids, and the user errors (one line, exit code 2)."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.cli import main
from medi_fast.samplers import ddim
from medi_fast.training.config import TrainConfig
from medi_fast.training.rundir import read_metrics


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from medi_fast.data.index import build_index
    from medi_fast.data.pack import pack_index
    from medi_fast.data.synth import SynthConfig, render_dataset

    root = tmp_path_factory.mktemp("synth")
    render_dataset(SynthConfig.full(("LUAD", "LUSC"), ("S1", "S2", "S3"), n_per_combo=8, resolution=16), root / "ds")
    df = build_index(root / "ds", root / "ds" / "clinical.csv")
    return pack_index(df, 16, root / "pack16"), df


def _train(pack, out, *extra):
    return main(["train", "--data", str(pack), "--preset", "tiny-32", "--resolution", "16", "--batch-size", "4",
                 "--steps", "4", "--out", str(out), "--workers", "0", "--checkpoint-every", "2", "--log-every", "1",
                 "--grid-every", "4", "--grid-steps", "2", "--grid-rows", "2", "--grid-cols", "3", "--lr", "1e-3",
                 "--device", "cpu", *extra])


def _fail(args, capsys) -> str:
    capsys.readouterr()  # drop earlier output (progress bars)
    with pytest.raises(SystemExit) as e:
        main(args) if args and args[0] != "__train__" else _train(*args[1:])
    assert e.value.code == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]  # a progress bar may precede the error line
    assert err.startswith("medi-fast: error: ") and "Traceback" not in full
    return err


def test_train_run_directory_and_checkpoint_generates(pack, tmp_path):
    pack_dir, df = pack
    split = tmp_path / "train.csv"
    slides = sorted(df["slide_submitter_id"].unique())[:-1]  # drop one slide
    pd.DataFrame({"slide_submitter_id": slides}).to_csv(split, index=False)
    out = tmp_path / "run"
    assert _train(pack_dir, out, "--split", str(split), "--condition", "class,tss,age", "--cond-drop", "0.1",
                  "--grad-accum", "2") == 0
    cfg = TrainConfig.read(out / "config.json")
    assert cfg.condition == "class,tss,age" and cfg.grad_accum == 2 and cfg.split == str(split)
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert (out / "tensorboard").is_dir()
    # checkpoints every 2 steps, each loadable, with EMA and provenance; generation works
    ck = ckpt_io.load(out / "checkpoints" / "step-00000004.pt")
    assert (out / "checkpoints" / "step-00000002.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert ck.ema_state_dict is not None and ck.provenance["step"] == 4 and ck.preset == "tiny-32"
    assert ck.spec.names == ["class", "tss", "age"] and ck.spec["age"].kind == "continuous"
    assert ck.spec.class_vocab.names == ("LUAD", "LUSC") and set(ck.spec["tss"].vocab.names) == {"S1", "S2", "S3"}
    model = ck.build()
    cond = ck.spec.encode({"class": "LUSC", "tss": "S2", "age": 60.0}, 2)
    with torch.no_grad():
        x = ddim(model, torch.randn(2, 3, 16, 16), ck.schedule.timesteps(3), ck.schedule, cond)
    assert torch.isfinite(x).all()
    # EMA differs from the raw weights after a few steps (the checkpoint carries both)
    assert any(not torch.equal(ck.state_dict[k], ck.ema_state_dict[k]) for k in ck.state_dict)
    # the grid: 2 classes x 3 sites of 16 px
    from PIL import Image

    grid = Image.open(out / "samples" / "step-00000004.png")
    assert grid.size == (3 * 16, 2 * 16)
    # resume state loads without unpickling code
    state = torch.load(out / "checkpoints" / "step-00000004.state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "rng" in state


def test_cls_only_uniform_sampling(pack, tmp_path):
    out = tmp_path / "cls"
    assert _train(pack[0], out, "--condition", "class", "--sampling", "uniform", "--grid-every", "0") == 0
    assert ckpt_io.load(out / "checkpoints" / "step-00000004.pt").spec.cls_only


def test_v_prediction_trains_against_v_and_is_recorded(pack, tmp_path):
    runs = {}
    for kind in ("epsilon", "v_prediction"):
        assert _train(pack[0], tmp_path / kind, "--grid-every", "0", "--prediction-type", kind) == 0
        runs[kind] = ckpt_io.load(tmp_path / kind / "checkpoints" / "step-00000004.pt")
        assert runs[kind].schedule.prediction_type == kind
        assert TrainConfig.read(tmp_path / kind / "config.json").prediction_type == kind
    # same seed, weights, rows, t and noise: only the target differs, so the first step's loss does
    first = {k: float(read_metrics(tmp_path / k / "metrics.csv")[0]["loss"]) for k in runs}
    assert first["epsilon"] != pytest.approx(first["v_prediction"], rel=1e-3)
    # the checkpoint samples through the converting samplers
    ck = runs["v_prediction"]
    with torch.no_grad():
        x = ddim(ck.build(), torch.randn(2, 3, 16, 16), ck.schedule.timesteps(3), ck.schedule,
                 ck.spec.encode({"class": "LUAD", "tss": "S1"}, 2))
    assert torch.isfinite(x).all()


def test_user_errors(pack, tmp_path, capsys):
    pack_dir, df = pack
    out = tmp_path / "e"
    err = _fail(["__train__", pack_dir, out, "--condition", "class,smoking"], capsys)
    assert "column 'smoking' is not in the training metadata" in err and "tissue_source_site" in err
    empty = tmp_path / "empty.csv"
    pd.DataFrame({"slide_submitter_id": ["TCGA-XX-0000-01Z-00-DX1"]}).to_csv(empty, index=False)
    err = _fail(["__train__", pack_dir, out, "--split", str(empty)], capsys)
    assert "no patch of this dataset belongs to a slide in" in err
    # preset/resolution mismatch: the pack is 16 px, tiny-32 trains at 32 by default
    err = _fail(["train", "--data", str(pack_dir), "--preset", "tiny-32", "--out", str(out), "--device", "cpu"], capsys)
    assert "16 px, not 32" in err
    err = _fail(["train", "--data", str(pack_dir), "--preset", "tiny-32", "--resolution", "18", "--out", str(out)], capsys)
    assert "--resolution 18 does not fit --preset tiny-32" in err
    err = _fail(["train", "--data", str(pack_dir), "--batch-size", "0", "--out", str(out)], capsys)
    assert "--batch-size must be >= 1" in err
    err = _fail(["__train__", pack_dir, out, "--precision", "fp16"], capsys)
    assert "fp16 needs a CUDA GPU" in err
    err = _fail(["__train__", pack_dir, out, "--prediction-type", "v"], capsys)
    assert "--prediction-type must be one of epsilon, v_prediction, sample, got 'v'" in err
    err = _fail(["train", "--config", str(tmp_path / "missing.json"), "--out", str(out)], capsys)
    assert "cannot read training config" in err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


def test_existing_run_needs_resume(pack, tmp_path, capsys):
    out = tmp_path / "r"
    assert _train(pack[0], out, "--grid-every", "0", "--condition", "class") == 0
    err = _fail(["__train__", pack[0], out, "--grid-every", "0", "--condition", "class"], capsys)
    assert "already holds a run" in err and "--resume" in err
    # `--out DIR --resume` alone reads DIR/config.json; here it also extends the run to 6 steps
    assert main(["train", "--out", str(out), "--resume", "--steps", "6"]) == 0
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert TrainConfig.read(out / "config.json").steps == 6
    assert ckpt_io.load(out / "checkpoints" / "step-00000006.pt").spec.cls_only


def test_out_of_memory_message(pack, tmp_path, capsys, monkeypatch):
    from medi_fast.model import MeDiUNet

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MeDiUNet, "forward", oom)
    err = _fail(["__train__", pack[0], tmp_path / "oom", "--condition", "class"], capsys)
    assert "out of memory at --batch-size 4" in err and "lower --batch-size" in err and "--grad-accum" in err


def test_help_lists_every_option(capsys):
    from dataclasses import fields

    main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_worker_loader_matches_main_process(pack):
    from medi_fast.data.dataset import open_dataset
    from medi_fast.training.data import Batches
    from medi_fast.training.stream import IndexStream, sampling_weights

    ds = open_dataset(pack[0])
    stream = IndexStream(sampling_weights(ds.table, "class"), 4, seed=1)
    a, b = iter(Batches(ds, stream, 7, 0, False)), iter(Batches(ds, stream, 7, 2, False))
    for k in range(3):
        (ia, xa), (ib, xb) = next(a), next(b)
        assert ia == ib == stream.batch(7 + k) and torch.equal(xa, xb) and xa.shape == (4, 3, 16, 16)


def _losses(out) -> np.ndarray:
    return np.array([float(r["loss"]) for r in read_metrics(out / "metrics.csv")])


@pytest.mark.slow
def test_compile_and_bf16_follow_the_fp32_eager_run(pack, tmp_path):
    """--compile (inductor, on the CPU here) and --precision bf16 train the same model on the same
    batches and noise: their losses track the eager fp32 run (CUDA autocast is not tested here)."""
    pack_dir, _ = pack
    common = ("--condition", "class,tss", "--grid-every", "0", "--seed", "3")
    assert _train(pack_dir, tmp_path / "eager", *common, "--precision", "fp32") == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert _train(pack_dir, tmp_path / "compiled", *common, "--precision", "fp32", "--compile") == 0
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the model
    assert _train(pack_dir, tmp_path / "bf16", *common, "--precision", "bf16") == 0
    eager, compiled, bf16 = (_losses(tmp_path / n) for n in ("eager", "compiled", "bf16"))
    assert len(eager) == len(compiled) == len(bf16) == 4 and np.isfinite(bf16).all()
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    np.testing.assert_allclose(bf16, eager, rtol=5e-2)
    assert np.abs(bf16 - eager).max() > 0  # bf16 really ran in reduced precision
    ck = ckpt_io.load(tmp_path / "compiled" / "checkpoints" / "best.pt")  # no "_orig_mod." prefixes
    ck.build()


def _files(root) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def finished_run(pack, tmp_path):
    out = tmp_path / "r"
    assert _train(pack[0], out, "--grid-every", "0", "--condition", "class") == 0
    return out


def test_resume_with_other_options_is_refused_naming_them(pack, finished_run, tmp_path, capsys):
    """`--out DIR --resume` reads DIR/config.json; an option given beside it that changes what the run
    computes is refused (a new --lr under the restored optimiser state is another run), nothing written."""
    import shutil

    out = finished_run
    shutil.copytree(pack[0], tmp_path / "pack-copy")
    before = _files(tmp_path)
    for extra, expected in ((("--lr", "0.5"), "--lr 0.001 (now 0.5)"),
                            (("--ema-decay", "0.5"), "--ema-decay 0.9999 (now 0.5)"),
                            (("--data", str(tmp_path / "pack-copy")),
                             f"--data '{pack[0]}' (now '{tmp_path / 'pack-copy'}')")):
        err = _fail(["train", "--out", str(out), "--resume", "--steps", "6", *extra], capsys)
        assert err == (f"medi-fast: error: --resume: {out} was started with {expected}; resume with the original "
                       f"options or choose another --out")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("text, expected", [
    ("[]", "training options must be a JSON object of option names and values, not a list"),
    ('{"lr": "fast"}', "training option 'lr' must be a number, got 'fast'; fix the config file or give --lr on the command line"),
    ("{not json", "cannot read training config")])
def test_resume_with_a_corrupt_config_is_refused(finished_run, capsys, text, expected):
    (finished_run / "config.json").write_text(text)
    before = _files(finished_run)
    assert expected in _fail(["train", "--out", str(finished_run), "--resume"], capsys)
    assert _files(finished_run) == before


def test_interrupt_says_to_resume(monkeypatch, capsys):
    from medi_fast.training import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--out", "run"])
    assert e.value.code == 130
    # plain rerunning is refused ("already holds a run"): the hint names --resume
    assert capsys.readouterr().err == "medi-fast: interrupted; rerun with --resume to continue\n"
