"""The cached executor against the uncached run and a straightforward reference loop."""

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.cache.baselines import no_cache_plan, threshold_plan, uniform_plan, with_forecast
from polcache.policy.executor import DeltaStore, Plan, fused_rows, make_store
from polcache.policy.ops import COMPUTE, FORECAST, GATE, REUSE

SAMPLERS = [("ddpm", 10), ("ddim", 8), ("flow", 6)]


@pytest.fixture(scope="module")
def policies():
    """One tiny policy per objective: each sampler runs on the denoiser output it reads."""
    return {objective: tiny_policy(n_layers=2, width=32, objective=objective) for objective in ("epsilon", "flow")}


@pytest.fixture(scope="module")
def policy(policies):
    return policies["epsilon"]


def fitting(policies, kind):
    return policies["flow" if kind == "flow" else "epsilon"]


def features(policy, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return policy.encode({"state": torch.randn(batch, policy.cfg.n_obs_steps, 5, generator=g)})


def run(policy, feats, sampler, plan, seed=1, store=None):
    return policy.sample(feats, sampler, plan, torch.Generator().manual_seed(seed), store)


def reference(policy, feats, sampler, ops, seed=1, threshold=None):
    """The plan followed literally: per block a list of (step, delta) of its updates; reuse takes
    the last one, forecast extrapolates the last two linearly in the step index; a GATE row
    recomputes the rest when the first block's accumulated relative L1 change reaches `threshold`."""
    den = policy.denoiser
    gen = torch.Generator().manual_seed(seed)
    shape = (feats.shape[0], policy.cfg.horizon, policy.action_dim)
    K = sampler.num_steps
    x = torch.randn(shape, generator=gen)
    noise = torch.randn((K, *shape), generator=gen) if sampler.needs_noise else None
    ctx = den.prepare_chunk(feats, sampler.timesteps)
    updates = {i: [] for i in range(len(den.blocks))}
    acc = 0.0
    for k in range(K):
        h = den.embed_step(x, ctx)
        row = list(ops[k])
        for i, blk in enumerate(den.blocks):
            if row[i] == GATE:
                (_, d1), (_, d0) = updates[i - 1][-1], updates[i - 1][-2]
                acc += ((d1 - d0).abs().mean() / d0.abs().mean()).item()
                go = acc >= threshold
                acc = 0.0 if go else acc
                row = [(COMPUTE if go else REUSE) if op == GATE else op for op in row]
            if row[i] == COMPUTE:
                d = blk(h, ctx.kv_at(i, k))
                updates[i].append((k, d))
            elif row[i] == REUSE or len(updates[i]) < 2:
                d = updates[i][-1][1]
            else:
                (k1, d1), (k0, d0) = updates[i][-1], updates[i][-2]
                d = d1 + (d1 - d0) / (k1 - k0) * (k - k1)
            h = h + d
        x = sampler.update(k, x, den.output(h), None if noise is None else noise[k])
    return x


def random_ops(K, n, seed, skip_ops=(REUSE,)):
    rng = np.random.default_rng(seed)
    ops = rng.choice([COMPUTE, *skip_ops], size=(K, n), p=[0.4] + [0.6 / len(skip_ops)] * len(skip_ops))
    ops[0] = COMPUTE
    return tuple(tuple(int(o) for o in row) for row in ops)


@pytest.mark.parametrize("kind,K", SAMPLERS)
def test_full_plan_equals_uncached_bit_for_bit(policies, kind, K):
    policy = fitting(policies, kind)
    s = policy.sampler(kind, K)
    f = features(policy)
    n = len(policy.denoiser.blocks)
    uncached = run(policy, f, s, None)
    assert torch.equal(run(policy, f, s, no_cache_plan(K, n)), uncached)
    assert torch.equal(run(policy, f, s, [[COMPUTE] * n] * K), uncached)  # plain rows still work
    assert torch.equal(run(policy, f, s, threshold_plan(K, n, 0.0)), uncached)  # threshold 0: always recompute


@pytest.mark.parametrize("kind,K", SAMPLERS)
def test_cached_run_equals_reference(policies, kind, K):
    policy = fitting(policies, kind)
    s = policy.sampler(kind, K)
    f = features(policy)
    n = len(policy.denoiser.blocks)
    ops = random_ops(K, n, seed=K)
    out = run(policy, f, s, Plan(ops))
    assert torch.equal(out, reference(policy, f, s, ops))
    assert not torch.equal(out, run(policy, f, s, None))


@pytest.mark.parametrize("kind,K", SAMPLERS)
def test_forecast_equals_reference(policies, kind, K):
    policy = fitting(policies, kind)
    s = policy.sampler(kind, K)
    f = features(policy)
    ops = random_ops(K, len(policy.denoiser.blocks), seed=K + 1, skip_ops=(REUSE, FORECAST))
    torch.testing.assert_close(run(policy, f, s, Plan(ops)), reference(policy, f, s, ops), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,K", SAMPLERS)
def test_threshold_cache_equals_reference(policies, kind, K):
    policy = fitting(policies, kind)
    s = policy.sampler(kind, K)
    f = features(policy)
    n = len(policy.denoiser.blocks)
    ref_uncached = run(policy, f, s, None)
    for threshold in (0.05, 0.3, float("inf")):
        plan = threshold_plan(K, n, threshold)
        store = make_store(plan, n)
        out = run(policy, f, s, plan, store=store)
        assert torch.equal(out, reference(policy, f, s, plan.ops, threshold=threshold))
        assert n * 2 + (K - 2) <= store.computed <= n * K
    assert store.computed == 2 * n + (K - 2)  # inf: only the probe block between first and last step
    assert not torch.equal(out, ref_uncached)


def test_uniform_and_forecast_plans_are_what_they_say():
    p = uniform_plan(7, 3, 3)
    assert [row[0] for row in p] == [COMPUTE, REUSE, REUSE, COMPUTE, REUSE, REUSE, COMPUTE]
    assert p.table().shape == (7, 3) and p.table().dtype == np.int8
    f = with_forecast(p)
    assert f.method == "uniform+forecast" and [row[1] for row in f][:3] == [COMPUTE, FORECAST, FORECAST]


def test_store_counts_evaluations_and_gate_needs_a_threshold(policy):
    s = policy.sampler("ddim", 8)
    n = len(policy.denoiser.blocks)
    store = DeltaStore(n)
    run(policy, features(policy), s, uniform_plan(8, n, 4), store=store)
    assert store.computed == 2 * n
    with pytest.raises(RuntimeError, match="threshold"):
        run(policy, features(policy), s, [row for row in threshold_plan(8, n, 0.1)])  # rows lose the threshold


def test_fused_rows_list_the_computed_blocks_of_each_step():
    C, R = COMPUTE, REUSE
    assert fused_rows(Plan(((C, C, C, C), (R, R, C, R), (C, R, R, C)))) == ((0, 1, 2, 3), (2,), (0, 3))
    assert fused_rows(Plan(((C, FORECAST), (C, C)))) is None  # forecast and GATE run block by block
    assert fused_rows(Plan(((C, C), (R, R)))) is not None and fused_rows(Plan(((C, R), (R, R)))) is None


@pytest.mark.parametrize("kind,K", SAMPLERS)
def test_fused_run_equals_the_observed_block_by_block_run(policies, kind, K):
    policy = fitting(policies, kind)
    s = policy.sampler(kind, K)
    f = features(policy)
    n = len(policy.denoiser.blocks)
    plan = Plan(random_ops(K, n, seed=K + 7))
    assert fused_rows(plan) is not None
    store = make_store(plan, n)  # an observing store forces the block-by-block path
    torch.testing.assert_close(run(policy, f, s, plan), run(policy, f, s, plan, store=store), rtol=1e-6, atol=1e-6)
    assert store.computed == int((plan.table() == COMPUTE).sum())
