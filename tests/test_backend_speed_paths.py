"""The torch backend's fast paths: CUDA graphs of whole chunks and reduced-precision denoisers.

Both must give the actions of the plain eager fp32 path: graphs exactly what eager computes on
the same device (same noise), bf16 within the parity gate, which also refuses to start when
the tolerance is not met. The CUDA tests run on the GPU machine and skip here."""

import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.cache.baselines import threshold_plan, uniform_plan
from polcache.errors import PrecisionError
from polcache.policy.backend import TorchBackend
from polcache.policy.precision import probe_observations

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles as a fresh process would: dynamo's recompile limit (8 per function) would
    otherwise count the sampler update's compilations for every shape of the tests before."""
    torch._dynamo.reset()


def obs_np(policy, n=2, seed=3):
    return {k: v.numpy() for k, v in probe_observations(policy, n, seed).items()}


def test_bf16_denoiser_passes_its_gate_and_stays_close_on_cpu():
    p = tiny_policy(n_layers=2, width=32)
    ref = TorchBackend(p, "ddim", 8)
    low = TorchBackend(tiny_policy(n_layers=2, width=32), "ddim", 8, precision="bf16", precision_tolerance=0.2)
    assert low.parity["max_abs"] <= 0.2 and low.parity["min_cosine"] > 0.9
    assert low.describe()["precision"] == "bf16" and ref.describe()["parity"] is None
    obs = obs_np(p)
    a, b = ref.predict(obs, seed=1), low.predict(obs, seed=1)
    assert b.dtype == np.float32 and a.shape == b.shape
    assert np.abs(a - b).max() < 0.5  # unnormalised units (actions span [-2, 2] here)


def test_parity_gate_refuses_a_tolerance_it_cannot_meet():
    with pytest.raises(PrecisionError, match=r"bf16 denoiser disagrees with fp32 by .* on the median of 8 probe .* tolerance 1e-09"):
        TorchBackend(tiny_policy(), "ddim", 8, precision="bf16", precision_tolerance=1e-9)
    with pytest.raises(PrecisionError, match="expected one of fp32, bf16, fp16"):
        TorchBackend(tiny_policy(), precision="int8")


