"""Policy server on loopback: end to end with the robot loop, history, latest-observation
semantics, heartbeats while busy, resets."""

from __future__ import annotations

import logging
import re
import threading
import time

import msgpack
import msgspec
import numpy as np
import pytest

from fakes import FakeBackend, RawPeer, StepRobot, fake_spec, observation, wait_for
from polcache.errors import PolcacheError
from polcache.policy.spec import frame_offsets
from polcache.serve.history import ObservationHistory
from polcache.serve import server as server_module
from polcache.serve.server import INLINE_WINDOW, PolicyServer
from polcache_client import ConnectError, ControlLoop, PolicyClient
from polcache_client.protocol import (PROTOCOL_VERSION, ActionChunk, Handshake, Heartbeat, Observation, Reset, Welcome,
                                      decode_versioned, encode)


@pytest.fixture
def records():
    return []


def serve(backend, records=None, **kw) -> PolicyServer:
    return PolicyServer(backend, "tcp://127.0.0.1:0", on_record=None if records is None else records.append, **kw)


def test_history_pads_the_first_observation_and_fills_gaps():
    h = ObservationHistory(3)
    h.push(0, {"x": np.array([0])})
    seqs, stacked = h.window()
    assert seqs == [0, 0, 0] and stacked["x"].shape == (1, 3, 1)
    h.push(1, {"x": np.array([1])})
    assert h.window()[0] == [0, 0, 1]
    h.push(4, {"x": np.array([4])})  # 2 and 3 were never received
    seqs, stacked = h.window()
    assert seqs == [1, 1, 4] and stacked["x"][0, :, 0].tolist() == [1, 1, 4]
    assert not h.push(3, {"x": np.array([3])})  # reordered: ignored
    h.clear()
    h.push(0, {"x": np.array([9])})
    assert h.window()[0] == [0, 0, 0]


@pytest.mark.parametrize("K,s,mode", [(2, 1, "strided"), (4, 3, "strided"), (5, 2, "mixed")])
def test_history_window_takes_the_newest_step_at_or_before_each_frame(K, s, mode):
    """Runs with and without gaps (the window's shortcut for gap-free runs and its general rule
    agree): per frame, the newest step held at or before it, the oldest held where none is."""
    rng = np.random.default_rng(K)
    h, held, seq = ObservationHistory(K, s, mode), [], 0
    for _ in range(200):
        seq += int(rng.choice([1, 1, 1, 2, 5]))
        h.push(seq, {"x": np.array([seq])})
        held = (held + [seq])[-(1 - frame_offsets(K, s, mode)[0]):]
        expected = [max([t for t in held if t <= seq + off], default=held[0]) for off in frame_offsets(K, s, mode)]
        seqs, stacked = h.window()
        assert seqs == expected and stacked["x"][0, :, 0].tolist() == expected


def test_end_to_end_loop_executes_every_action_on_time(records):
    backend = FakeBackend()
    robot = StepRobot(50)
    ticks, chunks = [], []
    with serve(backend, records) as server, PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=50) as client:
        spec = client.connect(timeout_s=5)
        assert spec["n_action_steps"] == 8 and spec["n_obs_steps"] == 2
        loop = ControlLoop(robot, client, 50, on_tick=ticks.append, on_chunk=chunks.append)
        loop.run(ticks=40)
    # Each action is the one due in its period: exactly the period's index on a quiet machine; an
    # observation read late under load shifts the chunk's due times by that fraction of a period, and
    # the schedule interpolates (5.28 in period 5). A stale or shifted chunk is a whole period off.
    assert robot.applied and all(abs(value - tick) < 0.5 for tick, value in robot.applied)
    assert robot.applied[-1][0] == 39 and robot.stops == [39]  # the one stop: run()'s, at its end
    first = backend.first_obs["state"]
    assert first[0, 0, 0] == first[0, 1, 0] == 0  # the first window is padded, never half-filled
    assert all(c.stale_chunks == 0 for c in chunks) and len(chunks) >= 30
    request = records[0]
    assert request.kind == "request" and request.robot == "robot"
    for stage in ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "encode_ms"):
        assert getattr(request, stage) >= 0
    assert request.total_ms < 100


