"""The front door and the guards, on the cases users hit (tests/test_contract.py searches for the rest)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
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


# --- Holes an adversarial run of bad and borderline inputs found; each test fails on the code before its fix.


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """A tiny synthetic set (LUAD at S1, LUSC at S2, both at S3, S4), its index and colour-texture embeddings."""
    root = tmp_path_factory.mktemp("small")
    assert main(["data", "synth", "--out", str(root / "syn"), "--n-per-combo", "4", "--n-test-per-combo", "2",
                 "--resolution", "32", "--patches-per-slide", "2"]) == 0
    assert main(["data", "index", str(root / "syn"), "--metadata", str(root / "syn" / "clinical.csv"), "--out",
                 str(root / "index.parquet"), "--no-verify"]) == 0
    assert main(["embed", "--images", str(root / "index.parquet"), "--extractor", "colour-texture", "--out",
                 str(root / "emb.parquet"), "--quiet"]) == 0
    return root


def _nothing_new(root: Path, before: set) -> None:
    assert {str(p) for p in root.rglob("*")} == before


@pytest.mark.parametrize("argv, option", [
    (["plan", "ood", "--model", "{ckpt}", "--sites-from", "{idx}", "--k", "1", "--seed", "-1", "--out", "p.csv"], "--seed"),
    (["plan", "ood", "--model", "{ckpt}", "--sites-from", "{idx}", "--k", "1", "--seed", str(2**64), "--out", "p.csv"],
     "--seed"),
    (["generate", "{ckpt}", "--class", "LUAD", "--n", "1", "--steps", "2", "--seed", str(2**64), "--out", "g"], "--seed"),
    (["generate", "{ckpt}", "--class", "LUAD", "--n", "1", "--steps", "2", "--seed", "-1", "--out", "g"], "--seed"),
    (["data", "split", "--metadata", "{clin}", "--strategy", "random", "--seed", "-1", "--out", "s"], "--seed"),
    (["probe", "--real-train", "{emb}", "--real-test", "{emb}", "--task", "nsclc", "--k", "1", "--seed", "-1"], "--seed"),
    (["shortcut", "--embeddings", "{emb}", "--seed", "-1"], "--seed"),
], ids=["plan-negative", "plan-2^64", "generate-2^64", "generate-negative", "split", "probe", "shortcut"])
def test_seeds_out_of_range_are_refused(argv, option, small_set, tiny_ckpt, capsys):
    """--seed 2**64 used to equal --seed 0 (generate, plan) and -1 was a numpy traceback (ood, split, probe)."""
    fill = dict(ckpt=tiny_ckpt, idx=small_set / "index.parquet", clin=small_set / "syn" / "clinical.csv",
                emb=small_set / "emb.parquet")
    err = _fails([a.format(**fill) for a in argv], capsys)
    assert f"{option} must be in 0.." in err
    assert list(Path.cwd().iterdir()) == []


def test_largest_seed_is_taken_and_differs_from_zero(tiny_ckpt):
    from medi_fast import checkpoint
    from medi_fast.plan import build

    spec = checkpoint.load(tiny_ckpt).spec
    top = build(spec, values={"class": "LUAD"}, n=3, seed=2**63 - 1).rows["seed"].tolist()
    assert top != build(spec, values={"class": "LUAD"}, n=3, seed=0).rows["seed"].tolist()
    with pytest.raises(MediFastError, match=r"--seed must be in 0\.\.9223372036854775807"):
        build(spec, values={"class": "LUAD"}, n=3, seed=2**63)
    from medi_fast.plan import single

    with pytest.raises(MediFastError, match=r"--seed must be in 0\.\."):  # the Python API's path
        single(spec, {"class": "LUAD"}, 3, seed=2**64)


@pytest.mark.parametrize("argv, match", [
    (["plan", "fill-missing", "--model", "{ckpt}", "--sites-from", "{idx}", "--n-per-combo", "0", "--out", "p.csv"],
     "--n-per-combo must be positive, got 0"),
    (["plan", "fill-missing", "--model", "{ckpt}", "--sites-from", "{idx}", "--classes", "LUAD,TCGA-LUAD", "--out",
      "p.csv"], "--classes names 'LUAD' twice"),
    (["data", "synth", "--out", "s", "--classes", "LUAD,LUAD"], "--classes names 'LUAD' twice"),
    (["probe", "--real-train", "{emb}", "--real-test", "{emb}", "--task", "LUAD,luad", "--k", "1"],
     "--task names 'LUAD' twice"),
], ids=["n-per-combo-0", "plan-classes-twice", "synth-classes-twice", "probe-task-twice"])
def test_questionable_accepts_are_refused(argv, match, small_set, tiny_ckpt, capsys):
    """--n-per-combo 0 wrote 1 per combination; a class named twice doubled its combinations."""
    fill = dict(ckpt=tiny_ckpt, idx=small_set / "index.parquet", emb=small_set / "emb.parquet")
    assert match in _fails([a.format(**fill) for a in argv], capsys)
    assert list(Path.cwd().iterdir()) == []


def test_plan_csv_count_beyond_int64_is_one_line(tiny_ckpt, capsys):
    Path("plan.csv").write_text(f"class,tss,count\nLUAD,05,{10**21}\n")
    err = _fails(["generate", tiny_ckpt, "--plan", "plan.csv", "--out", "g", "--steps", "2"], capsys)
    assert "plan file plan.csv: a count in column 'count' is too large" in err
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["plan.csv"]


@pytest.mark.parametrize("extra, match", [
    (["--C", "0"], "--C must be a finite number > 0"), (["--C", "nan"], "--C must be a finite number > 0"),
    (["--ratio", "nan"], "--ratio must be a finite number >= 0"), (["--ratio", "inf"], "--ratio must be a finite"),
])
def test_probe_numbers_are_checked(extra, match, small_set, capsys):
    emb = small_set / "emb.parquet"
    err = _fails(["probe", "--real-train", emb, "--real-test", emb, "--task", "nsclc", "--k", "1", *extra,
                  "--out-csv", "s.csv"], capsys)
    assert match in err and list(Path.cwd().iterdir()) == []


def test_probe_embeddings_of_different_widths(small_set, capsys):
    df = pd.read_parquet(small_set / "emb.parquet")
    narrow = df.drop(columns=[c for c in df.columns if c.startswith("emb_")][8:])
    narrow.to_parquet("narrow.parquet")
    emb = small_set / "emb.parquet"
    for args in (["--real-test", "narrow.parquet"], ["--real-test", emb, "--synthetic", "MeDi=narrow.parquet"]):
        err = _fails(["probe", "--real-train", emb, *args, "--task", "nsclc", "--k", "1"], capsys)
        assert "have shape (8,) per patch but real-train ones (48,)" in err


def test_fid_with_one_image_per_set(small_set, capsys):
    pd.read_parquet(small_set / "index.parquet").head(1).to_parquet("one.parquet")
    err = _fails(["fid", "--real", "one.parquet", "--fake", small_set / "index.parquet", "--features",
                  "colour-texture", "--out-csv", "f.csv"], capsys)
    assert "one.parquet holds 1 image(s); FID needs at least 2 images per set" in err
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["one.parquet"]
    from medi_fast.eval.fid import compute_fid

    with pytest.raises(MediFastError, match="the real set has fewer than 2 images"):
        compute_fid(np.zeros((1, 4)), np.ones((5, 4)), per=None)


@pytest.mark.parametrize("argv, option", [
    (["fid", "--real", "{idx}", "--fake", "{idx}", "--features", "colour-texture", "--out-csv", "{bad}/f.csv"],
     "--out-csv"),
    (["fid", "--real", "{idx}", "--fake", "{idx}", "--features", "colour-texture", "--save-real-stats", "{bad}/r.npz"],
     "--save-real-stats"),
    (["fid", "--real", "{idx}", "--fake", "{idx}", "--features", "colour-texture", "--save-fake-stats", "r.npy"],
     "--save-fake-stats"),
    (["embed", "--images", "{idx}", "--extractor", "colour-texture", "--out", "{bad}/e.parquet"], "--out"),
    (["probe", "--real-train", "{emb}", "--real-test", "{emb}", "--task", "nsclc", "--k", "1", "--runs-csv",
      "{bad}/r.csv"], "--runs-csv"),
    (["doctor", "--json", "{bad}/d.json"], "--json"),
    (["doctor", "--json", "."], "--json"),
    (["data", "pack", "{idx}", "--resolution", "16", "--out", "pk", "--split", "missing.csv"], "--split"),
])
def test_outputs_checked_up_front_and_named(argv, option, small_set, capsys):
    """Each output is checked before any work (no progress bar, no table before the error) and the
    message names the option to change (it said --out for all of them, --metadata for --split)."""
    Path("blocker").write_text("x")
    fill = dict(idx=small_set / "index.parquet", emb=small_set / "emb.parquet", bad="blocker")
    with pytest.raises(SystemExit) as e:
        main([a.format(**fill) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert option in err and "--metadata" not in err, err
    assert "another --out" not in err.replace(f"another {option}", ""), err
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["blocker"]


@pytest.mark.parametrize("entry, match", [
    ("batch-size = [1, 2]", "batch-size takes one integer value, not a list"),
    ("batch-size = {a = 1}", "batch-size takes one integer value, not a table"),
    ("batch-size = true", "batch-size takes one integer value, not bool"),
    ("batch-size = 2.5", "batch-size takes a whole number"),
    ("steps = \"many\"", "'many' is not a valid integer"),
])
def test_toml_values_checked_by_the_option_type(entry, match, tiny_ckpt, capsys):
    Path("medi-fast.toml").write_text(f"[generate]\n{entry}\n")
    err = _fails(["generate", tiny_ckpt, "--class", "LUAD", "--n", "1", "--out", "g"], capsys)
    assert err.startswith(f"medi-fast: error: medi-fast.toml: [generate] {entry.split()[0]} = ") and match in err
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["medi-fast.toml"]


def test_toml_output_never_replaces_an_existing_file(tiny_ckpt, capsys):
    Path("medi-fast.toml").write_text('[plan]\nout = "p.csv"\n[doctor]\njson-path = "d.json"\n')
    Path("p.csv").write_text("mine\n")
    Path("d.json").write_text("mine\n")
    Path("sites.csv").write_text("tissue_source_site\n05\n44\n")
    err = _fails(["plan", "fill-missing", "--model", tiny_ckpt, "--sites-from", "sites.csv"], capsys)
    assert "p.csv exists and is named by medi-fast.toml ([plan] out)" in err
    assert "d.json exists and is named by medi-fast.toml ([doctor] json-path)" in _fails(["doctor"], capsys)
    assert Path("p.csv").read_text() == Path("d.json").read_text() == "mine\n"
    # named on the command line, the same file is replaced: the user asked for it
    assert main(["plan", "fill-missing", "--model", str(tiny_ckpt), "--sites-from", "sites.csv", "--out", "p.csv"]) == 0
    assert Path("p.csv").read_text().startswith("class,tss,count")
    Path("medi-fast.toml").write_text('[shortcut]\nout-csv = "p.csv"\n')  # any command's output file
    assert "p.csv exists and is named by medi-fast.toml ([shortcut] out-csv)" in _fails(
        ["shortcut", "--embeddings", "e.parquet"], capsys)


def test_closed_stdout_exits_quietly(tiny_ckpt):
    """`medi-fast info ckpt.pt | head -1` was a BrokenPipeError traceback."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "medi_fast.cli", "info", str(tiny_ckpt)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""


