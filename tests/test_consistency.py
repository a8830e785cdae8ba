"""Consistency distillation: the multistep consistency sampler against diffusers' LCMScheduler, the
distillation target (the boundary condition and the target network's x0 one teacher step on), a student end
to end (checkpoint -> export -> generate with its own sampler and steps, ort-cpu), and the refusals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medi_fast import checkpoint as ckpt_io
from medi_fast.cli import main
from medi_fast.errors import MediFastError
from medi_fast.samplers import consistency, ddim, needs_noise, timesteps_for
from medi_fast.samplers.ddim import ddim_step
from medi_fast.schedule import Schedule
from medi_fast.training.distill import (ConsistencyGrid, consistency_loss, consistency_plan, consistency_target,
                                        student_schedule, x0_of)


def fake_model(x, t, cond):
    """A deterministic stand-in for a UNet whose output depends on x and t."""
    return 0.7 * x + 0.05 * torch.sin(t.float().view(-1, 1, 1, 1) / 100.0 + x)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_consistency_sampler_matches_diffusers_lcm_scheduler(prediction_type):
    from diffusers import LCMScheduler

    schedule = student_schedule(Schedule(prediction_type="v_prediction"), prediction_type, 4, sampler="consistency")
    ts = timesteps_for("consistency", schedule, 4)
    assert list(ts) == [999, 749, 499, 249]  # trailing: the first step from the highest noise
    config = {k: v for k, v in schedule.diffusers_config().items() if k != "clip_sample_range"}
    ref = LCMScheduler(**config)
    ref.set_timesteps(timesteps=[int(t) for t in ts])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t.expand(2), {}), t, x, generator=g).prev_sample
    g2 = torch.Generator().manual_seed(5)
    ours = consistency(fake_model, x_T.clone(), ts, schedule, {}, noise=lambda i: torch.randn(2, 3, 8, 8, generator=g2))
    # LCM's boundary scalings are c_skip ~ 4e-8 and c_out ~ 1 at t >= 249: the same map to 1e-5
    assert (ours - x).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())
    # fresh noise at each step: other noise, other image; one step needs none
    g3 = torch.Generator().manual_seed(6)
    other = consistency(fake_model, x_T.clone(), ts, schedule, {}, noise=lambda i: torch.randn(2, 3, 8, 8, generator=g3))
    assert (other - ours).abs().max().item() > 1e-2
    one = consistency(fake_model, x_T.clone(), timesteps_for("consistency", schedule, 1), schedule, {})
    assert (one - ddim(fake_model, x_T.clone(), [999], schedule, {})).abs().max().item() <= 1e-5  # DDIM-1 = x0
    with pytest.raises(MediFastError, match="draws fresh noise"):
        consistency(fake_model, x_T.clone(), ts, schedule, {})
    assert needs_noise("consistency", 0.0) and not needs_noise("ddim", 0.0) and needs_noise("ddim", 0.5)
    from medi_fast.generate import GenerateConfig

    with pytest.raises(MediFastError, match="consistency draws fresh noise at every step and takes no --eta"):
        GenerateConfig(sampler="consistency", eta=0.5)


def test_consistency_plan_needs_the_student_levels_on_the_teacher_grid():
    assert consistency_plan(64, 4) == [4] and consistency_plan(16, 1) == [1]
    for teacher_steps, steps in ((64, 3), (48, 4), (4, 4), (8, 16)):
        with pytest.raises(MediFastError, match=f"--steps {steps} with --teacher-steps {teacher_steps}"):
            consistency_plan(teacher_steps, steps)
    grid = ConsistencyGrid(Schedule(), 64, 4)
    assert len(grid.t) == 64 and set(timesteps_for("consistency", student_schedule(Schedule(), "v_prediction", 4,
                                                                                       "consistency"), 4)) <= set(grid.t.tolist())
    assert grid.abar_next[-1].item() == 1.0 and torch.equal(grid.abar_next[:-1], grid.abar[1:])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_the_target_is_the_target_networks_x0_one_teacher_step_on_and_the_data_at_the_boundary(
        tiny_sampler_case, prediction_type):
    model, cond, x_T = tiny_sampler_case
    teacher_sched = Schedule()  # eps, clipped: the published teacher
    grid = ConsistencyGrid(teacher_sched, 8, 2)
    target_net = lambda x, t, c: 0.5 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000  # noqa: E731
    idx = torch.tensor([3, 7])  # an inner level and the last (the next level is the data)
    with torch.no_grad():
        got = consistency_target(model, teacher_sched, target_net, prediction_type, grid, x_T, idx, cond)
        abar = grid.abar[idx].float().view(-1, 1, 1, 1)
        nxt = grid.abar_next[idx].float().view(-1, 1, 1, 1)
        out = model(x_T, grid.t[idx], cond)
        z_next = ddim_step(out, x_T, abar, nxt, teacher_sched, use_clipped_model_output=True)
        inner = x0_of(prediction_type, target_net(z_next, grid.t[idx + 1 - (idx == 7).long()], cond), z_next, nxt)
        x0_teacher = x0_of("epsilon", out, x_T, abar).clamp(-1, 1)
    assert torch.allclose(got[0], inner[0], atol=1e-5)
    assert torch.allclose(got[1], x0_teacher[1], atol=1e-5)  # f(x, 0) = x: the teacher's own last step
    assert torch.allclose(got[1], z_next[1], atol=1e-5)  # (DDIM's last step lands on x0 itself)
    # the loss: 0 at the target, the pseudo-Huber distance elsewhere (~ the L2 norm for large differences)
    assert consistency_loss(got, got).item() == 0.0
    d = consistency_loss(got + 0.1, got).item()
    assert abs(d - (0.1 * np.sqrt(got[0].numel()))) < 0.05


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(distill_teacher):
    return distill_teacher


def _distill(teacher, out, *extra):
    return main(["distill", str(teacher), "--out", str(out), "--method", "consistency", "--batch-size", "2",
                 "--iters-per-stage", "3", "--device", "cpu", "--quiet", *[str(e) for e in extra]])


@pytest.mark.slow
def test_consistency_student_end_to_end(teacher, tmp_path, capsys, refused, generates_with_own_sampler):
    out = tmp_path / "cd.pt"
    assert _distill(teacher, out, "--steps", "2", "--teacher-steps", "8") == 0
    assert "consistency-2 student" in capsys.readouterr().out
    ck, teacher_ck = ckpt_io.load(out), ckpt_io.load(teacher)
    s = ck.schedule
    assert (s.prediction_type, s.default_steps, s.default_sampler, s.timestep_spacing, s.clip_sample) == \
        ("v_prediction", 2, "consistency", "trailing", False)
    assert ck.provenance["method"].startswith("consistency distillation") and ck.provenance["teacher_steps"] == 8
    assert sorted(p.name for p in (tmp_path / "cd.distill" / "stages").iterdir()) == ["student-0002.pt"]
    assert any(not torch.equal(ck.weights()[k], teacher_ck.weights()[k]) for k in ck.state_dict)
    metrics = pd.read_csv(tmp_path / "cd.distill" / "metrics.csv")
    assert metrics["step"].iloc[-1] == 3 and np.isfinite(metrics["loss"]).all()

    # generate: its own sampler and steps by default, from the checkpoint and its ONNX export, seeded per image
    generates_with_own_sampler(out, tmp_path, 2, "consistency")
    import medi_fast

    a = medi_fast.load(out, backend="torch").generate("LUAD", tss="S1", n=2, seed=3)
    again = medi_fast.load(out, backend="torch").generate("LUAD", tss="S1", n=2, seed=3)
    b = medi_fast.load(tmp_path / "exp" / "model.onnx", backend="ort-cpu").generate("LUAD", tss="S1", n=2, seed=3)
    assert np.array_equal(a, again)  # fresh noise, from each image's own seeded stream
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # another sampler than its own: legal, with one warning line
    capsys.readouterr()
    assert main(["generate", str(out), "--class", "LUAD", "--tss", "S2", "--n", "1", "--sampler", "ddim",
                 "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert "distilled for consistency-2" in capsys.readouterr().err

    # a consistency student is no teacher for either method
    for method in ("consistency", "progressive"):
        line = refused(["distill", out, "--out", tmp_path / "again.pt", "--steps", "1", "--method", method])
        assert "needs a trained model as teacher" in line and not (tmp_path / "again.pt").exists()


@pytest.mark.slow
def test_consistency_resume_equals_the_uninterrupted_run(teacher, tmp_path, monkeypatch, refused, interrupt_on_call):
    from medi_fast.training import distill as mod

    opts = dict(teacher=str(teacher), steps=2, teacher_steps=8, iters_per_stage=4, batch_size=2, device="cpu",
                progress=False, checkpoint_every=1, method="consistency")
    whole = mod.distill(out=str(tmp_path / "whole.pt"), **opts)
    real_loss = interrupt_on_call(mod, "consistency_loss", 3)  # Ctrl-C in the 3rd iteration
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        mod.distill(out=str(out), **opts)
    assert not out.exists()
    monkeypatch.setattr(mod, "consistency_loss", real_loss)
    # --resume under the other method is refused, naming it
    line = refused(["distill", teacher, "--out", out, "--steps", "2", "--teacher-steps", "8", "--batch-size", "2",
                  "--iters-per-stage", "4", "--device", "cpu", "--resume", "--quiet"])
    assert "--method 'consistency' (now 'progressive')" in line
    mod.distill(out=str(out), resume=True, **opts)
    a, b = ckpt_io.load(whole), ckpt_io.load(out)
    assert all(torch.equal(a.weights()[k], b.weights()[k]) for k in a.weights())


def test_consistency_refusals_are_one_line(teacher, tmp_path, refused):
    out = tmp_path / "s.pt"
    assert "--steps 3 with --teacher-steps 64" in refused(["distill", teacher, "--out", out, "--method", "consistency",
                                                        "--steps", "3"])
    assert "'lcm' is not one of 'progressive', 'consistency'" in refused(
        ["distill", teacher, "--out", out, "--method", "lcm"])
    assert not out.exists() and not (tmp_path / "s.distill").exists()