def test_chunk_carries_due_times_history_and_stage_timing():
    with serve(FakeBackend()) as server:
        peer = RawPeer(server.endpoint)
        assert isinstance(peer.handshake(), Welcome)
        peer.send(observation(0, t_capture=10.0))
        chunk = peer.recv()
        assert isinstance(chunk, ActionChunk) and chunk.seq == 0 and chunk.obs_seqs == [0, 0]
        np.testing.assert_allclose(chunk.t_actions, 10.0 + np.arange(8) / 50.0)
        assert chunk.actions.shape == (8, 2)
        assert set(chunk.timing) == {"decode", "preprocess", "queue", "inference", "postprocess", "encode"}
        peer.close()


class ThreadRecordingBackend(FakeBackend):
    """Remembers which thread ran each inference."""

    def __init__(self):
        super().__init__()
        self.threads: list[str] = []

    def predict(self, obs, seed=None, past_actions=None):
        self.threads.append(threading.current_thread().name)
        return super().predict(obs, seed, past_actions)


def _answer(peer: RawPeer, seqs: range) -> None:
    for seq in seqs:
        peer.send(observation(seq))
        assert isinstance(peer.recv(timeout_s=5), ActionChunk)


def test_fast_inference_runs_on_the_server_thread_and_a_slow_one_goes_back_to_the_worker():
    backend = ThreadRecordingBackend()
    with serve(backend, inline_ms=50.0) as server:  # 50 ms: a fake inference stays under it on a loaded CI machine
        peer = RawPeer(server.endpoint)
        peer.handshake()
        _answer(peer, range(INLINE_WINDOW + 3))
        # the first INLINE_WINDOW inferences are measured on the worker, then the server thread runs them
        assert backend.threads == ["polcache-inference"] * INLINE_WINDOW + ["polcache-server"] * 3
        backend.delay_s = 0.1  # the policy turns slow: one inference inline, then the worker again
        _answer(peer, range(INLINE_WINDOW + 3, INLINE_WINDOW + 6))
        assert backend.threads[-3:] == ["polcache-server", "polcache-inference", "polcache-inference"]
        peer.close()


def test_a_loop_held_up_on_its_own_thread_is_said_to_have_stood_still(caplog):
    """The server's loop held up past a turn's allowance (inline_ms and 150 ms) where it does not wait
    for messages (here an inference on its own thread; a SIGSTOP or a starved CPU there alike) was not
    seen: only a wait past its timeout was, so a stall during an inline inference went unsaid."""
    backend = ThreadRecordingBackend()
    with caplog.at_level(logging.WARNING, logger="polcache.serve"), serve(backend, inline_ms=50.0) as server:
        peer = RawPeer(server.endpoint)
        peer.handshake()
        _answer(peer, range(INLINE_WINDOW + 1))
        assert backend.threads[-1] == "polcache-server" and "stood still" not in caplog.text
        backend.delay_s = 0.4
        _answer(peer, range(INLINE_WINDOW + 1, INLINE_WINDOW + 3))
        assert backend.threads[-2] == "polcache-server"  # held up there: then the worker
        peer.close()
    assert re.search(r"the server stood still for about 0\.[34]\d s", caplog.text), caplog.text


def test_inline_ms_zero_keeps_every_inference_on_the_worker():
    backend = ThreadRecordingBackend()
    with serve(backend, inline_ms=0.0) as server:
        peer = RawPeer(server.endpoint)
        peer.handshake()
        _answer(peer, range(INLINE_WINDOW + 3))
        assert set(backend.threads) == {"polcache-inference"}
        peer.close()
    with pytest.raises(PolcacheError, match=r"inline_ms must be in \[0, 100\] ms"):
        serve(FakeBackend(), inline_ms=-1.0)


