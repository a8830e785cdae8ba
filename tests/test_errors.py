"""The front door and the guards, on the cases users hit (tests/test_contract.py searches for the rest)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from medi_fast import resources
from medi_fast.cli import main
from medi_fast.errors import MediFastError


def _fails(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [["info", "{e}"], ["generate", "{e}", "--class", "LUAD", "--n", "2"],
                                  ["export", "{e}"], ["plan", "match-train", "--model", "{e}", "--sites-from",
                                                      "x.csv", "--out", "p.csv"]])
def test_empty_checkpoint_is_one_line(argv, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    err = _fails([a.format(e=empty) for a in argv], capsys)
    assert err.startswith("medi-fast: error: checkpoint") and "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]


def test_refused_generate_leaves_nothing_and_the_fix_runs(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "synth"
    for bad in (["--steps", "0"], ["--jpeg-quality", "500"], ["--workers", "-1"], ["--eta", "nan"],
                ["--batch-size", "0"], ["--steps", "5000"]):
        _fails(["generate", tiny_ckpt, "--class", "LUAD", "--n", "2", "--out", out, *bad], capsys)
        assert not out.exists(), bad
    assert main(["generate", str(tiny_ckpt), "--class", "LUAD", "--n", "2", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "run.json").is_file() and (out / "manifest.csv").is_file()


def test_guidance_without_cond_drop_warns_once(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", str(tiny_ckpt), "--class", "LUAD", "--n", "2", "--steps", "2", "--guidance", "3",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "conditioning dropout" in warnings[0]


def test_guidance_warning_reads_cond_drop_from_provenance(tiny_ckpt):
    from medi_fast.backends import open_model
    from medi_fast.generate import guidance_warning

    info = open_model(tiny_ckpt)
    assert guidance_warning(info, 1.0) is None
    info.provenance = {"cond_drop": 0.1}
    assert guidance_warning(info, 3.0) is None
    info.provenance = {"config": {"cond_drop": 0.0}}
    assert "trained without" in guidance_warning(info, 3.0)


@pytest.mark.parametrize("content", [b"", b"class,tissue_source_site\n\xff\xfe,05\n"], ids=["empty", "not-utf8"])
def test_sites_from_bad_csv(content, tiny_ckpt, tmp_path, capsys):
    csv = tmp_path / "sites.csv"
    csv.write_bytes(content)
    err = _fails(["plan", "match-train", "--model", tiny_ckpt, "--sites-from", csv, "--out", tmp_path / "p.csv"], capsys)
    assert "cannot read" in err and not (tmp_path / "p.csv").exists()


def test_directory_for_a_file_says_directory(tiny_ckpt, tmp_path, capsys):
    d = tmp_path / "d.csv"
    d.mkdir()
    err = _fails(["plan", "match-train", "--model", tiny_ckpt, "--sites-from", d, "--out", tmp_path / "p.csv"], capsys)
    assert "is a directory" in err and "does not exist" not in err
    d2 = tmp_path / "d.pt"
    d2.mkdir()
    assert "is a directory" in _fails(["info", d2], capsys)


def test_fid_batch_size_zero_and_missing_gpu(tmp_path, capsys):
    err = _fails(["fid", "--real", tmp_path, "--fake", tmp_path, "--batch-size", "0"], capsys)
    assert "--batch-size must be >= 1" in err
    if not torch.cuda.is_available():
        err = _fails(["fid", "--real", tmp_path, "--fake", tmp_path, "--device", "cuda"], capsys)
        assert "no CUDA GPU" in err


def test_click_usage_errors_are_one_line(capsys):
    err = _fails(["generate", "--no-such-option"], capsys)
    assert err.startswith("medi-fast: error: no such option") and "medi-fast generate --help" in err
    assert _fails(["no-such-command"], capsys).startswith("medi-fast: error: no such command")
    assert "'abc' is not a valid integer" in _fails(["generate", "--n", "abc"], capsys)


def test_interrupt_is_130_and_eof_is_not(monkeypatch, capsys):
    from medi_fast.cli import core

    def raiser(exc):
        def f(*a, **k):
            raise exc
        return f

    monkeypatch.setattr(core.info, "callback", raiser(KeyboardInterrupt()))
    assert "interrupted" in _fails(["info"], capsys, code=130)
    monkeypatch.setattr(core.info, "callback", raiser(FileNotFoundError(2, "No such file", "x.csv")))
    assert _fails(["info"], capsys) == "medi-fast: error: x.csv does not exist; check the path\n"
    monkeypatch.setattr(core.info, "callback", raiser(EOFError()))
    with pytest.raises(EOFError):  # not a user error the front door knows: a bug keeps its traceback
        main(["info"])
    monkeypatch.setattr(core.info, "callback", raiser(ZeroDivisionError()))
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def test_resume_state_truncated_is_a_user_error(tmp_path):
    from medi_fast.training.rundir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copy(Path(__file__), run.checkpoint_path(3))
    run.state_path(run.checkpoint_path(3)).write_bytes(b"")
    with pytest.raises(MediFastError, match="truncated or corrupt"):
        run.load_state(3)


def test_train_huge_batch_refused_before_anything_is_written(tmp_path, capsys):
    err = _fails(["train", "--data", tmp_path / "nope.parquet", "--batch-size", "1000000000", "--out",
                  tmp_path / "run", "--device", "cpu"], capsys)
    assert "--batch-size 1000000000 needs about" in err and "or less" in err
    assert not (tmp_path / "run").exists()


def test_check_batch_names_the_largest_batch_that_fits(monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device: 10 * 2**30)
    per = resources.activation_bytes({"sample_size": 128, "block_out_channels": [128, 256, 512, 512, 1024, 1024],
                                      "layers_per_block": 2}, training=True)
    fits = int(resources.USABLE * 10 * 2**30 // per)
    resources.check_batch(fits, per, "cpu")
    with pytest.raises(MediFastError, match=f"use --batch-size {fits} or less"):
        resources.check_batch(fits + 1, per, "cpu")


@pytest.mark.parametrize("preset", ["tiny-32", "small-64"])
def test_activation_estimate_matches_traced_feature_maps(preset):
    """The shape-only estimate against the feature maps a forward pass produces (meta tensors: no memory)."""
    from medi_fast.model import PRESETS, build_model

    with torch.device("meta"):
        model = build_model(preset, classes=["A", "B"], metadata={"tss": ["1", "2"]})
    total = [0]

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor) and not list(mod.children()):
            total[0] += out.numel() * out.element_size()

    for m in model.modules():
        m.register_forward_hook(hook)
    r = PRESETS[preset].resolution
    cond = {k: v.to("meta") for k, v in model.spec.encode({"class": ["A"], "tss": ["1"]}, 1).items()}
    model(torch.empty(1, 3, r, r, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"), cond)
    est = resources.activation_bytes(PRESETS[preset].unet_config(), training=True)
    assert total[0] <= est <= 1.5 * total[0], (est, total[0])


def test_plan_of_a_trillion_images_refused(tiny_ckpt, tmp_path, capsys):
    err = _fails(["generate", tiny_ckpt, "--class", "LUAD", "--n", str(10**12), "--out", tmp_path / "o"], capsys)
    assert "do not fit in memory" in err and "or less" in err and not (tmp_path / "o").exists()


def test_data_split_refuses_existing_output(tmp_path, capsys):
    from medi_fast.data.synth import CLASSES  # noqa: F401  (the synthetic clinical CSV has the GDC columns)

    assert main(["data", "synth", "--out", str(tmp_path / "syn"), "--n-per-combo", "2", "--n-test-per-combo", "1",
                 "--resolution", "32", "--patches-per-slide", "2"]) == 0
    clin = tmp_path / "syn" / "clinical.csv"
    args = ["data", "split", "--metadata", str(clin), "--strategy", "random", "--out", str(tmp_path / "s")]
    if main(args) != 0:
        pytest.skip("the tiny synthetic set cannot be split")
    capsys.readouterr()
    assert "pass --overwrite" in _fails(args, capsys)
    assert main(args + ["--overwrite"]) == 0
    assert pd.read_csv(tmp_path / "s" / "train.csv").shape[0] > 0