def test_graphs_and_fused_norm_say_why_they_are_off():
    p = tiny_policy()
    assert TorchBackend(p).describe()["cuda_graphs_off_because"] == "CUDA graphs need a CUDA device"
    assert TorchBackend(p, graphs=False).describe()["cuda_graphs_off_because"] == "turned off"
    assert TorchBackend(p).describe()["fused_norm_off_because"] == "turned off"
    asked = TorchBackend(p, fused_norm=True).describe()
    assert not asked["fused_norm"] and asked["fused_norm_off_because"] == "the fused add+norm kernel needs a CUDA device"


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,steps", [("ddpm", 20), ("ddim", 8), ("flow", 6)])
def test_cuda_graph_chunks_equal_eager_chunks(kind, steps):
    p = tiny_policy(n_layers=2, width=64, objective="flow" if kind == "flow" else "epsilon")
    n = len(p.denoiser.blocks)
    for plan in (None, uniform_plan(steps, n, 3)):
        eager = TorchBackend(p, kind, steps, plan, device="cuda", graphs=False)
        graph = TorchBackend(p, kind, steps, plan, device="cuda", fused_update=False, fused_norm=False)
        fused = TorchBackend(p, kind, steps, plan, device="cuda", fused_update=True, fused_norm=False)
        normed = TorchBackend(p, kind, steps, plan, device="cuda")  # the default: both fused
        normed_eager = TorchBackend(p, kind, steps, plan, device="cuda", graphs=False, fused_norm=True)
        assert graph.describe()["cuda_graphs"] and normed.describe()["fused_norm"], normed.describe()
        assert normed.describe()["fused_update"] and not normed_eager.describe()["cuda_graphs"]
        for batch in (1, 3):
            obs = obs_np(p, batch)
            for seed in (0, 1):  # replays with new inputs, not the captured ones
                want = eager.predict(obs, seed)
                np.testing.assert_allclose(graph.predict(obs, seed), want, atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(fused.predict(obs, seed), want, atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(normed.predict(obs, seed), want, atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(normed_eager.predict(obs, seed), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_threshold_plans_run_eager_on_cuda_with_the_reason():
    p = tiny_policy()
    b = TorchBackend(p, "ddim", 8, threshold_plan(8, len(p.denoiser.blocks), 0.2), device="cuda")
    assert "at run time" in b.describe()["cuda_graphs_off_because"]
    assert b.predict(obs_np(p), seed=0).shape == (2, p.cfg.n_action_steps, p.action_dim)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_fused_sampler_update_gives_the_same_actions():
    p = tiny_policy()
    obs = obs_np(p)
    for kind in ("ddpm", "ddim"):
        plain = TorchBackend(p, kind, 6).predict(obs, seed=1)
        np.testing.assert_allclose(TorchBackend(p, kind, 6, fused_update=True).predict(obs, seed=1), plain,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_robot_sessions_and_self_verification_replay_graphs_from_features():
    p = tiny_policy(n_layers=2, width=64, n_obs_steps=3, horizon=10, obs_stride=2, n_action_steps=4)
    eager = TorchBackend(p, "ddim", 6, device="cuda", graphs=False, candidates=4, min_verified=1)
    graph = TorchBackend(p, "ddim", 6, device="cuda", candidates=4, min_verified=1)
    obs = obs_np(p, 1)
    steps = [0, 2, 4]
    past = np.zeros((2, p.action_dim), np.float32)
    for seed in (0, 1):
        np.testing.assert_allclose(graph.session().predict(obs, steps, seed), eager.session().predict(obs, steps, seed),
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(graph.predict(obs, seed, past_actions=past),
                                   eager.predict(obs, seed, past_actions=past), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["dp-t", "vla"])
def test_real_time_chunks_replay_as_one_graph_equal_to_eager(family):
    """RTC's chunk (a forward pass and a vector-Jacobian product per flow step) is captured whole on
    a GPU; replays with new committed actions, delays and noise give what eager computes."""
    from helpers import tiny_vla, vla_observations

    from polcache.cache.resolve import resolve_plan
    from polcache.policy.spec import CommittedActions

    policy = tiny_vla(width=64) if family == "vla" else tiny_policy(objective="flow", n_layers=2, width=64)
    obs = ({k: v.numpy() for k, v in vla_observations(policy, ["push"]).items()} if family == "vla"
           else obs_np(policy, 1))
    rng = np.random.default_rng(0)
    device = "cpu" if NO_CUDA else "cuda"
    for cache in (None, "uniform:2"):
        plan = None if cache is None else resolve_plan(cache, policy, policy.sampler("flow", 8))
        eager = TorchBackend(policy, "flow", 8, plan, device=device, graphs=False)
        graph = TorchBackend(policy, "flow", 8, plan, device=device)
        graph.warmup(rtc=True)
        what = graph.describe()
        if NO_CUDA:
            assert not what["rtc_cuda_graph"] and what["rtc_cuda_graph_off_because"] == "CUDA graphs need a CUDA device"
        else:
            assert what["rtc_cuda_graph"], what["rtc_cuda_graph_off_because"]
        for seed, (n, delay) in enumerate(((5, 2), (3, 1), (8, 4))):
            committed = CommittedActions(rng.uniform(-1, 1, (n, policy.action_dim)).astype(np.float32), delay)
            np.testing.assert_allclose(graph.predict(obs, seed, committed=committed),
                                       eager.predict(obs, seed, committed=committed), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_compiled_update_serves_every_batch_size_a_server_warms_up():
    """A server captures batch sizes 1..max_batch (default 8) and an RTC chunk: the compiled update
    must not run out of dynamo's recompiles (it then falls back to the plain update)."""
    from polcache.policy.spec import CommittedActions

    p = tiny_policy(objective="flow", n_layers=2, width=64)
    b = TorchBackend(p, "flow", 6, device="cuda")
    b.warmup(tuple(range(1, 10)), rtc=True)
    assert b.describe()["fused_update"] and b.describe()["rtc_cuda_graph"], b.describe()
    obs = obs_np(p, 1)
    committed = CommittedActions(np.zeros((4, p.action_dim), np.float32), 1)
    eager = TorchBackend(p, "flow", 6, device="cuda", graphs=False)
    np.testing.assert_allclose(b.predict(obs, 2, committed=committed), eager.predict(obs, 2, committed=committed),
                               atol=1e-4, rtol=1e-4)


def test_threshold_cache_reports_the_block_evaluations_it_measured():
    """A threshold cache decides per chunk, so its cost is measured, not read from the plan: the
    mean lies between the evaluations always done and all of them, and a threshold of 0
    computes everything."""
    p = tiny_policy()
    n, obs = len(p.denoiser.blocks), obs_np(p, 1)
    for threshold, expect_all in ((0.0, True), (0.5, False)):
        b = TorchBackend(p, "ddim", 8, threshold_plan(8, n, threshold))
        assert b.describe()["cache"]["block_evals_mean"] is None  # nothing computed yet
        for seed in range(3):
            b.predict(obs, seed=seed)
        cache = b.describe()["cache"]
        assert cache["block_evals_min"] <= cache["block_evals_mean"] <= 8 * n
        assert cache["ops"][cache["plan"][0][0]] in ("compute", "gate")  # the plan's codes named beside it
        assert (cache["block_evals_mean"] == 8 * n) == expect_all
