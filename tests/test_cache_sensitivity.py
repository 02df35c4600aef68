"""Delta sensitivities (reverse mode) against finite differences, and the error-bound objective."""

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.cache import CacheError, solve_acs
from polcache.cache.schedule import Calibration, build_schedule
from polcache.cache.sensitivity import delta_sensitivity
from polcache.policy.executor import DeltaStore

K = 5


class _Nudge(DeltaStore):
    """Adds eps to one element of block i's delta at step k, as the executor uses it."""

    def __init__(self, n, i, k, j, eps):
        super().__init__(n)
        self.where, self.j, self.eps = (i, k), j, eps

    def put(self, i, k, delta):
        if (i, k) == self.where:
            delta.view(-1)[self.j] += self.eps


@torch.no_grad()
def _projected_output(policy, sampler, feats, seed, store):
    """v . x_out for the x and v that delta_sensitivity draws from a generator seeded `seed` (flow: no noise)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, policy.cfg.horizon, policy.action_dim)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ctx = policy.denoiser.prepare_chunk(feats, sampler.timesteps)
    for k in range(sampler.num_steps):
        x = sampler.update(k, x, policy.denoiser.step(x, k, ctx, None, store), None)
    return float((v.double() * x.double()).sum())


def test_sensitivity_is_the_squared_gradient_norm_by_finite_differences():
    policy = tiny_policy(n_layers=1, width=4, horizon=10, objective="flow")  # float64 below: finite differences need it
    feats = policy.encode({"state": torch.randn(1, policy.cfg.n_obs_steps, 5,
                                                generator=torch.Generator().manual_seed(3))}).double()
    policy.double()
    torch.set_default_dtype(torch.float64)  # x, noise and v drawn in float64 too
    try:
        _check_against_finite_differences(policy, feats)
    finally:
        torch.set_default_dtype(torch.float32)


def _check_against_finite_differences(policy, feats):
    sampler = policy.sampler("flow", K).to("cpu")
    sampler = type(sampler)(kind=sampler.kind, clip_sample=False,
                            **{n: getattr(sampler, n).double() for n in ("timesteps", "a", "b", "c", "d", "e", "s")})
    sens = delta_sensitivity(policy, sampler, feats, torch.Generator().manual_seed(11))
    n = len(policy.denoiser.blocks)
    assert sens.shape == (n, K) and (sens >= 0).all()
    eps, numel = 1e-5, policy.cfg.horizon * policy.cfg.width
    for i, k in ((0, 0), (2, K - 1)):
        grad = [(_projected_output(policy, sampler, feats, 11, _Nudge(n, i, k, j, eps))
                 - _projected_output(policy, sampler, feats, 11, _Nudge(n, i, k, j, -eps))) / (2 * eps)
                for j in range(numel)]
        assert sens[i, k] > 0 and sens[i, k] == pytest.approx(float(np.sum(np.square(grad))), rel=1e-6)


def _calibration(K=12, n=3):
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.5, 1.0, (n, K, K))
    sim = (sim + sim.transpose(0, 2, 1)) / 2
    dist = rng.uniform(0.1, 1.0, (n, K, K)) * (1 - np.eye(K))
    sens = np.full((n, K), 1e-12)
    sens[:, -4:] = 1.0  # only the last four steps reach the actions
    names = ["layers.0.sa", "layers.0.ca", "layers.0.ffn"][:n]
    return Calibration(block_names=names, similarity=sim, l1=np.ones(n), samples=1, source="hand-made", seed=0,
                       distance=dist, sensitivity=sens)


def test_error_bound_spends_updates_where_errors_reach_the_actions():
    calib = _calibration()
    bound = build_schedule(calib, "blockwise", 5, 0, False, "h", "ddpm", "error-bound")
    for steps in bound.update_steps.values():  # step 0 is always an update; the other four go to the last four
        assert steps == [0, 8, 9, 10, 11]
    similar = build_schedule(calib, "blockwise", 5, 0, False, "h", "ddpm", "similarity")
    for i, steps in enumerate(similar.update_steps.values()):
        assert steps == solve_acs(calib.similarity[i], 5)
    expected = -np.sqrt(calib.sensitivity[:, None, :] * calib.distance)
    np.testing.assert_allclose(calib.objective_matrix("error-bound"), expected)


def test_error_bound_needs_distances_and_sensitivities():
    calib = _calibration()
    calib.sensitivity = None
    with pytest.raises(CacheError, match="recalibrate"):
        build_schedule(calib, "bac", 3, 1, True, "h", "ddpm", "error-bound")
    with pytest.raises(CacheError, match="objective"):
        build_schedule(_calibration(), "bac", 3, 1, True, "h", "ddpm", "closest")
