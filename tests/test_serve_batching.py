"""Several robots' chunks from one inference: batched rows equal what each robot gets alone,
sessions stay apart, a failing row fails alone, and the server stays fair with a batch cap."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fakes import BatchingFakeBackend, FakeBackend, RawPeer, observation, wait_for
from helpers import tiny_policy
from polcache.errors import PolcacheError
from polcache.policy.backend import TorchBackend
from polcache.policy.batching import SessionRequest, batching_blocker, session_predictor
from polcache.serve.server import PolicyServer
from polcache_client.protocol import ActionChunk, Error


def _window(states: np.ndarray, t: int, offsets) -> tuple[dict[str, np.ndarray], list[int]]:
    picks = [max(0, t + off) for off in offsets]
    return {"state": states[picks][None]}, picks


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # ddpm: noise at every step, drawn per row too
def test_batched_rows_equal_each_robot_alone_chunk_after_chunk(sampler):
    """Three long-context robots with different observations: every chunk of the batched path
    equals the one its robot's own session computes alone with the same seed, and each ring
    buffer encodes only its own frames."""
    p = tiny_policy(n_obs_steps=3, horizon=8, obs_stride=2, n_action_steps=4)
    b = TorchBackend(p, sampler, 6)
    states = [np.random.default_rng(r).normal(size=(8, 5)).astype(np.float32) for r in range(3)]
    batched, alone = [b.session() for _ in states], [b.session() for _ in states]
    for t in range(0, 8, 2):
        windows = [_window(s, t, p.spec.frame_offsets) for s in states]
        seeds = [100 * t + r for r in range(3)]
        got = b.predict_sessions([SessionRequest(sess, obs, steps, seed)
                                  for sess, (obs, steps), seed in zip(batched, windows, seeds)])
        for r, ((obs, steps), seed) in enumerate(zip(windows, seeds)):
            want = alone[r].predict(obs, steps, seed=seed)
            assert got[r].shape == want.shape == (1, 4, 3)
            np.testing.assert_allclose(got[r], want, atol=1e-5)
    assert [s.ring.encoded for s in batched] == [s.ring.encoded for s in alone]
    assert not np.allclose(got[0], got[1])  # the rows really differ: nothing leaked between robots


def test_vla_sessions_with_different_instructions_share_the_call():
    """The VLA family's encoder is not per frame, so its robots get stateless sessions; their rows
    are batched as well, each following its own instruction and equal to its robot alone."""
    from helpers import tiny_vla, vla_observations
    from polcache.policy.session import TorchSession

    b = TorchBackend(tiny_vla(), "flow", 4)
    batch = vla_observations(b.policy, ["reach red", "open drawer", "press button"])
    obs = [{k: v[r:r + 1].numpy() for k, v in batch.items()} for r in range(3)]
    sessions = [b.session() for _ in obs]
    assert not any(isinstance(s, TorchSession) for s in sessions)
    got = b.predict_sessions([SessionRequest(s, o, [0, 1], r) for r, (s, o) in enumerate(zip(sessions, obs))])
    for r, o in enumerate(obs):
        np.testing.assert_allclose(got[r], b.session().predict(o, [0, 1], seed=r), atol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_a_failing_row_fails_alone():
    b = TorchBackend(tiny_policy(), "ddim", 4)
    obs = {"state": np.ones((1, 2, 5), np.float32)}
    requests = [SessionRequest(b.session(), obs, [0, 1], 1), SessionRequest(b.session(), obs, [0, 1, 2], 2),
                SessionRequest(b.session(), {"state": np.ones((1, 2, 5), np.float32)}, [0, 1], 3)]
    got = b.predict_sessions(requests)
    assert isinstance(got[1], ValueError) and "one control step per frame (2), got 3" in str(got[1])
    np.testing.assert_allclose(got[0], b.session().predict(obs, [0, 1], seed=1), atol=1e-5)
    np.testing.assert_allclose(got[2], b.session().predict(obs, [0, 1], seed=3), atol=1e-5)


def test_self_verifying_rows_run_alone_with_the_same_result():
    p = tiny_policy(n_obs_steps=3, horizon=8, obs_stride=2, n_action_steps=4)
    b = TorchBackend(p, "ddim", 4, candidates=4)
    obs = {"state": np.random.default_rng(0).normal(size=(1, 3, 5)).astype(np.float32)}
    past = np.zeros((2, 3), np.float32)
    got = b.predict_sessions([SessionRequest(b.session(), obs, [0, 2, 4], 7, past),
                              SessionRequest(b.session(), obs, [0, 2, 4], 8)])
    np.testing.assert_array_equal(got[0], b.session().predict(obs, [0, 2, 4], seed=7, past_actions=past))
    np.testing.assert_allclose(got[1], b.session().predict(obs, [0, 2, 4], seed=8), atol=1e-5)


def test_absurd_observations_are_refused_and_fail_only_their_row():
    """State of 1e20 (wrong units) made the shipped DP-T return NaN actions, and 1e3 saturated ones,
    without a word; it is refused by name before inference, and in a batch only that robot's row
    fails. A state beyond the training range but within the limit is still answered."""
    from polcache.errors import ObservationError
    from polcache.policy import load_backend

    b = load_backend(str(Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"))
    huge, ok = {"state": np.full((1, 2, 39), 1e20, np.float32)}, {"state": np.zeros((1, 2, 39), np.float32)}
    for value in (1e20, 1e3, 150.0):
        with pytest.raises(ObservationError, match=r"observation 'state'\[0\] is .*: the policy was trained on "
                                                   r"-0.09682 to 0.09429 there .* a sensor fault or a unit mistake"):
            b.predict({"state": np.full((1, 2, 39), value, np.float32)}, seed=0)
    assert np.isfinite(b.predict({"state": np.full((1, 2, 39), 0.5, np.float32)}, seed=0)).all()  # 5x its range
    got = b.predict_sessions([SessionRequest(b.session(), huge, [0, 1], 1), SessionRequest(b.session(), ok, [0, 1], 2)])
    assert isinstance(got[0], ObservationError) and np.isfinite(got[1]).all()
    np.testing.assert_allclose(got[1], b.session().predict(ok, [0, 1], seed=2), atol=1e-5)


def test_a_row_with_malformed_past_actions_fails_alone():
    p = tiny_policy(n_obs_steps=3, horizon=8, obs_stride=2, n_action_steps=4)
    b = TorchBackend(p, "ddim", 4, candidates=4)
    obs = {"state": np.zeros((1, 3, 5), np.float32)}
    got = b.predict_sessions([SessionRequest(b.session(), obs, [0, 2, 4], 7, np.zeros((5, 3), np.float32)),
                              SessionRequest(b.session(), obs, [0, 2, 4], 8)])
    assert "past_actions: expected shape (2, 3)" in str(got[0])
    np.testing.assert_allclose(got[1], b.session().predict(obs, [0, 2, 4], seed=8), atol=1e-5)


def test_backends_that_cannot_batch_say_why_and_are_called_once_per_robot():
    from polcache.cache.baselines import threshold_plan

    p = tiny_policy()
    gated = TorchBackend(p, "ddim", 4, plan=threshold_plan(4, len(p.denoiser.blocks), 0.1))
    assert "threshold cache" in batching_blocker(gated) and gated.describe()["batched_sessions"] is False
    assert batching_blocker(TorchBackend(p, "ddim", 4)) is None
    fake = FakeBackend()
    assert "one robot per call" in batching_blocker(fake)
    obs = {"state": np.zeros((1, 2, 3), np.float32)}
    session_predictor(fake)([SessionRequest(fake.session(), obs, [0, 1]) for _ in range(3)])
    assert len(fake.calls) == 3
    with PolicyServer(fake, "tcp://127.0.0.1:0", max_batch=4) as server:
        assert server.max_batch == 1
    with pytest.raises(PolcacheError, match="max_batch must be >= 1"):
        PolicyServer(fake, "tcp://127.0.0.1:0", max_batch=0)
    with PolicyServer(BatchingFakeBackend(), "tcp://127.0.0.1:0", max_batch=8, max_sessions=3) as server:
        assert server.max_batch == 3  # a batch holds at most the robots served at once


def _robots(server: PolicyServer, n: int) -> list[RawPeer]:
    peers = [RawPeer(server.endpoint) for _ in range(n)]
    for i, peer in enumerate(peers):
        peer.handshake(name=f"arm{i}")
    return peers


def test_waiting_robots_share_one_inference_and_each_gets_its_own_chunk():
    backend = BatchingFakeBackend(delay_s=0.4)
    records = []
    with PolicyServer(backend, "tcp://127.0.0.1:0", on_record=records.append) as server:
        peers = _robots(server, 4)
        peers[0].send(observation(0, value=1000.0))  # occupies the worker while the others arrive
        assert wait_for(lambda: backend.batches, 2)
        for i, peer in enumerate(peers[1:], start=1):
            peer.send(observation(0, value=100.0 * i))
            time.sleep(0.02)  # separate sockets: space the sends so they reach the server in this order
        assert peers[0].recv().actions[0, 0] == 1000.0
        for i, peer in enumerate(peers[1:], start=1):
            chunk = peer.recv()
            assert isinstance(chunk, ActionChunk) and chunk.actions[0, 0] == 100.0 * i  # its own row
            assert chunk.timing["inference"] >= 400.0  # the shared call's time, truthfully
        assert wait_for(lambda: len(records) == 4, 2)
        for peer in peers:
            peer.close()
    assert backend.batches == [[1000.0], [100.0, 200.0, 300.0]]
    assert sorted(r.batch_size for r in records) == [1, 3, 3, 3]


def test_a_failing_row_is_its_robots_error_and_the_others_get_their_chunks():
    backend = BatchingFakeBackend(delay_s=0.4, fail_on=200.0)
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        peers = _robots(server, 4)
        peers[0].send(observation(0, value=1000.0))
        assert wait_for(lambda: backend.batches, 2)
        for i, peer in enumerate(peers[1:], start=1):
            peer.send(observation(5, value=100.0 * i))
        peers[0].recv()
        replies = [peer.recv() for peer in peers[1:]]
        assert isinstance(replies[1], Error) and replies[1].code == "inference" and replies[1].seq == 5
        assert "bad row 200" in replies[1].message
        assert replies[0].actions[0, 0] == 100.0 and replies[2].actions[0, 0] == 300.0
        assert isinstance(peers[2].request(observation(6, value=7.0)), ActionChunk)  # it is still served
        for peer in peers:
            peer.close()


class _ShortBackend(BatchingFakeBackend):
    """A backend written elsewhere whose batched path drops a row's result."""

    def predict_sessions(self, requests) -> list:
        return super().predict_sessions(requests)[:-1]


