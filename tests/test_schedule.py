import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from medi_fast import MediFastError
from medi_fast.schedule import Schedule


def test_schedule_equals_diffusers_ddpm_defaults():
    ref = DDPMScheduler()
    s = Schedule()
    assert torch.equal(s.betas, ref.betas) and torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    assert (ref.config.clip_sample, ref.config.prediction_type) == (s.clip_sample, s.prediction_type)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    assert torch.allclose(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 100, 1000])
def test_timesteps_equal_diffusers_ddim(spacing, steps):
    ref = DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert np.array_equal(Schedule(timestep_spacing=spacing).timesteps(steps), ref.timesteps.numpy())


def test_bad_steps_and_spacing():
    with pytest.raises(MediFastError, match="between 1 and 1000"):
        Schedule().timesteps(0)
    with pytest.raises(MediFastError, match="spacing"):
        Schedule(timestep_spacing="weird")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_is_what_diffusers_trains_and_what_samplers_invert(prediction_type):
    from medi_fast.schedule import split_output

    ref = DDPMScheduler(prediction_type=prediction_type)
    s = Schedule(prediction_type=prediction_type)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    target = s.training_target(x0, noise, t)
    # diffusers' train_unconditional.py: noise for epsilon, get_velocity for v_prediction, x0 for sample
    want = {"epsilon": noise, "sample": x0}.get(prediction_type)
    want = ref.get_velocity(x0, noise, t) if want is None else want
    assert torch.allclose(target, want, atol=1e-6)
    # a perfect model output converts back to the x0 and noise it came from
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    got_x0, got_eps = split_output(prediction_type, target, s.add_noise(x0, noise, t), abar.sqrt(), (1 - abar).sqrt())
    assert torch.allclose(got_x0, x0, atol=2e-3) and torch.allclose(got_eps, noise, atol=2e-3)
