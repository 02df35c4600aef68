"""What the reference client hands to act(): only actions of the width the robot declared, whatever
a buggy or foreign server sends (its own checks refuse NaN/inf actions and unmatched due times)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import zmq

from polcache_client import ControlLoop, PolicyClient
from polcache_client import protocol as P
from polcache_client.connection import ConnectError

HZ = 50.0
ACTION_DIM = 4
OBS_SPEC = {"state": ((3,), "float32")}
POLICY = {"obs": {"state": {"shape": [3], "dtype": "float32"}}, "action_dim": ACTION_DIM, "n_obs_steps": 1,
          "horizon": 8, "n_action_steps": 8, "task": "x"}


class WrongServer:
    """A bare ROUTER on its own thread: welcomes with `policy` and answers every observation with
    8 actions of `widths[k]` values for the k-th observation (cycling), due from its capture on."""

    def __init__(self, widths: list[int], policy: dict = POLICY):
        self.widths, self.policy = widths, policy
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(10):
                continue
            robot, frame = self.socket.recv_multipart()
            msg, version = P.decode_versioned(frame)
            if isinstance(msg, P.Handshake):
                answer = P.Welcome(policy=self.policy, max_message_bytes=P.DEFAULT_MAX_MESSAGE_BYTES, server="wrong")
            elif isinstance(msg, P.Observation):
                width = self.widths[self.answered % len(self.widths)]
                self.answered += 1
                answer = P.ActionChunk(epoch=msg.epoch, seq=msg.seq, obs_seqs=[msg.seq], t_capture=msg.t_capture,
                                       t_actions=msg.t_capture + np.arange(8) / HZ,
                                       actions=np.full((8, width), 0.5, np.float32), timing={"inference": 1.0})
            else:
                answer = msg  # heartbeat, reset: echoed
            self.socket.send_multipart([robot, P.encode(answer, version)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


class Arm:
    obs_spec = OBS_SPEC
    action_dim = ACTION_DIM

    def __init__(self):
        self.applied: list[tuple[int, ...]] = []
        self.stops = 0

    def observe(self) -> dict[str, np.ndarray]:
        return {"state": np.zeros(3, np.float32)}

    def act(self, action: np.ndarray) -> None:
        self.applied.append(np.shape(action))

    def safe_stop(self) -> None:
        self.stops += 1


def drive(server: WrongServer, chunks: int = 20) -> tuple[Arm, float]:
    """Run the reference loop until the server has sent `chunks` chunks (at most 10 s); the arm and
    how long the loop ran."""
    arm = Arm()
    with PolicyClient(server.endpoint, arm.obs_spec, arm.action_dim, hz=HZ) as client:
        client.connect(timeout_s=5)
        start = time.monotonic()
        ControlLoop(arm, client, hz=HZ).run(seconds=10, until=lambda: server.answered >= chunks)
        ControlLoop(arm, client, hz=HZ).run(ticks=5)  # the last chunks arrive
    return arm, time.monotonic() - start


@pytest.mark.parametrize("width", [7, 2])
def test_a_chunk_of_another_action_width_never_reaches_act(width, caplog):
    server = WrongServer([width])
    try:
        with caplog.at_level(logging.WARNING, logger="polcache_client"):
            arm, seconds = drive(server)
    finally:
        server.close()
    assert server.answered >= 20  # the server did answer, with chunks the client refused
    assert arm.applied == []  # no action of any width reached the robot (it was never started)
    assert f"chunk.actions has {width} values per action, but this robot's action_dim (its handshake's) is 4" \
        in caplog.text
    assert "unreadable message from server: " in caplog.text  # the same line as a NaN chunk's
    refusals = [r for r in caplog.records if "values per action" in r.getMessage()]
    assert 1 <= len(refusals) <= 1 + seconds  # rate-limited like every refusal: one line a second, not one a chunk


def test_good_chunks_are_executed_between_refused_ones():
    server = WrongServer([ACTION_DIM, 7])
    try:
        arm, _ = drive(server)
    finally:
        server.close()
    assert arm.applied and set(arm.applied) == {(ACTION_DIM,)}


def test_the_width_check_refuses_like_the_decoder():
    chunk = P.ActionChunk(epoch=0, seq=0, obs_seqs=[0], t_capture=0.0, t_actions=np.zeros(8),
                          actions=np.zeros((8, 7), np.float32), timing={})
    with pytest.raises(P.ProtocolError, match="7 values per action") as info:
        P.check_action_width(chunk, 4)
    assert info.value.code == "bad_shape"
    P.check_action_width(chunk, 7)


def test_a_welcome_to_a_policy_of_another_action_width_is_a_refused_connection():
    server = WrongServer([ACTION_DIM], policy={**POLICY, "action_dim": 7})
    try:
        client = PolicyClient(server.endpoint, OBS_SPEC, ACTION_DIM, hz=HZ)
        start = time.monotonic()
        with pytest.raises(ConnectError, match="welcomed this robot to a policy with action_dim 7, but this "
                                               "robot's is 4"):
            client.connect(timeout_s=5)
        assert time.monotonic() - start < 4 and not client.ready and client.policy is None
        client.close()
    finally:
        server.close()
