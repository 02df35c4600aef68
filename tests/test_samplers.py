"""Our coefficient-table samplers must reproduce diffusers' step() exactly."""

import pytest
import torch

from polcache.config import SamplerConfig, load_config
from polcache.errors import ConfigError
from polcache.policy.samplers import TrainingNoise, diffusers_scheduler, make_sampler


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddpm", 10), ("ddim", 16), ("ddim", 100), ("ddim", 3)])
def test_tables_match_diffusers_step(kind, steps):
    cfg = SamplerConfig()
    ours = make_sampler(cfg, kind, steps)
    ref = diffusers_scheduler(cfg, kind)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.float().tolist()
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(3, 16, 4, generator=g)
    x = x_ref.clone()
    for k, t in enumerate(ref.timesteps):
        eps = torch.randn(3, 16, 4, generator=g) * 1.5  # large enough that clipping happens
        step_gen = torch.Generator().manual_seed(1000 + k)
        x_ref = ref.step(eps, t, x_ref, generator=step_gen).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + k))
        x = ours.update(k, x, eps, noise)
        torch.testing.assert_close(x, x_ref, atol=2e-5, rtol=1e-5)


def test_flow_euler_integrates_constant_velocity_exactly():
    s = make_sampler(SamplerConfig(), "flow", 7)
    x0 = torch.randn(2, 16, 4)
    noise = torch.randn(2, 16, 4)
    x = noise.clone()
    for k in range(s.num_steps):  # a perfect velocity model: v = noise - x0
        x = s.update(k, x, noise - x0, None)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_bad_step_counts_are_clear_errors():
    with pytest.raises(ConfigError, match="1..100"):
        make_sampler(SamplerConfig(), "ddim", 0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler(SamplerConfig(), "euler", 10)
    for steps in (0, 1001):  # 100000 Euler steps ran a 23 GB machine out of memory
        with pytest.raises(ConfigError, match=f"steps={steps}: flow takes 1..1000 inference steps"):
            make_sampler(SamplerConfig(), "flow", steps)
    with pytest.raises(ConfigError, match="^--steps 100000: flow takes 1..1000 inference steps"):  # as eval names it
        make_sampler(SamplerConfig(), "flow", 100000, "--steps")


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_training_noise_target_inverts_corruption(objective):
    tn = TrainingNoise(SamplerConfig(), objective)
    x0 = torch.rand(5, 16, 4) * 2 - 1
    xt, t, target = tn.corrupt(x0, torch.Generator().manual_seed(0))
    if objective == "epsilon":
        ac = tn.alphas_cumprod[t.long()].view(-1, 1, 1)
        torch.testing.assert_close((xt - (1 - ac).sqrt() * target) / ac.sqrt(), x0, atol=1e-4, rtol=1e-4)
    else:
        tb = (t / 1000.0).view(-1, 1, 1)
        torch.testing.assert_close(xt - tb * target, x0, atol=1e-5, rtol=1e-5)


def test_a_sampler_that_does_not_read_the_denoisers_output_is_refused():
    """flow on a noise-predicting (epsilon) policy, or DDPM/DDIM on a velocity-predicting (flow) one,
    ran without complaint and produced garbage actions."""
    from helpers import tiny_policy, tiny_vla

    with pytest.raises(ConfigError, match=r"^--sampler flow does not fit policy.objective=epsilon \(a denoiser "
                                          r"trained to predict noise\): use --sampler ddpm or ddim$"):
        tiny_policy().sampler("flow", 4)
    for kind in ("ddpm", "ddim"):
        with pytest.raises(ConfigError, match=f"^--sampler {kind} does not fit policy.objective=flow .*use "
                                              "--sampler flow$"):
            tiny_vla().sampler(kind, 4)
    assert tiny_policy().sampler("ddpm", 4).kind == "ddpm" and tiny_vla().sampler("flow", 4).kind == "flow"
    with pytest.raises(ConfigError, match="^policy.sampler.kind=ddim does not fit policy.objective=flow.*use "
                                          "policy.sampler.kind=flow, or set policy.objective=epsilon to train a denoiser for ddim$"):
        load_config("configs/recommended_cpu.yaml", ["policy.objective=flow"])
    with pytest.raises(ConfigError, match="kind=ddpm or ddim, or set policy.objective=flow to train a denoiser for flow$"):
        load_config("configs/recommended_cpu.yaml", ["policy.sampler.kind=flow"])  # the objective is a config's too
