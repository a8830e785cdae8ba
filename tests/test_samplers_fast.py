"""Fast solvers (DPM-Solver++(2M), UniPC) vs diffusers' schedulers, and vs an exact ODE solution."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from medi_fast import MediFastError
from medi_fast.samplers import SAMPLERS, ddim, get_sampler, timesteps_for
from medi_fast.samplers.dpm_solver import dpmpp_2m, dpmpp_2m_clip, multistep_timesteps
from medi_fast.samplers.unipc import unipc, unipc_clip
from medi_fast.schedule import Schedule

SOLVERS = {"dpmpp-2m": (dpmpp_2m, DPMSolverMultistepScheduler), "unipc": (unipc, UniPCMultistepScheduler)}
CLIPPED = {"dpmpp-2m-clip": (dpmpp_2m_clip, DPMSolverMultistepScheduler), "unipc-clip": (unipc_clip, UniPCMultistepScheduler)}


def reference_scheduler(cls, schedule: Schedule, **overrides):
    """diffusers' scheduler on our schedule (1000 linear betas 1e-4..0.02, epsilon), its defaults otherwise."""
    return cls(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
               beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
               prediction_type=schedule.prediction_type, **overrides)


def diffusers_loop(scheduler, model, x_T, cond, steps):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps = model(x, t.expand(x.shape[0]), cond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_registered():
    assert SAMPLERS["dpmpp-2m"].fn is dpmpp_2m and SAMPLERS["unipc"].fn is unipc
    assert SAMPLERS["dpmpp-2m-clip"].fn is dpmpp_2m_clip and SAMPLERS["unipc-clip"].fn is unipc_clip
    assert all(e.name == n for n, e in SAMPLERS.items())
    assert [n for n, e in SAMPLERS.items() if e.takes_eta] == ["ddim"]
    # the ODE solvers choose their own timesteps; DDIM and the consistency sampler run the schedule's grid
    assert all(e.own_timesteps is not None for n, e in SAMPLERS.items() if n not in ("ddim", "consistency"))
    assert SAMPLERS["consistency"].spacing == "trailing" and [n for n, e in SAMPLERS.items() if e.stochastic] == ["consistency"]
    assert get_sampler("unipc") is unipc


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 25, 50, 999])
def test_timesteps_equal_diffusers(name, spacing, steps):
    ref = reference_scheduler(SOLVERS[name][1], Schedule(), timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = multistep_timesteps(Schedule(), steps, spacing)
    assert np.array_equal(ours, ref.timesteps.numpy())
    # and the sigmas the solver integrates over (ours are built inside the sampler from the timesteps)
    from medi_fast.samplers.dpm_solver import solver_sigmas
    assert torch.equal(solver_sigmas(Schedule(), ours), ref.sigmas)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_timesteps_for_uses_the_solvers_own_spacing(name):
    ref = reference_scheduler(SOLVERS[name][1], Schedule())
    ref.set_timesteps(20)
    assert np.array_equal(timesteps_for(name, Schedule(), 20), ref.timesteps.numpy())
    # DDIM keeps the schedule's own (leading) spacing
    assert np.array_equal(timesteps_for("ddim", Schedule(), 20), Schedule().timesteps(20))


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [10, 20])
def test_full_loop_equals_diffusers(tiny_sampler_case, name, steps):
    model, cond, x_T = tiny_sampler_case
    sampler, cls = SOLVERS[name]
    schedule = Schedule()
    with torch.no_grad():
        ref = diffusers_loop(reference_scheduler(cls, schedule), model, x_T, cond, steps)
        ours = sampler(model, x_T, multistep_timesteps(schedule, steps), schedule, cond)
    diff = (ours - ref).abs().max().item()
    print(f"{name} {steps} steps: max |ours - diffusers| = {diff:.3e} (|x| max {ref.abs().max().item():.2f})")
    assert ours.shape == x_T.shape and torch.isfinite(ours).all()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_full_loop_equals_diffusers_at_image_scale(tiny_sampler_case, name):
    """A random UNet's eps makes |x0| reach hundreds; near-ideal eps keeps x in image range, where 1e-4 is strict."""
    model, cond, x_T = tiny_sampler_case
    sampler, cls = SOLVERS[name]
    schedule = Schedule()
    ideal = gaussian_denoiser(schedule)

    def den(x, t, c):  # the Gaussian-data optimum plus the (random) model as a perturbation
        return ideal(x, t, c) + 0.1 * model(x, t, c)
    with torch.no_grad():
        ref = diffusers_loop(reference_scheduler(cls, schedule), den, x_T, cond, 15)
        ours = sampler(den, x_T, multistep_timesteps(schedule, 15), schedule, cond)
    diff = (ours - ref).abs().max().item()
    print(f"{name} 15 steps, image scale: max |ours - diffusers| = {diff:.3e} (|x| max {ref.abs().max().item():.2f})")
    assert ref.abs().max() < 5 and diff <= 1e-4