def test_a_backend_that_returns_too_few_results_is_named_to_the_robot():
    with PolicyServer(_ShortBackend(), "tcp://127.0.0.1:0") as server:
        peer = _robots(server, 1)[0]
        reply = peer.request(observation(3, value=1.0))
        assert isinstance(reply, Error) and reply.code == "inference" and reply.seq == 3
        assert "returned 0 results for a batch of 1" in reply.message, reply.message
        peer.close()


def test_with_a_batch_cap_no_robot_is_served_twice_in_a_row_while_another_waits():
    """Five robots always waiting, two per inference: a full batch never holds a robot of the batch
    before it (those left out go first), and all are served alike."""
    backend = BatchingFakeBackend(delay_s=0.01)
    with PolicyServer(backend, "tcp://127.0.0.1:0", max_batch=2) as server:
        peers = _robots(server, 5)
        for tick in range(1, 41):
            for i, peer in enumerate(peers):  # same order every tick
                peer.send(observation(tick, value=float(i)))
            wait_for(lambda: len(backend.batches) >= tick, 1)
        for peer in peers:
            peer.close()
    batches = [set(b) for b in backend.batches[1:]]  # the first ran before all five had arrived
    assert all(len(b) <= 2 for b in batches)
    for before, after in zip(batches, batches[1:]):
        waiting = set(range(5)) - before
        assert len(after) < 2 or after <= waiting, (before, after)
    served = [sum(i in b for b in batches) for i in range(5)]
    assert max(served) - min(served) <= 2, served


