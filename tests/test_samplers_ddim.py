"""ddim vs diffusers' DDIMScheduler over a full 100-step loop on a tiny random MeDiUNet."""
import pytest
import torch
from diffusers import DDIMScheduler

from medi_fast.samplers import ddim, timesteps_for
from medi_fast.schedule import Schedule


def diffusers_ddim(model, x_T, cond, schedule, steps, eta, noises):
    sched = DDIMScheduler(**schedule.diffusers_config())
    sched.set_timesteps(steps)
    x = x_T.clone()
    for i, t in enumerate(sched.timesteps):
        eps = model(x, t.expand(x.shape[0]), cond)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noises[i] if eta > 0 else None).prev_sample
    return x


@pytest.mark.parametrize("eta, clip", [(0.0, True), (1.0, True),
                                       pytest.param(0.0, False, marks=pytest.mark.slow),
                                       pytest.param(1.0, False, marks=pytest.mark.slow)])
def test_ddim_100_equals_diffusers(tiny_sampler_case, eta, clip):
    model, cond, x_T = tiny_sampler_case
    schedule = Schedule(clip_sample=clip)  # clip_sample=True is diffusers' DDIM default; the random model hits it
    steps = 100
    gen = torch.Generator().manual_seed(2)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(steps)]
    with torch.no_grad():
        ref = diffusers_ddim(model, x_T, cond, schedule, steps, eta, noises)
        ours = ddim(model, x_T, timesteps_for("ddim", schedule, steps), schedule, cond, eta=eta,
                    noise=lambda i: noises[i])
    diff = (ours - ref).abs().max().item()
    print(f"ddim-100 eta={eta} clip={clip}: max |ours - diffusers| = {diff:.3e} (|x| max {ref.abs().max().item():.2f})")
    assert torch.isfinite(ours).all() and diff <= 1e-5


def test_ddim_noise_matters(tiny_sampler_case):
    """eta > 0 really uses the given noise (so the parity above is not vacuous)."""
    model, cond, x_T = tiny_sampler_case
    schedule, ts = Schedule(), Schedule().timesteps(5)
    with torch.no_grad():
        a = ddim(model, x_T, ts, schedule, cond, eta=1.0, noise=lambda i: torch.zeros_like(x_T))
        b = ddim(model, x_T, ts, schedule, cond, eta=1.0, noise=lambda i: torch.ones_like(x_T))
        c = ddim(model, x_T, ts, schedule, cond, eta=0.0)
    assert (a - b).abs().max() > 1e-2 and (a - c).abs().max() > 1e-2