def test_code_running_pickles_are_refused_as_unsafe(tmp_path, capsys):
    import os
    import pickle

    class Runs:
        def __reduce__(self):
            return (os.system, ("true",))

    for proto in (0, 2, 4, 5):  # torch's safe loader names the global only for some protocols
        (tmp_path / f"p{proto}.pt").write_bytes(pickle.dumps({"state_dict": Runs()}, protocol=proto))
        err = _fails(["info", tmp_path / f"p{proto}.pt"], capsys)
        assert "is not a plain-data checkpoint" in err and "will not be loaded" in err, err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")  # garbage is corrupt, not unsafe
    assert "truncated or corrupt" in _fails(["info", tmp_path / "junk.pt"], capsys)


@pytest.mark.parametrize("command", ["pack", "synth"])
def test_overwrite_replaces_only_the_commands_own_output(command, small_set, capsys):
    argv = {"pack": ["data", "pack", str(small_set / "index.parquet"), "--resolution", "16", "--out", "o"],
            "synth": ["data", "synth", "--n-per-combo", "2", "--resolution", "32", "--out", "o"]}[command]
    assert main(argv) == 0
    Path("o/notes.txt").write_text("mine\n")
    capsys.readouterr()
    err = _fails(argv + ["--overwrite"], capsys)
    assert f"o is not an earlier `medi-fast data {command}` output (notes.txt)" in err
    assert Path("o/notes.txt").read_text() == "mine\n"
    Path("o/notes.txt").unlink()
    assert main(argv + ["--overwrite"]) == 0  # its own earlier output is replaced
    capsys.readouterr()
    Path("u").mkdir()
    Path("u/clinical.csv").write_text("mine\n")  # a name the command writes, but not its output
    assert "(no " in _fails(argv[:-1] + ["u", "--overwrite"], capsys)
    assert Path("u/clinical.csv").read_text() == "mine\n"
    Path("sub").mkdir()
    assert "is the current directory" in _fails(argv[:-1] + ["sub/..", "--overwrite"], capsys)


def test_pack_rerun_removes_what_a_killed_run_left(small_set):
    stale = Path(".medi-tmp-0123abcd-pk")
    stale.mkdir()
    (stale / "images.u8").write_bytes(b"\0" * 1000)
    other = Path(".medi-tmp-0123abcd-other")  # another output's temporary is left alone
    other.mkdir()
    assert main(["data", "pack", str(small_set / "index.parquet"), "--resolution", "16", "--out", "pk"]) == 0
    assert sorted(p.name for p in Path.cwd().iterdir()) == [other.name, "pk"]