def test_simulated_latency_is_added_to_every_inference():
    """`serve --simulate-latency-ms`: a fast machine made to behave like a slow one."""
    with serve(FakeBackend(), simulated_latency_ms=80.0) as server:
        peer = RawPeer(server.endpoint)
        peer.handshake()
        for seq in range(2):
            t0 = time.monotonic()
            peer.send(observation(seq))
            chunk = peer.recv(timeout_s=2)
            assert chunk.timing["inference"] >= 80.0 and time.monotonic() - t0 >= 0.08
        peer.close()
    for bad in (-1.0, 1e12):  # 1e12: the server took 20 s to stop with a robot connected
        with pytest.raises(PolcacheError, match=r"simulated_latency_ms must be in \[0, 10000\] ms"):
            serve(FakeBackend(), simulated_latency_ms=bad)


def test_busy_server_answers_heartbeats_and_only_the_latest_observation(records):
    backend = FakeBackend(delay_s=0.3)
    with serve(backend, records) as server:
        peer = RawPeer(server.endpoint)
        peer.handshake()
        peer.send(observation(0))
        time.sleep(0.05)  # seq 0 is now being computed
        t0 = time.monotonic()
        assert peer.request(encode(Heartbeat(t=1.5)), timeout_s=0.2) == Heartbeat(t=1.5)
        assert time.monotonic() - t0 < 0.2  # answered while inference runs
        for seq in range(1, 10):
            peer.send(observation(seq))
        answered = [peer.recv(timeout_s=2).seq, peer.recv(timeout_s=2).seq]
        assert answered == [0, 9]  # 1-8 were superseded, never computed
        assert backend.calls[-1]["state"][0, :, 0].tolist() == [8, 9]  # but they did extend the history
        assert wait_for(lambda: len(records) == 2) and records[1].superseded == 8
        peer.close()


def test_reset_clears_history_and_drops_the_stale_chunk():
    backend = FakeBackend(delay_s=0.2)
    with serve(backend) as server:
        peer = RawPeer(server.endpoint)
        peer.handshake()
        peer.send(observation(0, value=5.0))
        time.sleep(0.05)
        assert peer.request(encode(Reset(epoch=1))) == Reset(epoch=1)
        peer.send(observation(0, epoch=1, value=7.0))
        chunk = peer.recv()
        assert chunk.epoch == 1  # the epoch-0 chunk computed meanwhile was never sent
        assert backend.calls[-1]["state"][0, :, 0].tolist() == [7, 7]  # fresh, padded history
        assert backend.resets == 2  # first epoch, then the reset
        peer.close()


def test_multiple_robots_are_served_independently():
    with serve(FakeBackend()) as server:
        peers = [RawPeer(server.endpoint) for _ in range(3)]
        for i, peer in enumerate(peers):
            peer.handshake(name=f"r{i}")
            peer.send(observation(0, value=100.0 * i))
        for i, peer in enumerate(peers):
            assert peer.recv().actions[0, 0] == 100.0 * i
            peer.close()