@pytest.mark.parametrize("name", sorted(CLIPPED))
def test_clipped_loop_equals_diffusers_thresholding(tiny_sampler_case, name):
    """-clip variants = diffusers' thresholding=True at its default sample_max_value=1 (x0 clipped to [-1, 1])."""
    model, cond, x_T = tiny_sampler_case
    sampler, cls = CLIPPED[name]
    schedule = Schedule()
    with torch.no_grad():
        ref = diffusers_loop(reference_scheduler(cls, schedule, thresholding=True), model, x_T, cond, 10)
        ours = sampler(model, x_T, timesteps_for(name, schedule, 10), schedule, cond)
        unclipped = SOLVERS[name.removesuffix("-clip")][0](model, x_T, multistep_timesteps(schedule, 10), schedule, cond)
    diff = (ours - ref).abs().max().item()
    print(f"{name} 10 steps: max |ours - diffusers(thresholding=True)| = {diff:.3e} (|x| max {ref.abs().max().item():.2f})")
    assert diff <= 1e-4
    assert ref.abs().max() <= 1.0 + 1e-6 < unclipped.abs().max()  # the random model's x0 really gets clipped


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_full_loop_equals_diffusers_trailing(tiny_sampler_case, name):
    """Non-default spacing: the sampler follows whatever timesteps it is given, as diffusers would."""
    model, cond, x_T = tiny_sampler_case
    sampler, cls = SOLVERS[name]
    schedule = Schedule()
    with torch.no_grad():
        ref = diffusers_loop(reference_scheduler(cls, schedule, timestep_spacing="trailing"), model, x_T, cond, 8)
        ours = sampler(model, x_T, multistep_timesteps(schedule, 8, "trailing"), schedule, cond)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_sample_independent_of_batch(tiny_sampler_case, name):
    model, cond, x_T = tiny_sampler_case
    sampler = SOLVERS[name][0]
    ts = multistep_timesteps(Schedule(), 6)
    with torch.no_grad():
        both = sampler(model, x_T, ts, Schedule(), cond)
        second = sampler(model, x_T[1:], ts, Schedule(), {k: v[1:] for k, v in cond.items()})
    # equal up to float32 rounding of batched convolutions (|x| reaches hundreds with a random model)
    assert torch.allclose(both[1:], second, rtol=1e-5, atol=1e-4)


# An exactly solvable case: data ~ N(mu, s^2 I).  The ideal denoiser is
#   eps(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / v_t,   v_t = abar s^2 + 1 - abar,
# and the probability-flow ODE keeps z = (x_t - sqrt(abar) mu) / sqrt(v_t) constant, so its exact
# end point from x_T is x_0 = mu + s z.  A solver's error against that is its discretisation error.
MU, S = 0.3, 0.5


