"""Real-time chunking: the committed actions pull the new chunk's overlap toward them, exactly where
the soft mask says, for both families, cached or not; the evaluator simulates inference delay."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import tiny_policy, tiny_vla, vla_observations
from polcache.policy.backend import TorchBackend
from polcache.policy.rtc import guidance_weight, overlap_weights
from polcache.policy.spec import CommittedActions


def test_soft_mask_freezes_the_delay_then_decays_to_zero():
    w = overlap_weights(6, 2)
    assert w.tolist()[:2] == [1.0, 1.0] and np.all(np.diff(w[2:]) < 0) and 0 < w[-1] < w[2] < 1
    assert overlap_weights(3, 5).tolist() == [1.0, 1.0, 1.0] and len(overlap_weights(0, 2)) == 0
    assert guidance_weight(1.0, 5.0) == 5.0 and guidance_weight(0.0, 5.0) == 0.0
    assert guidance_weight(0.5, 5.0) == pytest.approx(2.0)  # t / ((1 - t) r^2), r^2 = 1/2


@pytest.mark.parametrize("family,cache", [("vla", None), ("vla", "uniform:2"), ("dp-t", None)])
def test_committed_actions_pull_the_overlap_and_leave_the_rest_free(family, cache):
    from polcache.cache.resolve import resolve_plan

    policy = tiny_vla() if family == "vla" else tiny_policy(objective="flow")
    sampler = policy.sampler("flow", 8)
    plan = None if cache is None else resolve_plan(cache, policy, sampler)
    backend = TorchBackend(policy, "flow", 8, plan=plan)
    obs = ({k: v.numpy() for k, v in vla_observations(policy, ["push"]).items()} if family == "vla"
           else {"state": np.random.default_rng(0).normal(size=(1, 2, 5)).astype(np.float32)})
    free = backend.predict(obs, seed=3)[0]
    target = np.full((5, policy.action_dim), 1.5, np.float32)  # far from what the policy would do
    guided = backend.predict(obs, seed=3, committed=CommittedActions(target, delay=2))[0]
    err_free, err_guided = np.abs(free[:2] - 1.5).mean(), np.abs(guided[:2] - 1.5).mean()
    assert err_guided < 0.25 * err_free  # the frozen actions follow the committed ones
    assert np.abs(guided[:5] - 1.5).mean() < np.abs(free[:5] - 1.5).mean()
    none = backend.predict(obs, seed=3, committed=CommittedActions(np.zeros((0, policy.action_dim), np.float32), 0))
    np.testing.assert_allclose(none[0], free, atol=1e-5)  # nothing committed: an unguided chunk


def test_rtc_needs_a_flow_sampler_and_one_history():
    policy = tiny_policy()
    backend = TorchBackend(policy, "ddim", 8)
    obs = {"state": np.zeros((1, 2, 5), np.float32)}
    with pytest.raises(ValueError, match="guides flow samplers"):
        backend.predict(obs, committed=CommittedActions(np.zeros((3, 3), np.float32), 1))
    flow = TorchBackend(tiny_policy(objective="flow"), "flow", 4)
    with pytest.raises(ValueError, match=r"committed actions of shape \(n, 3\)"):
        flow.predict(obs, committed=CommittedActions(np.zeros((3, 2), np.float32), 1))


def test_server_guides_each_robots_next_chunk_with_its_last_one():
    from polcache.errors import PolcacheError
    from polcache.serve.server import PolicyServer

    with pytest.raises(PolcacheError, match="needs the torch backend and a flow sampler, this is torch with ddim"):
        PolicyServer(TorchBackend(tiny_policy(), "ddim", 4), "tcp://127.0.0.1:0", rtc=True)
    backend = TorchBackend(tiny_policy(objective="flow", obs_dim=3, action_dim=2), "flow", 4)
    seen = []
    predict_features = backend.predict_features

    def spy(feats, seed=None, past_actions=None, committed=None):
        seen.append(committed)
        return predict_features(feats, seed, past_actions, committed)

    backend.predict_features = spy
    from fakes import RawPeer
    from polcache_client import protocol as P

    with PolicyServer(backend, "tcp://127.0.0.1:0", rtc=True, max_batch=1) as server:
        peer = RawPeer(server.endpoint)
        assert isinstance(peer.request(P.encode(P.Handshake(obs_spec={"state": ((3,), "float32")}, action_dim=2,
                                                            hz=50.0, name="arm"))), P.Welcome)
        chunks = []
        for seq in range(3):
            chunks.append(peer.request(P.encode(P.Observation(epoch=0, seq=seq, t_capture=1.0 + seq / 50,
                                                              arrays={"state": np.zeros(3, np.float32)}))))
        peer.close()
    # the first chunk is unguided (the batched path); each later one is guided by the previous chunk's
    # actions from its own observation's tick on
    assert len(seen) == 2 and all(c is not None and c.delay >= 1 for c in seen)
    np.testing.assert_allclose(seen[0].actions, chunks[0].actions[1:])
    np.testing.assert_allclose(seen[1].actions, chunks[1].actions[1:])


def test_evaluator_refuses_rtc_before_rolling_out_where_the_backend_cannot():
    from polcache.errors import PolcacheError
    from polcache.sim.evaluate import Rollout, evaluate

    with pytest.raises(PolcacheError, match="--rtc: real-time chunking needs the torch backend and a flow sampler, "
                                            "this is torch with ddim"):
        evaluate(TorchBackend(tiny_policy(), "ddim", 4), "no-such-task", 1, rollout=Rollout(rtc=True))


def test_rtc_with_self_verification_is_refused_where_the_guided_chunk_would_skip_it():
    """The guided chunk took precedence: `--rtc --verify N` verified no chunk, and the result recorded N."""
    from polcache.errors import PolcacheError
    from polcache.sim.evaluate import Rollout, evaluate

    policy = tiny_policy(objective="flow", n_obs_steps=3, horizon=8)  # past tokens (PTP) and a flow sampler
    with pytest.raises(PolcacheError, match=r"--rtc: .*self-verification \(--verify 4\) picks one of several "
                                            "candidates: they do not combine"):
        evaluate(TorchBackend(policy, "flow", 4, candidates=4), "no-such-task", 1, rollout=Rollout(rtc=True))


def test_evaluator_commits_the_chunk_still_in_flight():
    """With a delay as long as the chunks executed, the chunk planned last has not arrived when the
    next is planned; it is still what the robot executes next, so it is what RTC holds to."""
    from fakes import fake_spec

    from polcache.policy.spec import StatelessSession
    from polcache.sim.evaluate import Rollout, run_episode
    from test_eval_rollout import CountingEnv

    class Recorder:
        spec = fake_spec(n_action_steps=8)

        def __init__(self):
            self.committed = []

        def predict(self, obs, seed=None, past_actions=None, committed=None):
            self.committed.append(committed)
            return np.full((1, 8, 2), float(len(self.committed)), np.float32)

        def session(self):
            return StatelessSession(self)

    backend = Recorder()
    run_episode(CountingEnv(), backend, 0, [], rollout=Rollout(max_steps=12, action_steps=4, delay=4, rtc=True))
    assert backend.committed[0] is None
    # chunk 2 (planned at step 4) is held to chunk 1's actions for steps 4-7; chunk 3 (planned at step 8,
    # before chunk 2 is delivered there) to chunk 2's, which are what runs from step 8
    assert backend.committed[1].actions[:, 0].tolist() == [1.0] * 4 and backend.committed[1].delay == 4
    assert backend.committed[2].actions[:, 0].tolist() == [2.0] * 4


def test_a_backend_says_itself_whether_it_chunks_in_real_time():
    """The server and evaluator read the backend's own `rtc_blocker` (they parsed describe()'s backend
    and sampler names); a backend without one is taken as one that cannot."""
    from fakes import FakeBackend

    from polcache.errors import PolcacheError
    from polcache.policy.spec import chunking_blocker
    from polcache.serve.server import PolicyServer

    assert chunking_blocker(TorchBackend(tiny_policy(objective="flow"), "flow", 4)) is None
    with pytest.raises(PolcacheError, match="real-time chunking needs the torch backend and a flow sampler, this is "
                                            "FakeBackend"):
        PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", rtc=True)