def test_servers_started_apart_give_their_robots_different_session_ids():
    """libzmq draws a ROUTER's routing ids from an unseeded rand(): every server process named its first
    robot's session 006b8b4567, so logs gathered over a night of restarts mixed sessions under one id."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from fakes import FakeBackend, RawPeer\n"
            "from polcache.serve.server import PolicyServer\n"
            "with PolicyServer(FakeBackend(), 'tcp://127.0.0.1:0') as server:\n"
            "    peer = RawPeer(server.endpoint)\n"
            "    peer.handshake(name='arm')\n"
            "    print(next(iter(server.sessions)).hex())\n"
            "    peer.close()\n")
    ids = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent,
                          check=True).stdout.split()[-1] for _ in range(3)]
    assert len(set(ids)) == 3, ids


def test_session_count_is_bounded(caplog, monkeypatch):
    monkeypatch.setattr(server_module, "EVICTABLE_SILENCE_S", 0.0)  # every session as if silent long enough
    with caplog.at_level(logging.INFO, logger="polcache.serve"), serve(FakeBackend(), max_sessions=2) as server:
        peers = [RawPeer(server.endpoint) for _ in range(4)]
        for i, peer in enumerate(peers):
            peer.handshake(name=f"r{i}")
        assert len(server.sessions) == 2
        assert peers[0].request(observation(0)).code == "no_session"
        for peer in peers:
            peer.close()
    assert "forgot r0" in caplog.text and "forgot r1" in caplog.text  # each eviction its line, within a second too


def test_a_burst_of_handshakes_does_not_push_out_active_robots():
    """One process opening 300 sockets and shaking hands pushed every running 50 Hz robot out of the
    session cap; a new robot now takes only the place of one silent for EVICTABLE_SILENCE_S."""
    with serve(FakeBackend(), max_sessions=2) as server:
        running = [RawPeer(server.endpoint) for _ in range(2)]
        for i, peer in enumerate(running):
            peer.handshake(name=f"r{i}")
        burst = [RawPeer(server.endpoint) for _ in range(5)]
        for peer in burst:
            reply = peer.handshake(name="burst")
            assert reply.code == "server_full" and "serves at most 2 robot(s) at once" in reply.message
        for peer in running:
            assert isinstance(peer.request(observation(1)), ActionChunk)  # still served
        time.sleep(server_module.EVICTABLE_SILENCE_S + 0.1)  # r0, r1 silent: the next robot takes r0's place
        assert isinstance(burst[0].handshake(name="late"), Welcome)
        assert running[0].request(observation(2)).code == "no_session"
        assert isinstance(running[1].request(observation(2)), ActionChunk)
        for peer in running + burst:
            peer.close()


def test_the_client_waits_for_a_full_server_and_says_so():
    robot = StepRobot(50)
    with serve(FakeBackend(), max_sessions=1) as server:
        running = RawPeer(server.endpoint)
        running.handshake(name="running")
        with PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=50) as client:
            with pytest.raises(ConnectError, match=r"stayed full for 0.5 s: this server serves at most 1 robot\(s\) at once"):
                client.connect(timeout_s=0.5)
            assert isinstance(running.request(observation(1)), ActionChunk)  # the running robot kept its place
            running.close()  # silent from now on: after EVICTABLE_SILENCE_S the waiting client gets in
            assert client.connect(timeout_s=5)["n_action_steps"] == 8


def test_a_robot_without_a_session_is_answered_in_its_own_protocol_version(caplog):
    """After a server restart a version-1 robot must be able to read the no_session that tells it to
    shake hands again, and a refused handshake is written in the handshake's version."""
    def reply(peer: RawPeer, frame: bytes):
        peer.send(frame)
        assert peer.socket.poll(2000)
        return decode_versioned(peer.socket.recv())

    state = {"state": np.zeros(3, np.float32)}
    handshake = Handshake(obs_spec={"state": ((3,), "float32")}, action_dim=2, hz=50.0, name="old arm")
    with caplog.at_level(logging.INFO, logger="polcache.serve"), serve(FakeBackend()) as server:
        peer = RawPeer(server.endpoint)
        error, version = reply(peer, encode(Observation(epoch=0, seq=3, t_capture=1.0, arrays=state), 1))
        assert (error.code, error.seq, version) == ("no_session", 3, 1)
        error, version = reply(peer, encode(msgspec.structs.replace(handshake, action_dim=5), 2))
        assert (error.code, version) == ("spec_mismatch", 2)
        extra = msgpack.unpackb(encode(handshake, 1)) | {"colour": "red"}
        error, version = reply(peer, msgpack.packb(extra))
        assert (error.code, version) == ("extra_key", 1)
        assert isinstance(reply(peer, encode(handshake, 1))[0], Welcome)
        # a second handshake on the connection replaces the session: its name is logged too
        assert isinstance(reply(peer, encode(msgspec.structs.replace(handshake, name="new arm"), 1))[0], Welcome)
        peer.close()
    assert "robot old arm (session" in caplog.text and "robot new arm (session" in caplog.text