def gaussian_denoiser(schedule: Schedule):
    abar_all = schedule.alphas_cumprod.double()

    def eps(x, t, cond):
        abar = abar_all[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        v = abar * S**2 + 1 - abar
        return ((1 - abar).sqrt() * (x.double() - abar.sqrt() * MU) / v).to(x.dtype)
    return eps


def exact_solution(schedule: Schedule, x_T: torch.Tensor, t_first: int) -> torch.Tensor:
    abar = schedule.alphas_cumprod.double()[t_first]
    z = (x_T.double() - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()
    return MU + S * z


@pytest.mark.parametrize("steps, factor", [(20, 0.5), (40, 0.15)])
def test_second_order_solvers_beat_ddim_on_exact_ode(steps, factor):
    schedule = Schedule(clip_sample=False)  # no clipping, to measure pure discretisation error
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = gaussian_denoiser(schedule)
    errs = {}
    for name in ("ddim", "dpmpp-2m", "unipc"):
        ts = timesteps_for(name, schedule, steps)
        out = get_sampler(name)(den, x_T, ts, schedule, {})
        errs[name] = (out - exact_solution(schedule, x_T, int(ts[0]))).abs().max().item()
    print(steps, errs)  # measured: 20 steps ddim 0.209, dpmpp-2m 0.073, unipc 0.068; 40: 0.108, 0.0056, 0.0100
    assert errs["dpmpp-2m"] < factor * errs["ddim"] and errs["unipc"] < factor * errs["ddim"]


def test_solvers_converge_with_steps():
    """Doubling the steps shrinks a second-order solver's error by clearly more than 2x (first order)."""
    schedule = Schedule(clip_sample=False)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = gaussian_denoiser(schedule)
    for sampler in (dpmpp_2m, unipc):
        e = []
        for steps in (10, 20):
            ts = multistep_timesteps(schedule, steps)
            e.append((sampler(den, x_T, ts, schedule, {}) - exact_solution(schedule, x_T, int(ts[0]))).abs().max())
        assert e[1] < e[0] / 2.5, (sampler.__name__, e)


@pytest.mark.parametrize("name", sorted(SOLVERS) + sorted(CLIPPED))
def test_errors(tiny_sampler_case, name):
    model, cond, x_T = tiny_sampler_case
    sampler = {**SOLVERS, **CLIPPED}[name][0]
    with pytest.raises(MediFastError, match=f"{name} is a deterministic ODE solver.*--eta 0"):
        sampler(model, x_T, multistep_timesteps(Schedule(), 5), Schedule(), cond, eta=0.5)
    with pytest.raises(MediFastError, match="strictly decreasing"):
        sampler(model, x_T, [10, 500, 999], Schedule(), cond)
    with pytest.raises(MediFastError, match=r"timesteps must lie in \[0, 999\]"):
        sampler(model, x_T, [1000, 500], Schedule(), cond)
    with pytest.raises(MediFastError, match="between 1 and 1000"):
        timesteps_for(name, Schedule(), 0)
    with pytest.raises(MediFastError, match="repeat timesteps.*at most 500 steps"):
        multistep_timesteps(Schedule(), 1000)
    with pytest.raises(MediFastError, match="unknown timestep spacing"):
        multistep_timesteps(Schedule(), 10, "linear")


def test_callback_sees_every_step(tiny_sampler_case):
    model, cond, x_T = tiny_sampler_case
    for sampler in (dpmpp_2m, unipc):
        seen = []
        with torch.no_grad():
            out = sampler(model, x_T, multistep_timesteps(Schedule(), 4), Schedule(), cond,
                          callback=lambda i, x: seen.append((i, x.clone())))
        assert [i for i, _ in seen] == [0, 1, 2, 3] and torch.equal(seen[-1][1], out)


def test_ddim_is_still_first_order_reference():
    """Sanity for the comparison above: ddim's error halves (roughly) when steps double."""
    schedule = Schedule(clip_sample=False)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = gaussian_denoiser(schedule)
    e = []
    for steps in (10, 20):
        ts = schedule.timesteps(steps, "trailing")  # trailing: starts at t = 999 like the solvers
        e.append((ddim(den, x_T, ts, schedule, {}) - exact_solution(schedule, x_T, int(ts[0]))).abs().max().item())
    assert 1.5 < e[0] / e[1] < 3.0, e


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_cli_solver_runs_and_rejects_eta(tiny_ckpt, tmp_path, capsys, name):
    from medi_fast.cli import main

    args = ["generate", str(tiny_ckpt), "--class", "LUAD", "--tss", "05", "--n", "2", "--steps", "3",
            "--sampler", name]
    main(args + ["--out", str(tmp_path / "ok")])
    assert len(list((tmp_path / "ok").rglob("*.png"))) == 2
    with pytest.raises(SystemExit) as e:
        main(args + ["--eta", "0.3", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"medi-fast: error: {name} is a deterministic ODE solver and takes no --eta (got 0.3); use --eta 0 or --sampler ddim"
    assert not list((tmp_path / "bad").rglob("*.png"))