@pytest.mark.parametrize("kind", ["torch", "ort"])
def test_a_real_backend_serves_a_batch_over_the_wire(kind, tmp_path):
    """The real path: worker -> predict_sessions -> TorchBackend, or OrtBackend on an exported
    artifact; rounds in which three robots send at once until one inference has served several."""
    policy = tiny_policy(obs_dim=3, action_dim=2)
    if kind == "ort":
        pytest.importorskip("onnxruntime")
        from polcache.export.exporter import export_policy
        from polcache.export.ort_backend import OrtBackend

        export_policy(policy, tmp_path / "art", sampler="ddim", steps=4)
        backend = OrtBackend(tmp_path / "art")
    else:
        backend = TorchBackend(policy, "ddim", 4)
    records = []
    with PolicyServer(backend, "tcp://127.0.0.1:0", on_record=records.append) as server:
        peers = _robots(server, 3)
        for seq in range(20):
            for i, peer in enumerate(peers):
                peer.send(observation(seq, value=float(i)))
            for peer in peers:
                chunk = peer.recv()
                assert isinstance(chunk, ActionChunk) and chunk.actions.shape == (8, 2)
                assert np.isfinite(chunk.actions).all()
            if wait_for(lambda: len(records) == 3 * (seq + 1), 2) and max(r.batch_size for r in records) > 1:
                break
        for peer in peers:
            peer.close()
    assert max(r.batch_size for r in records) > 1