def test_spec_is_the_policy_spec():
    with serve(FakeBackend(fake_spec(n_obs_steps=3))) as server:
        peer = RawPeer(server.endpoint)
        assert peer.handshake().policy["n_obs_steps"] == 3
        peer.close()


def test_version_2_robots_report_executed_actions_that_reach_the_policy_at_the_past_frames_steps():
    """Long-context spec (3 frames, stride 2): once the robot has executed actions at the two past
    frames' steps, the backend gets exactly those, oldest first."""
    backend = FakeBackend(fake_spec(n_obs_steps=3, obs_stride=2))
    robot = StepRobot(50)
    with serve(backend) as server, PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=50) as client:
        client.connect(timeout_s=5)
        assert client.version == PROTOCOL_VERSION
        ControlLoop(robot, client, 50).run(ticks=40)
        wait_for(lambda: backend.past and backend.past[-1] is not None, 5)
    applied = dict(robot.applied)  # tick (= seq) -> value, every dimension equal
    newest = backend.calls[-1]["state"][0, -1, 0]  # the observation seq of the last call (state carries it)
    past = backend.past[-1]
    assert past.shape == (2, robot.action_dim)
    assert past[:, 0].tolist() == [applied[newest - 4], applied[newest - 2]]


def test_version_1_robots_are_still_served_without_executed_actions():
    backend = FakeBackend()
    robot = StepRobot(50)
    with serve(backend) as server, PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=50,
                                                version=1) as client:
        client.connect(timeout_s=5)
        ControlLoop(robot, client, 50).run(ticks=30)
    assert robot.applied and all(value == tick for tick, value in robot.applied)
    assert all(p is None for p in backend.past)


def test_welcome_policy_is_the_same_map_in_every_protocol_version():
    """docs/protocol.md: welcome.policy is not versioned (obs_stride came within version 1,
    frame_mode later); a robot ignores policy keys it does not know."""
    with serve(FakeBackend(fake_spec(obs_stride=2))) as server:
        policies = []
        for version in (1, 2, 3):
            peer = RawPeer(server.endpoint)
            peer.send(encode(Handshake(obs_spec={"state": ((3,), "float32")}, action_dim=2, hz=50.0,
                                       name=f"v{version}"), version))
            assert peer.socket.poll(2000)
            wire = msgpack.unpackb(peer.socket.recv())
            assert wire["v"] == version and wire["type"] == "welcome"
            policies.append(wire["policy"])
            peer.socket.close(linger=0)
    assert policies[0] == policies[1] == policies[2]
    assert policies[0]["obs_stride"] == 2 and policies[0]["frame_mode"] == "strided"


def test_phase_locked_robots_are_served_fairly():
    """Four robots whose observations arrive at the same instant, in the same order, every tick,
    with a policy slow enough that only about one chunk fits per tick: each gets its share."""
    backend = FakeBackend(delay_s=0.008)
    with serve(backend) as server:
        peers = [RawPeer(server.endpoint) for _ in range(4)]
        for i, peer in enumerate(peers):
            reply = peer.request(encode(Handshake(obs_spec={"state": ((3,), "float32")}, action_dim=2, hz=50.0,
                                                  name=f"arm{i}")))
            assert isinstance(reply, Welcome)
        chunks = [0] * 4
        for tick in range(60):
            for peer in peers:  # same order every tick
                peer.send(observation(tick))
            end = time.monotonic() + 0.02
            while time.monotonic() < end:
                for i, peer in enumerate(peers):
                    while peer.socket.poll(0):
                        if isinstance(peer.recv(0.1), ActionChunk):
                            chunks[i] += 1
                time.sleep(0.001)
        for peer in peers:
            peer.socket.close(linger=0)
    assert min(chunks) > 0 and max(chunks) <= 1.5 * min(chunks), chunks
