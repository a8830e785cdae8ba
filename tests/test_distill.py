"""Progressive distillation: the v / x0 parameterisations against diffusers, the distillation target
(one student DDIM step lands where two teacher steps land), the student end to end (checkpoint ->
export -> generate with its own steps, ort-cpu), and the one-line refusals."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.cli import main
from medi_fast.errors import MediFastError
from medi_fast.samplers import ddim, dpmpp_2m, timesteps_for
from medi_fast.schedule import Schedule
from medi_fast.training.distill import StageGrid, stage_plan, student_loss, student_schedule, teacher_target


def fake_model(x, t, cond):
    """A deterministic stand-in for a UNet whose output depends on x and t (not on a parameterisation)."""
    return 0.7 * x + 0.05 * torch.sin(t.float().view(-1, 1, 1, 1) / 100.0 + x)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("spacing, clip, steps", [("trailing", False, 4), ("leading", True, 10), ("trailing", True, 8)])
def test_ddim_matches_diffusers_for_v_and_x0(prediction_type, spacing, clip, steps):
    from diffusers import DDIMScheduler

    schedule = Schedule(prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip)
    ref = DDIMScheduler(**schedule.diffusers_config())
    ref.set_timesteps(steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t.expand(2), {}), t, x, eta=0.0).prev_sample
    ours = ddim(fake_model, x_T.clone(), timesteps_for("ddim", schedule, steps), schedule, {})
    eps_run = ddim(fake_model, x_T.clone(), timesteps_for("ddim", schedule, steps),
                   replace(schedule, prediction_type="epsilon"), {})
    assert list(ref.timesteps.numpy()) == list(timesteps_for("ddim", schedule, steps))
    assert (ours - x).abs().max().item() <= 1e-5
    assert (ours - eps_run).abs().max().item() > 1e-2  # the parameterisation really changes the trajectory


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_dpm_solver_matches_diffusers_for_v_and_x0(prediction_type):
    from diffusers import DPMSolverMultistepScheduler

    schedule = Schedule(prediction_type=prediction_type)
    ref = DPMSolverMultistepScheduler(**{k: v for k, v in schedule.diffusers_config().items()
                                          if k not in ("clip_sample", "clip_sample_range", "set_alpha_to_one",
                                                       "timestep_spacing")})
    ref.set_timesteps(6)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t.expand(2), {}), t, x).prev_sample
    ours = dpmpp_2m(fake_model, x_T.clone(), timesteps_for("dpmpp-2m", schedule, 6), schedule, {})
    assert (ours - x).abs().max().item() <= 1e-4


def test_schedule_records_prediction_type_and_default_steps():
    s = student_schedule(Schedule(), "v_prediction", 4)
    assert (s.prediction_type, s.default_steps, s.default_sampler, s.timestep_spacing, s.clip_sample) == \
        ("v_prediction", 4, "ddim", "trailing", False)
    assert Schedule.from_dict(s.to_dict()) == s
    assert "default_steps" not in Schedule().to_dict()  # older headers (and hashes) unchanged
    with pytest.raises(MediFastError, match="prediction_type 'x' is not supported"):
        Schedule(prediction_type="x")


def test_stage_plan_halves_and_refuses_unreachable_steps():
    assert stage_plan(64, 4) == [32, 16, 8, 4]
    assert stage_plan(16, 1) == [8, 4, 2, 1]
    with pytest.raises(MediFastError, match="not reachable by halving --teacher-steps 64"):
        stage_plan(64, 3)
    with pytest.raises(MediFastError, match="not fewer than the teacher's 8 steps"):
        stage_plan(8, 8)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_one_student_step_lands_where_two_teacher_steps_land(tiny_sampler_case, n, prediction_type):
    """The target of Algorithm 2, fed back as the student's output, makes the sampler's own DDIM step
    (medi_fast.samplers.ddim on the student's schedule) reproduce the teacher's two steps exactly."""
    model, cond, x_T = tiny_sampler_case
    teacher_sched = Schedule()  # eps, clipped: the published teacher
    grid = StageGrid(teacher_sched, n)
    s_sched = student_schedule(teacher_sched, prediction_type, n)
    assert list(timesteps_for("ddim", s_sched, n)) == grid.t.tolist()
    idx = torch.zeros(x_T.shape[0], dtype=torch.long)  # the first step, from t = T - 1
    abar = grid.abar[idx].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        x_target, z_next = teacher_target(model, teacher_sched, grid, x_T, idx, cond)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    student_out = (a * x_T - x_target) / s if prediction_type == "v_prediction" else x_target
    got = {}
    ddim(lambda x, t, c: student_out, x_T, timesteps_for("ddim", s_sched, n), s_sched, cond,
         callback=lambda i, x: got.setdefault(i, x))
    assert (got[0] - z_next).abs().max().item() <= 1e-3 * max(1.0, z_next.abs().max().item())
    # and the loss is 0 exactly there, positive elsewhere
    assert student_loss(student_out, x_target, x_T, abar, prediction_type).item() <= 1e-8
    assert student_loss(student_out + 0.1, x_target, x_T, abar, prediction_type).item() > 1e-4


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(distill_teacher):
    return distill_teacher


def _fail(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("medi-fast: error: ")
    return line


def _distill(teacher, out, *extra):
    return main(["distill", str(teacher), "--out", str(out), "--batch-size", "2", "--iters-per-stage", "2",
                 "--device", "cpu", "--quiet", *[str(e) for e in extra]])


@pytest.mark.slow
def test_distil_export_generate_with_own_steps(teacher, tmp_path, capsys, generates_with_own_sampler):
    out = tmp_path / "student.pt"
    assert _distill(teacher, out, "--steps", "1", "--teacher-steps", "4") == 0
    ck = ckpt_io.load(out)
    teacher_ck = ckpt_io.load(teacher)
    assert (ck.schedule.prediction_type, ck.schedule.default_steps, ck.schedule.default_sampler) == ("v_prediction", 1, "ddim")
    assert ck.spec.to_dict() == teacher_ck.spec.to_dict()  # the teacher's conditioning and vocabularies
    assert ck.provenance["cond_drop"] == 0.1 and ck.provenance["stage_steps"] == 1
    stages = sorted(p.name for p in (tmp_path / "student.distill" / "stages").iterdir())
    assert stages == ["student-0001.pt", "student-0002.pt"]
    assert ckpt_io.load(tmp_path / "student.distill" / "stages" / "student-0002.pt").schedule.default_steps == 2
    # the student is not the teacher: its weights moved
    assert any(not torch.equal(ck.weights()[k], teacher_ck.weights()[k]) for k in ck.state_dict)
    # a second run to the same --out is refused; resume of a finished run rewrites nothing new
    assert "already exists" in _fail(["distill", teacher, "--out", out, "--steps", "1", "--teacher-steps", "4"], capsys)

    # generate from the checkpoint and from its ONNX export (ort-cpu): the student's own DDIM-1 by default
    generates_with_own_sampler(out, tmp_path, 1, "ddim")
    from medi_fast.backends import open_model

    info = open_model(tmp_path / "exp" / "model.onnx")
    assert (info.schedule.prediction_type, info.schedule.default_steps) == ("v_prediction", 1)
    # an explicit --steps wins, with one warning line; unseen combinations generate too
    capsys.readouterr()
    assert main(["generate", str(out), "--class", "LUAD", "--tss", "S2", "--n", "1", "--steps", "3",
                 "--out", str(tmp_path / "s3"), "--quiet"]) == 0
    assert "distilled for ddim-1" in capsys.readouterr().err
    assert set(pd.read_csv(tmp_path / "s3" / "manifest.csv")["steps"]) == {3}
    # the Python API: own steps by default; the checkpoint and the ONNX export agree
    import medi_fast

    a = medi_fast.load(out, backend="torch").generate("LUAD", tss="S1", n=2, seed=3)
    b = medi_fast.load(tmp_path / "exp" / "model.onnx", backend="ort-cpu").generate("LUAD", tss="S1", n=2, seed=3)
    assert medi_fast.load(out, backend="torch").config.steps == 1
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2

    # distilling the student again to MORE (or as many) steps is refused in one line
    line = _fail(["distill", out, "--out", tmp_path / "again.pt", "--steps", "2"], capsys)
    assert "already distilled to 1 steps" in line and not (tmp_path / "again.pt").exists()


@pytest.mark.slow
def test_resume_after_an_interruption_equals_the_uninterrupted_run(teacher, tmp_path, monkeypatch, interrupt_on_call):
    from medi_fast.training import distill as mod

    opts = dict(teacher=str(teacher), steps=1, teacher_steps=4, iters_per_stage=2, batch_size=2, device="cpu",
                progress=False, checkpoint_every=1)
    whole = mod.distill(out=str(tmp_path / "whole.pt"), **opts)
    real_loss = interrupt_on_call(mod, "student_loss", 4)  # Ctrl-C in the 2nd iteration of the 2nd stage
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        mod.distill(out=str(out), **opts)
    assert not out.exists()  # no partial student
    with pytest.raises(MediFastError, match="pass --resume"):
        mod.distill(out=str(out), **opts)
    monkeypatch.setattr(mod, "student_loss", real_loss)
    mod.distill(out=str(out), resume=True, **opts)
    a, b = ckpt_io.load(whole), ckpt_io.load(out)
    assert all(torch.equal(a.weights()[k], b.weights()[k]) for k in a.weights())


def test_bad_inputs_fail_in_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "s.pt"
    assert "not reachable by halving --teacher-steps 64" in _fail(["distill", teacher, "--out", out, "--steps", "3"], capsys)
    assert "not fewer than the teacher's 4 steps" in _fail(
        ["distill", teacher, "--out", out, "--steps", "4", "--teacher-steps", "4"], capsys)
    assert "does not exist" in _fail(["distill", tmp_path / "nope.pt", "--out", out], capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(teacher.read_bytes()[:1000])
    assert "truncated or corrupt" in _fail(["distill", bad, "--out", out], capsys)
    assert "--lr must be a finite number" in _fail(["distill", teacher, "--out", out, "--lr", "nan"], capsys)
    assert "must end in .pt" in _fail(["distill", teacher, "--out", tmp_path / "s.txt"], capsys)
    # a teacher without a recorded schedule (a header without one) is refused by the checkpoint loader
    obj = torch.load(teacher, weights_only=True)
    del obj["schedule"]
    torch.save(obj, tmp_path / "noschedule.pt")
    assert "incomplete header" in _fail(["distill", tmp_path / "noschedule.pt", "--out", out], capsys)
    assert not out.exists() and not (tmp_path / "s.distill").exists()


def test_results_section_states_the_curve_and_which_students_meet_the_bounds(tmp_path):
    """run_all.py --report-only turns distill_quality.json into its RESULTS.md section: the curve of
    iterations per halving and which students meet every bound for replacing the teacher."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    def row(model, steps, iters, cell, slope, probe):
        return {"name": f"{model} ddim-{steps}" + (f" ({iters} it)" if iters else ""), "model": model,
                "sampler": "ddim", "steps": steps, "iters_per_stage": iters, "cell_dist": 10.0 * cell,
                "cell_dist_vs_ddim100": cell, "dist": 1.0, "site_slope": slope, "slope_vs_ddim100": slope,
                "probe": 0.9 + probe, "probe_minus_ddim100": probe, "images_per_s": 10.0 / steps,
                "meets_bounds": cell <= 1.05 and slope >= 0.9 and probe >= -0.01}
    rows = [row("teacher", 100, None, 1.0, 1.0, 0.0), row("student", 4, 100, 3.96, 0.98, 0.021),
            row("student", 4, 1000, 1.04, 0.95, -0.005), row("student", 2, 1000, 1.2, 0.99, 0.0),
            {**row("student", 4, 300, 2.0, 1.0, 0.0), "student_type": "sample"},  # an x0 student
            {**row("student", 4, 6000, 1.5, 1.0, 0.0), "student_type": "consistency", "sampler": "consistency",
             "first_teacher_steps": 64},  # a consistency student on the DDIM-64 grid
            row("teacher", 64, None, 1.01, 1.0, 0.001),  # the teacher's DDIM at a first teacher's steps
            {**row("teacher", 100, None, 1.3, 0.97, -0.002), "seed": 1}]  # DDIM-100 from other starting noise
    (tmp_path / "distill_quality.json").write_text(json.dumps({
        "name": "distill_quality", "machine": {}, "command": "x", "rows": rows, "n_images": 8,
        "curve": [{"iters_per_stage": 100, "distill_seconds": 120.0, "student_steps": [4]},
                  {"iters_per_stage": 1000, "distill_seconds": 550.0, "student_steps": [2, 4]},
                  {"iters_per_stage": 300, "label": "300 it, sample", "distill_seconds": 300.0, "student_steps": [4]},
                  {"iters_per_stage": 6000, "label": "6000 it, consistency, from DDIM-64", "distill_seconds": 1600.0,
                   "student_steps": [4], "sampler": "consistency", "first_teacher_steps": 64}],
        "distill": {"teacher_steps": 16, "batch_size": 16, "lr": 5e-4, "ema_decay": 0.99, "consistency_ema_decay": 0.95},
        "probe_no_synthetic": 0.8, "probe_repeats": 3}))
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    r = subprocess.run([sys.executable, str(bench / "run_all.py"), "--report-only"], capture_output=True, text=True,
                       env={**os.environ, "MEDI_FAST_BENCH_RESULTS": str(tmp_path)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Distilled students" in md and "iterations per halving: 100 (down to 4 steps, 120 s), 1000" in md, md
    assert "**Students meeting every bound: student ddim-4 (1000 it).**" in md
    assert ("100 it: 3.96x, 0.98, +0.021; 1000 it: 1.04x, 0.95, -0.005; 300 it, sample: 2.00x, 1.00, +0.000; "
            "6000 it, consistency, from DDIM-64: 1.50x, 1.00, +0.000.") in md
    assert "(EMA and target network 0.95); it is sampled by the consistency sampler at each step count." in md
    assert "the quality its students imitate): DDIM-64: 1.01x, 1.00, +0.001." in md
    assert ", 300 it, sample (down to 4 steps, 300 s)" in md
    assert "DDIM-100 again from other starting noise (the measures' own spread): 1.30x, 0.97, -0.002." in md


def _files(root) -> dict:
    """Every file under root with its size and modification time: what a refused command must not change."""
    from pathlib import Path

    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*") if p.is_file()}


ONE_STAGE = ("--steps", "1", "--teacher-steps", "2")


def _resume_args(teacher, out, *extra) -> list:
    """`_distill`'s one-stage run again, with --resume."""
    return ["distill", teacher, "--out", out, "--batch-size", "2", "--iters-per-stage", "2", "--device", "cpu",
            "--quiet", *ONE_STAGE, "--resume", *extra]


@pytest.fixture
def finished(teacher, tmp_path):
    """(teacher copy, student, run directory) of a finished one-stage distillation in tmp_path."""
    import shutil

    t, out = tmp_path / "teacher.pt", tmp_path / "s.pt"
    shutil.copy(teacher, t)
    assert _distill(t, out, *ONE_STAGE) == 0
    return t, out, tmp_path / "s.distill"


def _refused(args, capsys) -> str:
    """The one error line of a refused `distill` call, after checking that it wrote nothing."""
    from pathlib import Path

    before = _files(Path.cwd())
    line = _fail(args, capsys)
    assert _files(Path.cwd()) == before
    return line


def test_resume_with_nothing_to_resume_is_refused(teacher, tmp_path, capsys):
    out = tmp_path / "s.pt"
    line = _fail(_resume_args(teacher, out), capsys)
    assert "has no complete checkpoint to resume from; drop --resume" in line
    assert not (tmp_path / "s.distill").exists() and not out.exists()


def test_resume_with_other_options_is_refused_naming_them(finished, tmp_path, capsys):
    import shutil

    t, out, run = finished
    pack = ckpt_io.load(t).provenance["config"]["data"]
    shutil.copytree(pack, tmp_path / "pack-copy")
    for extra, expected in ((("--lr", "0.5"), "--lr 0.0001 (now 0.5)"),
                            (("--ema-decay", "0.5"), "--ema-decay 0.999 (now 0.5)"),
                            (("--data", tmp_path / "pack-copy"), f"--data '{pack}' (now '{tmp_path / 'pack-copy'}')")):
        line = _refused(_resume_args(t, out, *extra), capsys)
        assert line.startswith(f"medi-fast: error: --resume: {run} was started with {expected}")
        assert line.endswith("; resume with the original options or choose another --out")


@pytest.mark.parametrize("text, expected", [("{not json", "config.json is corrupt (JSONDecodeError)"),
                                            ("[1, 2]", "config.json holds a JSON list, not a run's options")])
def test_resume_with_a_corrupt_config_is_refused(finished, capsys, text, expected):
    t, out, run = finished
    (run / "config.json").write_text(text)
    line = _refused(_resume_args(t, out), capsys)
    assert expected in line


def test_resume_with_a_replaced_teacher_is_refused(finished, capsys):
    t, out, run = finished
    ck = ckpt_io.load(t)  # another model under the teacher's name
    ck.state_dict = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck.state_dict.items()}
    ck.ema_state_dict = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck.ema_state_dict.items()}
    ckpt_io.save(ck, t)
    line = _refused(_resume_args(t, out), capsys)
    assert f"the teacher {t} is not the checkpoint {run} was started from (content hash {ck.hash}" in line


def test_full_disk_while_saving_is_one_line_and_leaves_nothing_partial(teacher, tmp_path, capsys, monkeypatch):
    import errno
    import io

    real_save = torch.save

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(obj, f, *args, **kwargs):
        """torch.save onto a full disk: given a file name, torch's own writer fails with this RuntimeError;
        given a file object, its write raises OSError(ENOSPC)."""
        if isinstance(f, (str, os.PathLike)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, FullDisk(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "s.pt"
    line = _fail(["distill", teacher, "--out", out, "--steps", "1", "--teacher-steps", "2", "--batch-size", "2",
                  "--iters-per-stage", "2", "--device", "cpu", "--quiet"], capsys)
    assert line.startswith("medi-fast: error: disk full while writing ") and "step-00000002.pt" in line
    assert not out.exists()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and (p.suffix == ".pt" or ".medi-tmp-" in p.name)] == []


def test_interrupt_says_to_resume(monkeypatch, capsys):
    from medi_fast.training import distill as mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "distill", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["distill", "teacher.pt", "--out", "s.pt"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "medi-fast: interrupted; rerun with --resume to continue\n"


@pytest.mark.parametrize("field, value, expected", [
    ("cond_drop", "lots", "records a conditioning dropout that is not in [0, 1) ('lots')"),
    ("cond_drop", 1.5, "records a conditioning dropout that is not in [0, 1) (1.5)"),
    ("data", 7, "records a data that is not a path (7); pass --data")])
def test_a_teacher_provenance_is_checked_like_the_options(teacher, tmp_path, capsys, field, value, expected):
    """The teacher's header supplies the data and the dropout when no option does: checked like them."""
    ck = ckpt_io.load(teacher)
    ck.provenance = {**ck.provenance, field: value}
    bad = ckpt_io.save(ck, tmp_path / "bad.pt")
    line = _fail(["distill", bad, "--out", tmp_path / "s.pt", *ONE_STAGE, "--device", "cpu", "--quiet"], capsys)
    assert f"{bad} {expected}" in line
    assert not (tmp_path / "s.distill").exists() and not (tmp_path / "s.pt").exists()


def test_the_quality_curve_names_iterations_fewest_steps_and_an_optional_student_type():
    """distill_quality.py --iters-per-stage: ITERS[:K[:TYPE]] per point (TYPE: that point for one student type)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_quality.py"
    spec = importlib.util.spec_from_file_location("distill_quality_for_test", path)
    dq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dq)
    assert dq.parse_curve("100,300,1000:4,3000:4:sample,6000:4:consistency:64", [1, 2, 4, 8]) == [
        (100, 1, None, None), (300, 1, None, None), (1000, 4, None, None), (3000, 4, "sample", None),
        (6000, 4, "consistency", 64)]
    with pytest.raises(SystemExit, match="unknown student type 'lcm'"):
        dq.parse_curve("100:4:lcm", [4])
    # the students of the first curves keep their directories; a point from another first teacher gets its own
    assert dq.work_name(3000, "sample", 16, 16) == "iters-3000-sample"
    assert dq.work_name(6000, "consistency", 64, 16) == "iters-6000-consistency-from64"
    assert dq.STUDENT_KINDS["consistency"] == ("consistency", "v_prediction")
    # a consistency student samples at every step count on its grid (consistency_plan's rule)
    assert [k for k in (1, 2, 3, 4, 8, 64) if dq.on_grid(64, k)] == [1, 2, 4, 8]
