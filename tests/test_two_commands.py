"""The two commands users write, exactly as they write them, and the defaults behind them."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medi_fast import backends, defaults
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


def _start_cli(*args, cwd):
    """`medi-fast ARGS` as a background process (stdout/stderr to files in ``cwd``)."""
    out, err = open(cwd / "cli.out", "w"), open(cwd / "cli.err", "w")
    # Ctrl-C as a terminal delivers it, even where this test runs in a shell's background job (which starts
    # with SIGINT ignored, and a child would inherit that and never stop)
    return subprocess.Popen([sys.executable, "-m", "medi_fast.cli", *map(str, args)], cwd=cwd, stdout=out, stderr=err,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc, ready):
    """Wait until ``ready()`` or the process ends (progress, not a clock, decides); True when ready."""
    while proc.poll() is None:
        if ready():
            return True
        time.sleep(0.2)
    return ready()


GATE_LINE_CPU = ("fp16 graph written, gated on first GPU use (no GPU here to run fp16 arithmetic); "
                 "fp32 ONNX checked against the checkpoint: max eps error ")


@pytest.mark.slow
def test_export_then_generate_literally(run_cli, tmp_path):
    """Fresh directory, no medi-fast.toml: init-checkpoint as the README writes it, then the two
    commands exactly as users type them, with every default (a random checkpoint, the default
    parity and fp16 settings, DDIM-100, --n 10000).  The generation is stopped with Ctrl-C once
    images appear; the rerun resumes without rewriting them."""
    os.chdir(tmp_path)
    r = run_cli("init-checkpoint", "--preset", "tiny-32", "--classes", "LUAD,LUSC", "--tss", "05,44,49",
                "--out", "ckpt.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

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
    gate = [ln for ln in lines if ln.startswith("fp16 graph ")]
    assert len(gate) == 1
    if record["fp16_gate"]["ok"] is None:  # no GPU here: say what was and was not checked
        assert gate[0].startswith(GATE_LINE_CPU)
        assert float(gate[0][len(GATE_LINE_CPU):]) <= 1e-4

    args = ("generate", "--class", "LUAD", "--tss", "05", "--n", "10000")
    out = tmp_path / "synth" / "LUAD_tss-05"
    pngs = lambda: sorted((out / "LUAD" / "05").glob("*.png"))  # noqa: E731
    proc = _start_cli(*args, cwd=tmp_path)
    assert _wait_for(proc, lambda: len(pngs()) >= 2), (tmp_path / "cli.err").read_text()
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    first, second = (tmp_path / "cli.err").read_text().splitlines()[:2]
    assert first.startswith(f"model {export_dir / 'model.onnx'} of {export_dir} (from the last export here")
    assert second == "output synth/LUAD_tss-05 (default; --out DIR to change)"
    before = {p.name: p.read_bytes() for p in pngs()}
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 100  # DDIM-100, the default

    proc = _start_cli(*args, cwd=tmp_path)
    assert _wait_for(proc, lambda: len(pngs()) > len(before) + 1), (tmp_path / "cli.err").read_text()
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    assert {p.name: p.read_bytes() for p in pngs() if p.name in before} == before


def test_export_of_a_random_checkpoint_passes_and_says_what_was_checked(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """A random checkpoint with the defaults: on a machine without fp16 arithmetic the fp16 graph
    is written marked for its gate on first GPU use, and one line says so."""
    from medi_fast.backends.onnx_info import read_props
    from medi_fast.engines import gate, pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "native_fp16_backend", lambda: None)  # a machine without fp16 arithmetic
    code, text = _cli(["export", tiny_ckpt, "--out", tmp_path / "exp"], capsys)
    assert code == 0, text
    line = [ln for ln in text.splitlines() if ln.startswith("fp16 graph ")]
    assert len(line) == 1 and line[0].startswith(GATE_LINE_CPU) and float(line[0][len(GATE_LINE_CPU):]) <= 1e-4
    record = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert record["fp16_gate"] == {"ok": None, "pending": gate.PENDING} and record["parity_ok"]
    assert json.loads(read_props(tmp_path / "exp" / "model.fp16.onnx")["medi_fast.fp16_gate"])["ok"] is None
    assert "DDIM-2 ORT fp32 vs torch (uint8)" in text  # the short sampling run of the default


def test_where_fp16_runs_natively_the_export_gates_it(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """The export-time gate, with ONNX Runtime CPU standing in for the GPU backend."""
    from medi_fast.engines import pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "native_fp16_backend", lambda: "ort-cpu")
    code, text = _cli(["export", tiny_ckpt, "--out", tmp_path / "exp", "--parity-steps", "0"], capsys)
    assert code == 0, text
    line = [ln for ln in text.splitlines() if ln.startswith("fp16 graph ")]
    assert len(line) == 1 and line[0].startswith("fp16 graph gated on ort-cpu: relative eps error ")
    assert ", stage default; fp32 ONNX checked against the checkpoint: max eps error " in line[0]
    gate = json.loads((tmp_path / "exp" / "export.json").read_text())["fp16_gate"]
    assert gate["ok"] is True and gate["stage"] == "default" and gate["backend"] == "ort-cpu"


def test_an_incomplete_export_directory_is_refused(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """A killed export leaves model files without export.json (written last): never used as a model,
    whether named or the default; a re-export removes the old export.json before writing."""
    from medi_fast.engines import pipeline

    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "exp"
    assert _cli(["export", tiny_ckpt, "--out", exp, "--no-fp16", "--parity-steps", "0"], capsys)[0] == 0
    (exp / "export.json").unlink()  # what a kill after model.onnx leaves
    fix = f"medi-fast: error: export directory {exp} is incomplete (no export.json: its export was interrupted or " \
          f"failed); rerun `medi-fast export CKPT --out {exp}`"
    for argv in (["generate", exp, "--class", "LUAD", "--n", "2", "--out", tmp_path / "o"],
                 ["generate", "--class", "LUAD", "--n", "2", "--out", tmp_path / "o"], ["info", exp]):
        code, text = _cli(argv, capsys)
        assert code == 2 and text.strip() == fix, text
    assert not (tmp_path / "o").exists()

    assert _cli(["export", tiny_ckpt, "--out", exp, "--no-fp16", "--parity-steps", "0"], capsys)[0] == 0
    assert _cli(["info", exp], capsys)[0] == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compare", interrupted)  # after the new model.onnx is in place
    assert _cli(["export", tiny_ckpt, "--out", exp, "--no-fp16", "--parity-steps", "0"], capsys)[0] == 130
    code, text = _cli(["info", exp], capsys)
    assert code == 2 and text.strip() == fix


def test_a_full_disk_export_leaves_nothing(tmp_path, monkeypatch, capsys, tiny_ckpt):
    import onnx

    real_save = onnx.save_model

    def disk_full(model, f, *a, **k):
        real_save(model, f, *a, **k)
        with open(f, "r+b") as fh:  # what a full disk leaves: a truncated file, then ENOSPC
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnx, "save_model", disk_full)
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_ckpt), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"medi-fast: error: disk full while writing {tmp_path / 'exp'}; free space or "
                                         "choose another --out, then rerun the same command to resume\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no export directory, no temporary files


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
    (tmp_path / "export.json").write_text('{"parity_ok": true}')  # no fp16_gate entry: gated when written
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
    (tmp_path / "export.json").write_text('{"parity_ok": false}')
    with pytest.raises(MediFastError, match="failed its parity check"):
        backends.pick_export_file(tmp_path)


def test_an_fp16_graph_exported_without_a_gpu_is_gated_on_first_gpu_use(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """A stand-in CUDA backend (ONNX Runtime CPU under the name ort-cuda): the pending fp16 graph is
    gated on first use and kept in fp16_gate.json; one that does not match its fp32 graph (here:
    another model's weights) is not used, and `medi-fast backends` says why."""
    import dataclasses

    import torch

    from medi_fast import backends, checkpoint
    from medi_fast.engines import pipeline
    from medi_fast.model import build_model
    from medi_fast.schedule import Schedule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "native_fp16_backend", lambda: None)  # exported without a GPU
    assert _cli(["export", tiny_ckpt, "--out", tmp_path / "a", "--parity-steps", "0"], capsys)[0] == 0
    torch.manual_seed(11)
    other = build_model("tiny-32", classes=["LUAD", "LUSC"], metadata={"tss": ["05", "44", "49"]})
    checkpoint.save(checkpoint.from_model(other, Schedule(), preset="tiny-32"), tmp_path / "other.pt")
    assert _cli(["export", tmp_path / "other.pt", "--out", tmp_path / "b", "--parity-steps", "0"], capsys)[0] == 0
    os.replace(tmp_path / "b" / "model.fp16.onnx", tmp_path / "a2.fp16.onnx")

    monkeypatch.setitem(backends.BACKENDS, "ort-cuda", dataclasses.replace(backends.BACKENDS["ort-cpu"], name="ort-cuda"))
    monkeypatch.setattr(backends, "available", lambda kind=None: ["ort-cuda", "ort-cpu"] if kind == "onnx" else [])
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
        assert backends.pick_export_file(tmp_path / "a") == tmp_path / "a" / "model.fp16.onnx"
        saved = json.loads((tmp_path / "a" / backends.FP16_GATE_FILE).read_text())
        assert saved["gpu"] == "Stand-in GPU" and saved["ok"] is True and 0 < saved["rel"] <= 1e-2

        os.replace(tmp_path / "a2.fp16.onnx", tmp_path / "a" / "model.fp16.onnx")
        (tmp_path / "a" / backends.FP16_GATE_FILE).unlink()
        assert backends.pick_export_file(tmp_path / "a") == tmp_path / "a" / "model.onnx"
        assert json.loads((tmp_path / "a" / backends.FP16_GATE_FILE).read_text())["ok"] is False
    code, text = _cli(["backends", tmp_path / "a"], capsys)
    assert code == 0 and "model.fp16.onnx    does not run here: failed the fp16 gate on " in text \
        and "(relative eps error" in text and "model.onnx         runs with ort-cuda  <- used" in text, text


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
