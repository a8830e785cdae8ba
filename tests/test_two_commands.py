"""The two commands users write, exactly as they write them, and the defaults behind them."""
import json
import os
import sys
from pathlib import Path

import pytest

from medi_fast import defaults
from medi_fast.cli import main
from medi_fast.errors import MediFastError


def _cli(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow
def test_export_then_generate_literally(run_cli, tmp_path):
    """Fresh directory: init-checkpoint, then the two commands unchanged; output where the first
    line says; a rerun resumes.  Few steps and a small n come from the project config file."""
    os.chdir(tmp_path)
    r = run_cli("init-checkpoint", "--preset", "tiny-32", "--classes", "LUAD,LUSC", "--tss", "05,44,49",
                "--out", "ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "medi-fast.toml").write_text("[export]\nparity-steps = 2\n\n[generate]\nsteps = 2\n")

    r = run_cli("export", "ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "exporting ckpt.pt to ckpt.export/"
    export_dir = tmp_path / "ckpt.export"
    assert (export_dir / "model.onnx").is_file() and (export_dir / "model.fp16.onnx").is_file()
    record = json.loads((export_dir / "export.json").read_text())
    assert record["parity_ok"] and record["files"] == ["model.onnx", "model.fp16.onnx"]
    if not (export_dir / "model.engine").exists():  # no TensorRT/GPU here: one line says why
        skipped = [ln for ln in lines if ln.startswith("skipped TensorRT engine: ")]
        assert len(skipped) == 1 and record["skipped"]

    r = run_cli("generate", "--class", "LUAD", "--tss", "05", "--n", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first, second = r.stderr.splitlines()[:2]
    assert first.startswith(f"model {export_dir / 'model.onnx'} of {export_dir} (from the last export here")
    assert second == "output synth/LUAD_tss-05 (default; --out DIR to change)"
    out = tmp_path / "synth" / "LUAD_tss-05"
    pngs = sorted((out / "LUAD" / "05").glob("*.png"))
    assert len(pngs) == 5
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 6 and ",2," in manifest[1]  # header + 5 rows; steps = 2 from the config
    before = {p.name: p.read_bytes() for p in pngs}

    pngs[0].unlink()
    r = run_cli("generate", "--class", "LUAD", "--tss", "05", "--n", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generated 1 images (4 already done)" in r.stderr
    assert {p.name: p.read_bytes() for p in sorted((out / "LUAD" / "05").glob("*.png"))} == before


def test_model_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert defaults.choose_model(None, env={}) is None
    with pytest.raises(MediFastError, match="no model given; give one with --model PATH"):
        defaults.require_model(None)
    defaults.record_export(tmp_path / "exported")
    c = defaults.choose_model(None, env={})
    assert c.path == (tmp_path / "exported").resolve() and c.source.startswith("the last export here")
    (tmp_path / "medi-fast.toml").write_text('model = "from_config.onnx"\n')
    c = defaults.choose_model(None, env={})
    assert c.path == tmp_path / "from_config.onnx" and c.source == "medi-fast.toml"
    c = defaults.choose_model(None, env={"MEDI_FAST_MODEL": "env.pt"})
    assert c.path == Path("env.pt") and c.source == "$MEDI_FAST_MODEL"
    c = defaults.choose_model("cli.pt", env={"MEDI_FAST_MODEL": "env.pt"})
    assert c.path == Path("cli.pt") and c.source == "--model"
    with pytest.raises(MediFastError, match=r"model .*from_config.onnx \(from medi-fast.toml\) does not exist"):
        defaults.require_model(None)


def test_config_file_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "medi-fast.toml").write_text("[generate]\nstep = 2\n")
    code, text = _cli(["generate", tiny_ckpt, "--class", "LUAD"], capsys)
    assert code == 2 and text.strip().startswith("medi-fast: error: medi-fast.toml: [generate] has no option "
                                                 "'step' (closest: 'steps'")
    (tmp_path / "medi-fast.toml").write_text("[generat]\nsteps = 2\n")
    code, text = _cli(["info", tiny_ckpt], capsys)
    assert code == 2 and "unknown table or key 'generat' (closest: 'generate')" in text
    (tmp_path / "medi-fast.toml").write_text("[generate\n")
    code, text = _cli(["info", tiny_ckpt], capsys)
    assert code == 2 and text.startswith("medi-fast: error: ") and "is not valid TOML" in text
    assert len(text.strip().splitlines()) == 1


def test_generate_without_any_model_says_how_to_give_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, text = _cli(["generate", "--class", "LUAD", "--tss", "05", "--n", "10000"], capsys)
    assert code == 2
    assert text.strip().startswith("medi-fast: error: no model given; give one with --model PATH")
    assert not (tmp_path / "synth").exists()


def test_info_and_backends_name_the_default(tmp_path, monkeypatch, capsys, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDI_FAST_MODEL", str(tiny_ckpt))
    code, text = _cli(["info"], capsys)
    assert code == 0 and text.splitlines()[0] == f"model {tiny_ckpt} (from $MEDI_FAST_MODEL)"
    code, text = _cli(["backends"], capsys)
    assert code == 0 and f"model {tiny_ckpt} (from $MEDI_FAST_MODEL)" in text
    assert f"  {tiny_ckpt.name:<18} runs with torch" in text


def test_export_directory_picks_what_runs_here(tmp_path, monkeypatch):
    from medi_fast import backends

    for name in ("model.onnx", "model.fp16.onnx", "model.engine"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(backends, "available", lambda kind=None: ["ort-cpu"] if kind == "onnx" else [])
    assert backends.pick_export_file(tmp_path) == tmp_path / "model.onnx"
    monkeypatch.setattr(backends, "available",
                        lambda kind=None: ["ort-cuda", "ort-cpu"] if kind == "onnx" else [])
    assert backends.pick_export_file(tmp_path) == tmp_path / "model.fp16.onnx"
    monkeypatch.setattr(backends, "available",
                        lambda kind=None: ["tensorrt"] if kind == "tensorrt" else ["ort-cuda"])
    assert backends.pick_export_file(tmp_path) == tmp_path / "model.engine"
    (tmp_path / "model.onnx").unlink()
    (tmp_path / "model.fp16.onnx").unlink()
    monkeypatch.setattr(backends, "available", lambda kind=None: [])
    with pytest.raises(MediFastError, match="no file of export directory .* runs here"):
        backends.pick_export_file(tmp_path)


def test_default_out_dir_uses_canonical_names(tiny_ckpt):
    from medi_fast import backends, plan

    spec = backends.open_model(tiny_ckpt).spec
    p = plan.build(spec, values={"class": "TCGA-LUAD", "tss": "05"}, n=2)
    assert plan.default_out_dir(p, None) == Path("synth/LUAD_tss-05")
    p = plan.build(spec, values={"class": "LUSC"}, n=2)
    assert plan.default_out_dir(p, None) == Path("synth/LUSC")
    assert plan.default_out_dir(p, "fill-missing") == Path("synth/fill-missing")
    assert plan.default_out_dir(p, "plans/my plan.csv") == Path("synth/plan-my-plan")


def test_export_refuses_tensorrt_when_asked_without_it(tmp_path, monkeypatch, capsys, tiny_ckpt):
    pytest.importorskip("onnx")
    if "tensorrt" in sys.modules or _has_tensorrt():
        pytest.skip("TensorRT is installed here")
    monkeypatch.chdir(tmp_path)
    code, text = _cli(["export", tiny_ckpt, "--tensorrt"], capsys)
    assert code == 2 and "tensorrt" in text and "exporting" not in text
    assert not (tiny_ckpt.parent / f"{tiny_ckpt.stem}.export").exists()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_options_that_would_be_ignored_are_refused(tmp_path, monkeypatch, capsys, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    code, text = _cli(["generate", tiny_ckpt, "--class", "LUAD", "--ray", "--workers", "4", "--out", "o"], capsys)
    assert code == 2 and text.strip().startswith("medi-fast: error: --workers has no effect with --ray")
    idx = tmp_path / "idx.csv"
    idx.write_text("class,tissue_source_site\nLUAD,05\n")
    code, text = _cli(["plan", "fill-missing", "--model", tiny_ckpt, "--sites-from", idx, "--seed", "3",
                       "--out", tmp_path / "p.csv"], capsys)
    assert code == 2 and "--seed only changes an ood plan" in text and not (tmp_path / "p.csv").exists()
    assert not (tmp_path / "o").exists()
