"""Faults and bad input: each gets a clear error reply or log line, and the server keeps serving."""

from __future__ import annotations

import gc
import logging
import time
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fakes import (ACTION_DIM, STATE_DIM, FakeBackend, RawPeer, StallingLink, StepRobot, fake_spec, observation,
                   wait_for)
from polcache.errors import PolcacheError
from polcache.serve.flood import FloodGuard, allowance
from polcache.serve.security import InsecureBindError, generate_keys, is_loopback
from polcache.serve.server import INLINE_WINDOW, SHARED_NAME_CHECK_S, PolicyServer
from polcache_client import ControlLoop, PolicyClient
from polcache_client.connection import ConnectError
from polcache_client.protocol import (PROTOCOL_VERSION, ActionChunk, Error, Handshake, Heartbeat, Reset, Welcome,
                                      decode, encode, encode_array)
from polcache_client.watchdog import Watchdog


@pytest.fixture
def server():
    with PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", max_message_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture
def peer(server):
    p = RawPeer(server.endpoint)
    assert isinstance(p.handshake(), Welcome)
    yield p
    p.close()


def assert_still_serving(peer: RawPeer, seq: int = 1000) -> None:
    reply = peer.request(observation(seq))
    assert isinstance(reply, ActionChunk) and reply.seq == seq


def obs_map(**override) -> bytes:
    obj = {"v": PROTOCOL_VERSION, "type": "obs", "epoch": 0, "seq": 0, "t_capture": 1.0,
           "arrays": {"state": encode_array(np.zeros(STATE_DIM, np.float32))},
           "executed_seqs": [], "executed": encode_array(np.zeros((0, 0), np.float32))}
    obj.update(override)
    return msgpack.packb({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    "frame, code, fragment",
    [
        (b"\x93\x01", "malformed", "msgpack"),
        (msgpack.packb("hello"), "malformed", "map"),
        (obs_map(v=4), "version", "version 4"),
        (obs_map(type="launch"), "unknown_type", "launch"),
        (obs_map(type="chunk"), "missing_key", "chunk message lacks"),
        (obs_map(seq=...), "missing_key", "seq"),
        (obs_map(extra=1), "extra_key", "extra"),
        (observation(0, state=np.zeros(STATE_DIM + 1, np.float32)), "bad_shape", "'state' has shape (4,)"),
        (observation(0, state=np.zeros(STATE_DIM, np.float64)), "bad_dtype", "'state' has dtype float64"),
        (observation(0, state=np.array([np.nan, 0, 0], np.float32)), "non_finite", "NaN"),
        (observation(0, state=np.array([np.inf, 0, 0], np.float32)), "non_finite", "infinite"),
        (observation(0, state=np.zeros(STATE_DIM, np.float32), depth=np.zeros(2, np.float32)), "extra_key", "depth"),
        (observation(0, image=np.zeros(2, np.uint8)), "missing_key", "state"),
        (encode(Welcome(policy={}, max_message_bytes=1, server="x")), "unknown_type", "does not accept Welcome"),
    ],
)
def test_bad_message_gets_an_error_naming_the_problem(peer, frame, code, fragment, caplog):
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        reply = peer.request(frame)
    assert isinstance(reply, Error) and reply.code == code
    assert fragment in reply.message
    assert any(code in r.getMessage() for r in caplog.records)  # and a log line on the server
    assert_still_serving(peer)


def test_an_error_about_a_huge_message_is_cut_short_in_the_reply_and_the_log(caplog):
    """1000 extra keys of 4000 control characters each (a 4 MB frame): the error listed them all, escaped, 16 MB,
    over the robot's own size limit (no reply reached it), and as long a line in the server's log."""
    arrays = {"state": encode_array(np.zeros(STATE_DIM, np.float32))}
    arrays.update({f"{i:04d}" + "\x01" * 4000: encode_array(np.zeros(0, np.uint8)) for i in range(1000)})
    with caplog.at_level(logging.WARNING, logger="polcache.serve"), \
            PolicyServer(FakeBackend(), "tcp://127.0.0.1:0") as server:  # the default size limit, 4 MiB
        peer = RawPeer(server.endpoint)
        peer.handshake()
        reply = peer.request(obs_map(arrays=arrays))
        assert reply.code == "extra_key" and len(reply.message) <= 1024 and "cut short: 16" in reply.message
        assert max(len(r.getMessage()) for r in caplog.records) < 1200
        assert_still_serving(peer)
        peer.close()


def test_a_refused_observation_changes_nothing(server, peer):
    """An epoch-2 observation refused for its executed actions' width had started epoch 2 (the episode's history
    cleared, the next epoch-1 observation refused as stale); a repeated seq, refused as stale, had replaced the
    executed actions reported for its ticks."""
    executed = (lambda seqs, width, value=7.0: {"executed_seqs": seqs,
                                                "executed": encode_array(np.full((len(seqs), width), value, np.float32))})
    for seq in (1, 2, 3):
        assert isinstance(peer.request(obs_map(epoch=1, seq=seq, **executed([seq - 1] if seq > 1 else [], 2))),
                          ActionChunk)
    assert peer.request(obs_map(epoch=2, seq=4, **executed([3], 5))).code == "bad_shape"
    session = next(iter(server.sessions.values()))
    assert session.epoch == 1 and session.history.newest_seq == 3
    assert peer.request(obs_map(epoch=1, seq=3, **executed([2, 0], ACTION_DIM, 9.0))).code == "stale_seq"
    assert {seq: a.tolist() for seq, a in session.executed._by_seq.items()} == {1: [7.0, 7.0], 2: [7.0, 7.0]}
    reply = peer.request(obs_map(epoch=1, seq=4))
    assert isinstance(reply, ActionChunk) and reply.obs_seqs == [3, 4]  # the episode's history, as it was


def test_multipart_message_is_refused(peer):
    peer.send(observation(0), b"second frame")
    reply = peer.recv()
    assert reply.code == "malformed" and "one frame" in reply.message
    assert_still_serving(peer)


def test_observation_error_names_its_sequence_number(peer):
    reply = peer.request(observation(42, state=np.zeros(1, np.float32)))
    assert reply.seq == 42
    reply = peer.request(obs_map(seq=43, foo=1))  # the message's own keys wrong: its seq still readable
    assert reply.code == "extra_key" and reply.seq == 43
    assert peer.request(obs_map(seq=-1, foo=1)).seq is None  # out of range: not a seq to match
    for version in (4, ...):  # an unsupported version, or none: the seq was readable all the same
        reply = peer.request(obs_map(seq=44, v=version))
        assert reply.code == "version" and reply.seq == 44


def test_observation_before_handshake_is_refused(server):
    p = RawPeer(server.endpoint)
    reply = p.request(observation(7))
    assert reply.code == "no_session" and "handshake" in reply.message and reply.seq == 7
    p.close()


@pytest.mark.parametrize(
    "spec, action_dim, fragment",
    [
        ({"state": ((STATE_DIM + 1,), "float32")}, ACTION_DIM, "obs_spec.state.shape: robot (4,) != policy (3,)"),
        ({"state": ((STATE_DIM,), "float64")}, ACTION_DIM, "obs_spec.state.dtype: robot float64 != policy float32"),
        ({"joints": ((STATE_DIM,), "float32")}, ACTION_DIM, "obs_spec: the policy needs key(s) ['state']"),
        ({"state": ((STATE_DIM,), "float32"), "image": ((2, 2, 3), "uint8")}, ACTION_DIM, "does not use"),
        ({"state": ((STATE_DIM,), "float32")}, ACTION_DIM + 5, "action_dim: robot 7 != policy 2"),
    ],
)
def test_handshake_mismatch_names_the_field(server, spec, action_dim, fragment, caplog):
    p = RawPeer(server.endpoint)
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        reply = p.request(encode(Handshake(obs_spec=spec, action_dim=action_dim, hz=50.0, name="arm3")))
    assert reply.code == "spec_mismatch" and fragment in reply.message
    # which robot to fix, by the name it announced (it read "message from (no handshake)")
    assert re.search(r"refused the handshake of arm3 \(session \w+\): \[spec_mismatch\] ", caplog.text), caplog.text
    p.close()
    client = PolicyClient(server.endpoint, spec, action_dim, hz=50)
    with pytest.raises(ConnectError, match="refused the handshake"):
        client.connect(timeout_s=2)
    client.close()


def test_a_handshake_refused_for_a_field_out_of_range_is_reported_as_refused(server):
    """`sim-robot --hz 1e9` said "no answer from a policy server" although the server answered. (The
    client now refuses such a rate itself: the handshake is sent as an older client's would be.)"""
    from msgspec.structs import replace

    client = PolicyClient(server.endpoint, {"state": ((STATE_DIM,), "float32")}, ACTION_DIM, hz=50)
    client._hello = replace(client._hello, hz=1e9)
    client._handshake = encode(client._hello, client.version)
    with pytest.raises(ConnectError, match=r"refused the handshake: \[out_of_range\] handshake.hz"):
        client.connect(timeout_s=2)
    client.close()


def test_oversized_messages(server, peer, caplog):
    reply = peer.request(msgpack.packb({"v": 1, "type": "obs", "pad": b"x" * 100_000}))
    assert reply.code == "too_large" and "exceeds the limit of 65536" in reply.message
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        peer.send(b"x" * 200_000)  # over the transport limit: ZeroMQ drops the connection, the server logs it
        assert wait_for(lambda: "131072-byte transport limit" in caplog.text)
    assert "robot raw (session " in caplog.text  # the robot that was cut off, by name
    stranger = RawPeer(server.endpoint)  # a connection that never shakes hands (launch's health check)
    assert isinstance(stranger.request(encode(Heartbeat(t=1.0))), Heartbeat)
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        stranger.close()
        assert wait_for(lambda: "a connection closed before any handshake (a health check" in caplog.text, 3)
    fresh = RawPeer(server.endpoint)
    fresh.handshake()
    assert_still_serving(fresh)
    fresh.close()


def test_refused_messages_of_connections_without_a_handshake_are_not_labelled_as_robots(caplog):
    """Their records carried the session id (hex) as the robot, which the dashboard listed as one."""
    from polcache.dashboard import RunState

    records = []
    with caplog.at_level(logging.WARNING, logger="polcache.serve"), \
            PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", on_record=records.append) as server:
        peer = RawPeer(server.endpoint)
        assert isinstance(peer.request(b"not msgpack"), Error)
        peer.close()
    [record] = [r for r in records if r.kind == "error"]
    assert record.robot == "(no handshake)"
    assert re.search(r"refused message from \(no handshake\) \(session \w+\): \[", caplog.text)
    state = RunState()  # as the dashboard reads the server's metrics file
    state.add([{"kind": "error", "t": record.t, "robot": record.robot, "code": record.code, "errors": 1}])
    views = state.views()
    assert views["_meta"]["robots"] == []  # no robot: its refusals are counted under the label
    assert views["_meta"]["errors"] == {f"(no handshake): {record.code}": 1}


def test_robots_sharing_a_name_are_told_apart_in_the_log(server, caplog):
    """Connects are logged per session, not per name, and each closed connection names its robot,
    also where the descriptor of a closed one was reused before the server read the disconnect. A
    robot shaking hands with a connected one's name is warned about: their metrics would mix."""
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        a, b = RawPeer(server.endpoint), RawPeer(server.endpoint)
        assert isinstance(a.handshake(name="arm"), Welcome) and isinstance(b.handshake(name="arm"), Welcome)
        assert len(set(re.findall(r"robot arm \(session (\w+)\) connected", caplog.text))) == 2  # none suppressed
        first, second = re.findall(r"robot arm \(session (\w+)\) connected", caplog.text)
        assert wait_for(lambda: "share one name" in caplog.text)  # looked for a moment after the handshake
        [shared] = [r.message for r in caplog.records if "share one name" in r.message]  # said once, at the second
        assert shared == (f"robots arm (session {first}) and arm (session {second}) share one name: name them apart "
                          f"(the handshake's name: PolicyClient(name=...), sim-robot --name), or their metrics mix")
        a.close()
        b.close()
        for i in range(10):  # one after another, on the descriptors the closed connections leave
            peer = RawPeer(server.endpoint)
            assert isinstance(peer.handshake(name=f"r{i}"), Welcome)
            peer.close()
        assert wait_for(lambda: caplog.text.count("disconnected") == 12)
        restarted = RawPeer(server.endpoint)  # the name is free again: no warning
        assert isinstance(restarted.handshake(name="arm"), Welcome)
        restarted.close()
        assert wait_for(lambda: caplog.text.count("disconnected") == 13)
        assert caplog.text.count("share one name") == 1
    connected = re.findall(r"robot (\w+) \(session (\w+)\) connected", caplog.text)
    assert sorted(re.findall(r"robot (\w+) \(session (\w+)\) disconnected", caplog.text)) == sorted(connected)


def test_a_robot_reconnecting_is_not_told_it_shares_its_name_with_its_old_connection(server, caplog):
    """A robot that reconnects (after a server stall, a restart) may shake hands before the server
    has read its old connection's closing: it was warned once as sharing its name with itself."""
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        old = RawPeer(server.endpoint)
        assert isinstance(old.handshake(name="arm"), Welcome)
        new = RawPeer(server.endpoint)
        assert isinstance(new.handshake(name="arm"), Welcome)  # the old connection still open here
        old.close()
        assert wait_for(lambda: caplog.text.count("disconnected") == 1)
        time.sleep(1.5 + SHARED_NAME_CHECK_S)  # past the look for a shared name
        new.close()
    assert "share one name" not in caplog.text


# A robot with a fixed ZeroMQ routing id that shakes hands, says so, then waits (to be frozen by SIGSTOP).
FIXED_ID_ROBOT = r"""
import sys, time, zmq
from polcache_client.protocol import Handshake, encode
s = zmq.Context.instance().socket(zmq.DEALER)
s.setsockopt(zmq.ROUTING_ID, b"robot-7")
s.connect(sys.argv[1])
s.send(encode(Handshake(obs_spec={"state": ((3,), "float32")}, action_dim=2, hz=50.0, name="arm")))
s.recv()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_robot_back_under_its_fixed_id_is_served_while_its_old_connection_lingers(server, caplog):
    """A robot that lost power (here: frozen by SIGSTOP) kept its TCP connection open on the server,
    so a restarted robot with the same fixed routing id was ignored without a word, for minutes. It
    takes its id over (ROUTER_HANDOVER) at once, and its own closing is logged as its (a verifier saw
    "a connection closed before any handshake": the session still named the old connection)."""
    import os
    import signal
    import subprocess
    import sys

    assert (STATE_DIM, ACTION_DIM) == (3, 2)
    frozen = subprocess.Popen([sys.executable, "-c", FIXED_ID_ROBOT, server.endpoint], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert frozen.stdout.readline() == "ready\n"
        os.kill(frozen.pid, signal.SIGSTOP)
        restarted = RawPeer(server.endpoint, routing_id=b"robot-7")
        assert isinstance(restarted.handshake(name="arm"), Welcome)
        assert_still_serving(restarted)
        with caplog.at_level(logging.INFO, logger="polcache.serve"):
            restarted.close()
            assert wait_for(lambda: "robot arm (session 726f626f742d37) disconnected" in caplog.text, 3)
        assert "closed before any handshake" not in caplog.text
    finally:
        frozen.kill()
        frozen.wait()


# A server whose policy takes 50 ms and sees an image besides the state (so a backlog outgrows ZeroMQ's queue).
STALLING_SERVER = r"""
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
from fakes import FakeBackend, fake_spec
from polcache.policy.spec import ArraySpec
from polcache.serve.server import PolicyServer
spec = fake_spec()
spec = dataclasses.replace(spec, obs={**spec.obs, "image_front": ArraySpec((96, 96, 3), "uint8")})
server = PolicyServer(FakeBackend(spec, delay_s=0.05), "tcp://127.0.0.1:0", inline_ms=float(sys.argv[2]))
print(server.endpoint, flush=True)
server.serve_forever()
"""


@pytest.mark.slow
@pytest.mark.parametrize("inline_ms", [0.0, 100.0], ids=["worker", "inline"])
def test_after_a_stall_the_server_answers_the_newest_observation_not_the_first_read(inline_ms):
    """A server stopped for a moment (SIGSTOP here; swapped out, starved of CPU) finds a robot's
    backlog partly in ZeroMQ's queue and partly still in the kernel's buffers: it answered the
    newest queued one, or the one that waited from before the stall (past due on arrival, the
    fresh chunk an inference later). It waits for the backlog, answers only the robot's newest
    observation besides the inference under way at the stop, and says it stood still: also where
    the stop came during an inference on the server's own thread (inline), not in a wait."""
    import os
    import signal
    import subprocess
    import sys

    stalling = subprocess.Popen([sys.executable, "-c", STALLING_SERVER, str(Path(__file__).parent), str(inline_ms)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peer = None
    try:
        endpoint = stalling.stdout.readline().strip()
        peer = RawPeer(endpoint)
        assert isinstance(peer.handshake({"state": ((STATE_DIM,), "float32"), "image_front": ((96, 96, 3), "uint8")}),
                          Welcome)
        image, state = np.zeros((96, 96, 3), np.uint8), np.zeros(STATE_DIM, np.float32)

        def send(seq: int) -> None:
            peer.send(observation(seq, t_capture=time.monotonic(), image_front=image, state=state))

        seq = 0
        for stall in range(4):
            for seq in range(seq, seq + (INLINE_WINDOW if stall == 0 else 3)):  # then inline where it may be
                send(seq)
                assert peer.recv(timeout_s=10).seq == seq
            # stopped while it computes one (busy, or inline: on the loop's thread) with another waiting, or while idle
            if under_way := stall % 2 or inline_ms > 0:
                first = seq = seq + 1
                send(first)
                time.sleep(0.01)
                seq += 1
                send(seq)  # waits for the inference: never answered, the backlog behind it is newer
                time.sleep(0.005)
            os.kill(stalling.pid, signal.SIGSTOP)
            for seq in range(seq + 1, seq + 61):  # 60 observations at 200 Hz
                send(seq)
                time.sleep(0.005)
            os.kill(stalling.pid, signal.SIGCONT)
            answered = [peer.recv(timeout_s=5).seq]
            while peer.socket.poll(300):
                answered.append(peer.recv().seq)
            # under way: the first one sent before the stop, if the server had read it by then
            assert answered in ([seq], [first, seq]) if under_way else answered == [seq], f"stall {stall}: {answered}"
            seq += 1
    finally:
        if peer is not None:
            peer.close()
        stalling.kill()
        _, log = stalling.communicate()
    assert "the server stood still for about" in log  # inline: only ever stopped in an inference, never in a wait


TERMINATED_SERVER = r"""
import signal, sys
sys.path.insert(0, sys.argv[1])
from fakes import FakeBackend
from polcache.serve.server import PolicyServer
server = PolicyServer(FakeBackend(), "tcp://127.0.0.1:0")
signal.signal(signal.SIGTERM, lambda *_: server.stop())  # as polcache serve does
print(server.endpoint, flush=True)
server.serve_forever()
"""


@pytest.mark.slow
def test_a_clean_stop_is_not_taken_for_a_stall():
    """A SIGTERM during the loop's wait for messages restarts the wait (pyzmq retries an interrupted
    call with its whole timeout): the stop was logged as "the server stood still" in half the runs."""
    import signal
    import subprocess
    import sys

    for _ in range(4):
        server = subprocess.Popen([sys.executable, "-c", TERMINATED_SERVER, str(Path(__file__).parent)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().startswith("tcp://")
            time.sleep(0.3)  # waiting for messages by now
            server.send_signal(signal.SIGTERM)
            _, log = server.communicate(timeout=20)
        finally:
            server.kill()
        assert server.returncode == 0 and "stood still" not in log, log


def test_a_robot_restarted_under_its_fixed_id_is_its_new_connection_and_no_other_robots(server, caplog):
    """A robot restarted under a fixed routing id whose session was kept was filed under its old,
    closed connection's descriptor, which the kernel had given to another robot since: the new
    connection's closing was logged as "a connection closed before any handshake", and the other
    robot's as the restarted one's, its session left open for the idle timeout (a soak test)."""
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        first = RawPeer(server.endpoint, routing_id=b"robot-7")
        assert isinstance(first.handshake(name="arm"), Welcome)
        first.close()  # its session is kept: a fixed id may come back
        assert wait_for(lambda: "robot arm (session 726f626f742d37) disconnected" in caplog.text, 3)
        other = RawPeer(server.endpoint)  # given the descriptor the first one had
        assert isinstance(other.handshake(name="other"), Welcome)
        again = RawPeer(server.endpoint, routing_id=b"robot-7")
        assert isinstance(again.handshake(name="arm"), Welcome)
        assert_still_serving(again)
        caplog.clear()
        again.close()
        assert wait_for(lambda: "robot arm (session 726f626f742d37) disconnected" in caplog.text, 3)
        other_session = next(robot for robot, s in server.sessions.items() if s.name == "other")
        other.close()
        assert wait_for(lambda: other_session not in server.sessions, 3)  # its own closing closed its session
    assert "closed before any handshake" not in caplog.text


def test_a_robot_that_takes_over_another_robots_fixed_id_is_logged(server, caplog):
    """Two robots (or two copies of one) given one fixed routing id: the second took the first's
    session over, the first got no more answers, and the log said only that the second had connected."""
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        first = RawPeer(server.endpoint, routing_id=b"arm")
        assert isinstance(first.handshake(name="armA"), Welcome)
        for name in ("armB", "armA"):  # another robot's name, then a copy of the first's
            caplog.clear()
            second = RawPeer(server.endpoint, routing_id=b"arm")
            assert isinstance(second.handshake(name=name), Welcome)
            assert_still_serving(second)
            assert re.search(rf"robot {name} \(session 61726d\) connected under the fixed routing id of \w+'s "
                             r"session while that connection is still open, and took it over \(ZeroMQ's "
                             r"ROUTER_HANDOVER\)", caplog.text), caplog.text
            first, _ = second, first.close()
        caplog.clear()
        closing = server.sessions[b"arm"].fd
        first.close()  # a robot restarted under its own id after its connection closed: no line
        assert wait_for(lambda: closing in server._closed_fds, 3)  # noqa: SLF001 - the server read the closing
        again = RawPeer(server.endpoint, routing_id=b"arm")
        assert isinstance(again.handshake(name="armA"), Welcome)
    assert "took it over" not in caplog.text
    again.close()


HANGING_SERVER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from fakes import FakeBackend
from polcache.serve.server import INLINE_WINDOW, SHARED_NAME_CHECK_S, PolicyServer

class Hangs(FakeBackend):
    calls = 0
    def predict(self, obs, seed=None, past_actions=None):
        Hangs.calls += 1
        if Hangs.calls == 30:  # on the loop's own thread by then (inline), so nothing reads the socket
            time.sleep(3.0)
        return super().predict(obs, seed, past_actions)

server = PolicyServer(Hangs(), sys.argv[1], inline_ms=100).start()
print("ready", flush=True)
time.sleep(8)
server.stop()
print("served on", flush=True)
"""


@pytest.mark.slow
def test_an_inference_that_hangs_on_the_loop_thread_while_a_robot_reconnects_does_not_abort_the_server():
    """libzmq 4.3.5 aborted the server (exit 134, "Assertion failed: !_io_error") when its heartbeat
    fell due on the connection of a robot that gave up and reconnected while the loop was stuck in
    an inline inference (an outside verifier)."""
    import subprocess
    import sys
    from pathlib import Path

    from fakes import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SERVER, address, str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        with PolicyClient(address, {"state": ((STATE_DIM,), "float32")}, ACTION_DIM, hz=50) as client:
            client.connect(timeout_s=5)
            end = time.monotonic() + 6
            while time.monotonic() < end:
                client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, time.monotonic())
                client.poll()
                time.sleep(0.02)
            assert client.connections == 2  # it gave up on the stuck server once, and came back
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.endswith("served on\n") and "Assertion" not in err, err


def test_client_refuses_to_send_an_oversized_observation(server, caplog):
    spec = {"state": ((STATE_DIM,), "float32")}
    with PolicyClient(server.endpoint, spec, ACTION_DIM, hz=50) as client:
        client.connect(timeout_s=2)
        client.max_message_bytes = 10
        with caplog.at_level(logging.WARNING, logger="polcache_client"):
            assert not client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, 0.0)
        assert "too_large" in caplog.text or "limit" in caplog.text


def test_inference_failure_is_reported_and_serving_continues(caplog):
    class Flaky(FakeBackend):
        def predict(self, obs, seed=None, past_actions=None):
            if obs["state"][0, -1, 0] == 13:
                raise RuntimeError("CUDA out of memory")
            if obs["state"][0, -1, 0] == 14:
                return np.full((1, 8, ACTION_DIM), np.nan, np.float32)
            return super().predict(obs, seed)

    with caplog.at_level(logging.WARNING, logger="polcache.serve"), PolicyServer(Flaky(), "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        p.handshake(name="arm-" + "x" * 4000)
        reply = p.request(observation(13))
        assert reply.code == "inference" and "out of memory" in reply.message and reply.seq == 13
        # the log names the robot, its name cut short (it is in every line about the robot)
        assert f"inference failed for observation 13 (epoch 0) of arm-{'x' * 60}... (session " in caplog.text
        assert "x" * 61 not in caplog.text
        nan = p.request(observation(14)).message
        assert "the policy's actions are NaN or infinite: its observations are probably far outside" in nan
        assert "Error:" not in nan  # our own reason, without a Python exception's name
        # said in the refusal's line (rate-limited per robot and code), not again in a warning of the worker's
        assert "history up to 13 was cleared" in caplog.text and "inference failed for observation 14" not in caplog.text
        assert_still_serving(p)
        p.close()


def test_a_policy_bug_is_logged_with_its_traceback_once(caplog):
    """A backend's own bug (an AttributeError) was one warning line a second, like bad input: no stack to find it by."""
    class Buggy(FakeBackend):
        def predict(self, obs, seed=None, past_actions=None):
            return self.no_such_model(obs)

    with caplog.at_level(logging.WARNING, logger="polcache.serve"), PolicyServer(Buggy(), "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        p.handshake()
        for seq in (1, 2):
            reply = p.request(observation(seq))
            assert reply.code == "inference" and "AttributeError" in reply.message
        p.close()
    assert caplog.text.count("Traceback") == 1 and "in predict" in caplog.text


def test_a_window_that_failed_is_not_reused():
    """A finite but absurd state (1e30) makes the network overflow to NaN; without clearing, every
    window that frame stays in fails too (n_obs_steps ticks, longer with a stride)."""
    class Overflowing(FakeBackend):
        def predict(self, obs, seed=None, past_actions=None):
            if np.abs(obs["state"]).max() > 1e29:
                return np.full((1, 8, ACTION_DIM), np.nan, np.float32)
            return super().predict(obs, seed)

    backend = Overflowing()
    assert backend.spec.n_obs_steps > 1  # the bad frame would sit in the next windows
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        p.handshake()
        assert isinstance(p.request(observation(4)), ActionChunk)
        reply = p.request(observation(5, value=1e30))
        assert reply.code == "inference" and "history up to 5 was cleared" in reply.message and reply.seq == 5
        for seq in (6, 7):
            assert isinstance(p.request(observation(seq)), ActionChunk)
        assert (backend.calls[-1]["state"][0, :, 0] < 1e29).all()
        p.close()


def test_an_observation_sent_during_a_failing_inference_is_still_answered():
    """The failed window's steps are dropped, not the newer observation waiting behind them: it gets
    its chunk, from a window of itself alone."""
    class SlowOverflowing(FakeBackend):
        def predict(self, obs, seed=None, past_actions=None):
            if np.abs(obs["state"]).max() > 1e29:
                time.sleep(0.3)  # observation 6 arrives meanwhile
                return np.full((1, 8, ACTION_DIM), np.nan, np.float32)
            return super().predict(obs, seed)

    backend = SlowOverflowing()
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        p.handshake()
        p.send(observation(5, value=1e30))
        time.sleep(0.1)
        p.send(observation(6))
        failed, answered = p.recv(), p.recv()
        assert failed.code == "inference" and failed.seq == 5
        assert isinstance(answered, ActionChunk) and answered.seq == 6 and answered.obs_seqs == [6, 6]
        p.close()


def test_slow_inference_is_a_logged_deadline_miss_and_the_robot_stops_safely(caplog):
    records = []
    robot = StepRobot(50)
    with PolicyServer(FakeBackend(delay_s=0.2), "tcp://127.0.0.1:0", on_record=records.append) as server, \
            PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=50) as client:
        client.connect(timeout_s=2)
        chunks = []
        loop = ControlLoop(robot, client, 50, watchdog=Watchdog(hold_s=0.05), on_chunk=chunks.append)
        with caplog.at_level(logging.WARNING, logger="polcache.serve"):
            loop.run(ticks=40)
            assert wait_for(lambda: records)
    assert records[0].deadline_miss and "over its 140.0 ms deadline" in caplog.text
    assert re.search(r"observation \d+ \(epoch 0\) of robot", caplog.text)  # which epoch's, after a reset
    # with where the time went (the policy too slow for the robot's rate here; robots waiting behind others there)
    assert re.search(r"over its 140\.0 ms deadline \(inference 2\d\d\.\d ms for 1 robot, waiting \d+\.\d ms before it\)",
                     caplog.text)
    assert chunks and all(c.dropped_actions == 8 for c in chunks)  # every action arrived too late
    assert not robot.applied and robot.stops == []  # never moved, so never needed stopping


def test_a_policy_of_one_action_per_chunk_is_not_late_on_every_request():
    """Its default deadline was (1 - 1) periods, 0 ms: every request counted as a deadline miss and warned."""
    records = []
    with PolicyServer(FakeBackend(fake_spec(n_action_steps=1)), "tcp://127.0.0.1:0", on_record=records.append) as server:
        p = RawPeer(server.endpoint)
        p.handshake()
        for seq in range(1, 6):
            assert isinstance(p.request(observation(seq)), ActionChunk)
        assert [s.deadline_ms for s in server.sessions.values()] == [10.0]  # half a period at 50 Hz
        p.close()
        assert wait_for(lambda: len(records) == 5)
    assert not any(r.deadline_miss for r in records)


@pytest.mark.parametrize("restart", ["handshake", "reset"])
def test_a_chunk_computed_before_the_robot_started_over_is_not_sent(restart):
    """A second handshake on the connection (epoch 0 again) or a reset repeating the epoch starts the
    session afresh: the chunk for an observation from before, still being computed, came after the
    welcome or the reset's echo and matched the new session's epoch, so a robot would have run it."""
    with PolicyServer(FakeBackend(delay_s=0.3), "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        assert isinstance(p.handshake(), Welcome)
        p.send(observation(5))
        time.sleep(0.1)  # its inference is under way
        again = p.handshake() if restart == "handshake" else p.request(encode(Reset(epoch=0)))
        assert isinstance(again, Welcome if restart == "handshake" else Reset)
        with pytest.raises(TimeoutError):
            p.recv(timeout_s=0.5)
        answered = p.request(observation(1))
        assert isinstance(answered, ActionChunk) and answered.seq == 1 and answered.obs_seqs == [1, 1]
        p.close()


def test_a_robot_clock_that_goes_back_is_logged_and_the_robot_still_served(peer, caplog):
    """A wall clock stepped back by NTP (a robot stamping with time.time()) went unnoticed; under
    real-time chunking the old plan's actions all counted as still due. Logged once, naming the robot;
    its chunks keep coming on its own clock; a new epoch may start at any time."""
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        for seq, epoch, t in ((0, 0, 100.0), (1, 0, 50.0), (2, 0, 50.02), (3, 1, 10.0)):
            chunk = peer.request(observation(seq, epoch=epoch, t_capture=t))
            assert isinstance(chunk, ActionChunk) and chunk.seq == seq and chunk.t_actions[0] == t
    warned = [r.getMessage() for r in caplog.records if "earlier than the last" in r.getMessage()]
    assert warned == ["raw (session %s): obs.t_capture of seq 1 is 50.000 s earlier than the last observation's in "
                      "epoch 0; stamp observations with a monotonic clock (time.monotonic(), not time.time())"
                      % re.search(r"session (\w+)", warned[0])[1]]


def test_a_robot_clock_that_jumps_ahead_is_logged_and_the_robot_still_served(peer, caplog):
    """A robot switching from time.monotonic() to time.time() mid-epoch was answered without a word (and
    warned about only when it switched back, naming that observation). Sensor lag that changes a little
    from frame to frame is no jump."""
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        for seq, t in ((0, 100.0), (1, 100.5), (2, 1.8e9), (3, 1.8e9 + 0.02)):
            chunk = peer.request(observation(seq, t_capture=t))
            assert isinstance(chunk, ActionChunk) and chunk.seq == seq and chunk.t_actions[0] == t
    [warned] = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert re.fullmatch(r"raw \(session \w+\): obs.t_capture of seq 2 is 1799999899.500 s later than the last "
                        r"observation's in epoch 0, which arrived 0.\d{3} s before it: the robot's clock jumped ahead; "
                        r"stamp observations with one monotonic clock \(time.monotonic\(\), not time.time\(\)\)", warned)


def test_a_robot_whose_connection_closed_is_logged_once_with_its_session_closed(server, caplog):
    """Its session stayed for the 60 s idle timeout, logged again then as "silent ... session closed",
    and counted among the sessions closed at shutdown; a handshake again on one connection keeps it.
    ZeroMQ gives a reconnect a new routing id, unless the robot set its own."""
    with caplog.at_level(logging.INFO, logger="polcache.serve"):
        a, b = RawPeer(server.endpoint), RawPeer(server.endpoint)
        assert isinstance(a.handshake(name="arm"), Welcome) and isinstance(b.handshake(name="other"), Welcome)
        assert isinstance(b.handshake(name="other"), Welcome)  # again, on its connection
        a.close()
        assert wait_for(lambda: len(server.sessions) == 1)
        [line] = [r.message for r in caplog.records if "disconnected" in r.message]
        assert re.fullmatch(r"robot arm \(session \w+\) disconnected \(robot exited or reconnecting, network loss, "
                            r"or a message over the 131072-byte transport limit\): session closed", line), line
        b.close()
        assert wait_for(lambda: not server.sessions)
        assert caplog.text.count("session closed") == 2 and "silent" not in caplog.text
        # a robot with its own routing id comes back under it (ZeroMQ reconnects it after a network
        # blip) and finds its session; it is forgotten only after the idle timeout
        fixed = RawPeer(server.endpoint, routing_id=b"arm-1")
        assert isinstance(fixed.handshake(name="fixed"), Welcome)
        fixed.close()
        assert wait_for(lambda: caplog.text.count("disconnected") == 3)
        assert list(server.sessions) == [b"arm-1"] and caplog.text.count("session closed") == 2


def test_a_robot_gone_right_after_its_handshake_gets_no_session_and_a_reused_descriptor_still_does(caplog):
    """Where a robot's connection closed before the server read its handshake (a robot crashing right
    after its start), its closing was read first and the session then opened stayed for the 60 s idle
    timeout: logged as "silent", crowding out other robots (an outside probe: 49 of 300 such robots).
    A new connection on the descriptor of one closed earlier (a health check's) is served."""
    server = PolicyServer(FakeBackend(), "tcp://127.0.0.1:0")  # not started: its steps driven from here
    handshake = encode(Handshake(obs_spec={"state": ((STATE_DIM,), "float32")}, action_dim=ACTION_DIM, hz=50.0,
                                 name="gone"))
    try:
        with caplog.at_level(logging.INFO, logger="polcache.serve"):
            gone = RawPeer(server.endpoint)
            gone.send(handshake)
            gone.socket.close(linger=1000)  # the handshake delivered, then the connection closed
            time.sleep(0.3)
            server._receive()  # noqa: SLF001
            assert not server.sessions
            assert "robot gone (session " in caplog.text and "closed right after its handshake" in caplog.text
            # a burst of them: the closings read at the first one's handshake are kept for the others'
            burst = [RawPeer(server.endpoint) for _ in range(5)]
            for peer in burst:
                peer.send(handshake)
                peer.socket.close(linger=1000)
            time.sleep(0.3)
            for _ in burst:
                server._receive()  # noqa: SLF001
            assert not server.sessions and caplog.text.count("closed right after its handshake") == 6
            check = RawPeer(server.endpoint)  # a health check: connects, closes, says nothing
            time.sleep(0.2)
            check.close()
            time.sleep(0.3)
            robot = RawPeer(server.endpoint)
            robot.send(handshake)
            time.sleep(0.3)
            server._receive()  # noqa: SLF001
            assert len(server.sessions) == 1 and isinstance(robot.recv(), Welcome)
            robot.close()

            def session_closed() -> bool:  # its closing read, as the loop does once a second
                server._log_disconnects()  # noqa: SLF001
                return not server.sessions

            assert wait_for(session_closed)
    finally:
        server._shutdown()  # noqa: SLF001


def test_a_burst_of_connections_between_two_monitor_reads_does_not_stall_the_server():
    """The connection monitor is read once a second; at ZeroMQ's default queue bound a burst of
    1000 connections opened and closed in between blocked ZeroMQ's I/O thread, so no robot's
    message arrived until the next read (found while reviewing the monitor's new opening events)."""
    import zmq

    server = PolicyServer(FakeBackend(), "tcp://127.0.0.1:0")  # not started: nothing reads its monitor
    peer_ctx = zmq.Context()
    try:
        for _ in range(1200):
            peer = peer_ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(server.endpoint)
            peer.send(b"x")
            assert server._router.poll(3000), "the server stopped receiving"  # noqa: SLF001
            server._router.recv_multipart()  # noqa: SLF001
            peer.close()
        robot = RawPeer(server.endpoint)
        robot.send(encode(Heartbeat(t=1.0)))
        assert server._router.poll(3000)  # noqa: SLF001
        robot.close()
    finally:
        peer_ctx.destroy(linger=0)
        server._shutdown()  # noqa: SLF001


def test_a_robot_renamed_on_its_connection_ends_the_old_names_session(server):
    """A second handshake under another name kept the first name's gauges exposed for good."""
    closed = []
    server.on_session_closed = closed.append
    peer = RawPeer(server.endpoint)
    assert isinstance(peer.handshake(name="raw-A"), Welcome) and isinstance(peer.handshake(name="raw-A"), Welcome)
    assert closed == []  # the same name again: the same robot
    assert isinstance(peer.handshake(name="raw-B"), Welcome)
    assert closed == ["raw-A"]
    peer.close()
    assert wait_for(lambda: closed == ["raw-A", "raw-B"])


def test_robot_disconnect_and_reconnect(server):
    spec = {"state": ((STATE_DIM,), "float32")}
    for _ in range(3):
        with PolicyClient(server.endpoint, spec, ACTION_DIM, hz=50) as client:
            client.connect(timeout_s=2)
            assert client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, 0.0)
            assert wait_for(lambda: client.poll())


def test_server_restart_mid_episode(tmp_path):
    endpoint = f"ipc://{tmp_path}/policy.sock"
    robot = StepRobot(50)
    ticks = []
    server = PolicyServer(FakeBackend(), endpoint).start()
    client = PolicyClient(endpoint, robot.obs_spec, robot.action_dim, hz=50, timeout_s=0.3)
    client.connect(timeout_s=2)
    loop = ControlLoop(robot, client, 50, watchdog=Watchdog(hold_s=0.1), on_tick=ticks.append)
    loop.run(ticks=15, then_stop=False)
    server.stop()
    loop.run(ticks=35, then_stop=False)  # 0.7 s without a server: hold, then one safe stop, then a reconnect attempt
    assert len(robot.stops) == 1 and client.epoch >= 1
    server = PolicyServer(FakeBackend(), endpoint).start()
    try:
        assert loop.run(until=lambda: len(ticks) > 400 or ticks[-1].state == "fresh", then_stop=False) is None
        loop.run(ticks=10, then_stop=False)
        was_ready = client.ready
    finally:
        client.close()
        server.stop()
    assert ticks[-1].state == "fresh" and ticks[-1].epoch == client.epoch >= 1
    assert was_ready and not client.ready and client.connections == 2 and 0 < client.rtt_s < 1  # heartbeats flow again
    resumed = [(t, v) for t, v in robot.applied if t > robot.stops[0]]
    assert resumed and all(v == t for t, v in resumed)  # on time, and no chunk from before the restart
    assert all(v <= t for t, v in robot.applied)  # before the stop: fresh or held, never from the future


def ipc_server_and_robot(tmp_path, timeout_s: float) -> tuple[str, PolicyServer, PolicyClient]:
    """A server on an ipc endpoint (restartable there) and a robot for it, heartbeating every 50 ms."""
    endpoint = f"ipc://{tmp_path}/policy.sock"
    server = PolicyServer(FakeBackend(), endpoint).start()
    client = PolicyClient(endpoint, {"state": ((STATE_DIM,), "float32")}, ACTION_DIM, hz=50, timeout_s=timeout_s,
                          heartbeat_s=0.05)
    return endpoint, server, client


def test_a_robot_waiting_for_a_lost_server_says_so_until_it_is_back(tmp_path, caplog, monkeypatch):
    """After "no reply ... reconnecting" the robot said nothing more while it waited (10 s in a probe);
    now a line every STILL_LOST_LOG_S, and the reconnect line says how long the server was gone."""
    from polcache_client import connection

    monkeypatch.setattr(connection, "STILL_LOST_LOG_S", 0.3)
    endpoint, server, client = ipc_server_and_robot(tmp_path, timeout_s=0.2)
    try:
        client.connect(timeout_s=2)
        server.stop()
        with caplog.at_level(logging.INFO, logger="polcache_client"):
            assert wait_for(lambda: client.poll() is not None and caplog.text.count("still no answer") >= 2,
                            timeout_s=3)
            server = PolicyServer(FakeBackend(), endpoint).start()
            assert wait_for(lambda: client.poll() is not None and client.ready, timeout_s=3)
        assert re.search(r"still no answer from ipc://\S+, \d+ s after the connection was lost \(handshake resent "
                         r"every 0\.05 s\)", caplog.text)
        assert re.search(r"connected to \S+ at ipc://\S+ \(epoch 1, \d+\.\d s after the connection was lost\)",
                         caplog.text)
    finally:
        client.close()
        server.stop()


def test_a_robot_that_a_restarted_server_forgot_says_how_it_learned_it(tmp_path, caplog):
    """A server restarted while the robot sat between episodes: the new server answered its heartbeats
    (any server does), so the robot learned of the restart from no_session on its next observation,
    and its reconnect line read "0.2 s after the connection was lost" after an 11 s outage."""
    endpoint, server, client = ipc_server_and_robot(tmp_path, timeout_s=0.5)
    try:
        client.connect(timeout_s=2)
        server.stop()
        server = PolicyServer(FakeBackend(), endpoint).start()
        time.sleep(0.3)  # the robot's heartbeats reach the new server, which answers them
        assert client.poll() is not None and client.ready
        with caplog.at_level(logging.INFO, logger="polcache_client"):
            client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, time.monotonic())
            assert wait_for(lambda: client.poll() is not None and client.epoch == 1 and client.ready, timeout_s=3)
        assert "server does not know this robot" in caplog.text
        assert re.search(r"connected to .* \(epoch 1, \d+\.\d s after the server said it did not know this robot\)",
                         caplog.text), caplog.text
    finally:
        client.close()
        server.stop()


def test_a_robot_that_paused_itself_does_not_blame_the_server_alone(server, caplog):
    """A robot frozen for 5 s logged "no reply from server for 5.03 s", as if the server had gone; the
    line now says the robot itself did not poll for most of that time. It still reconnects (the server
    may have closed the silent connection meanwhile)."""
    client = PolicyClient(server.endpoint, {"state": ((STATE_DIM,), "float32")}, ACTION_DIM, hz=50, timeout_s=0.2,
                          heartbeat_s=0.05)
    try:
        client.connect(timeout_s=2)
        client.poll()
        time.sleep(0.4)  # the robot's own loop stalls
        with caplog.at_level(logging.INFO, logger="polcache_client"):
            client.poll()
            assert re.search(r"no reply from server for 0\.\d\d s \(this robot did not poll for 0\.\d\d s of it: a "
                             r"pause here, such as a stalled loop or process, not necessarily the server\); "
                             r"reconnecting", caplog.text), caplog.text
            assert wait_for(lambda: client.poll() is not None and client.ready)
        # nor does the reconnect line, after its own line said the pause was the robot's
        assert re.search(r"connected to .* \(epoch 1, \d+\.\d s after the connection was lost\)", caplog.text)
    finally:
        client.close()


# A server whose inference takes 3 s, stopped by SIGTERM as `polcache serve` is; it exits with serve_forever's status.
SLOW_SERVER = r"""
import signal, sys
sys.path.insert(0, sys.argv[2])
from fakes import FakeBackend
from polcache.serve.server import INLINE_WINDOW, SHARED_NAME_CHECK_S, PolicyServer
server = PolicyServer(FakeBackend(delay_s=3.0), sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: server.stop())
print(server.endpoint, flush=True)
server.serve_forever()
"""


@pytest.mark.slow
def test_a_server_stopped_during_an_inference_while_its_robot_reconnects_exits_cleanly():
    """SIGTERM while a long inference ran: the server waited for it with its connections open and
    unread, the robot gave up and reconnected meanwhile, and libzmq aborted the process (exit 134,
    "Assertion failed: !_io_error"). The connections now close before the wait."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, "tcp://127.0.0.1:0", str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    endpoint = proc.stdout.readline().strip()
    client = PolicyClient(endpoint, {"state": ((STATE_DIM,), "float32")}, ACTION_DIM, hz=50, timeout_s=0.2,
                          heartbeat_s=0.05)
    try:
        client.connect(timeout_s=5)
        assert client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, 0.0)
        time.sleep(0.3)  # its inference is under way
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 3  # the robot goes on at 50 Hz: it times out and reconnects, as a robot does
        while time.monotonic() < end and proc.poll() is None:
            client.poll()
            client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, time.monotonic())
            time.sleep(0.02)
        _, err = proc.communicate(timeout=15)
    finally:
        client.close()
        proc.kill()
    assert proc.returncode == 0 and "Assertion" not in err, err


def test_a_stop_does_not_wait_forever_for_a_hung_inference(monkeypatch, caplog):
    """The stop waits WORKER_STOP_S for the inference under way; past it the worker is left behind
    (its socket closed by itself, never under its send) and the stop returns, saying so."""
    from polcache.serve import server as server_module

    monkeypatch.setattr(server_module, "WORKER_STOP_S", 0.2)
    server = PolicyServer(FakeBackend(delay_s=1.5), "tcp://127.0.0.1:0").start()
    peer = RawPeer(server.endpoint)
    try:
        peer.handshake()
        peer.send(observation(0))
        time.sleep(0.3)  # its inference is under way
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="polcache.serve.server"):
            server.stop()
        assert time.monotonic() - t0 < 1.0
    finally:
        peer.close()
    assert not server._thread.is_alive()
    assert "an inference was still running 0.2 s after the stop: left behind" in caplog.text


def test_a_stop_waits_out_the_worker_and_says_so_when_the_loop_itself_hangs(monkeypatch, caplog):
    """stop() waited a fixed 10 s, returning with the loop alive when WORKER_STOP_S (also 10 s) of
    waiting for the worker came on top of the loop's wake-up (a probe). Its wait is now derived
    from WORKER_STOP_S; a loop hung in an inline inference (no worker to leave behind) is said."""
    from polcache.serve import server as server_module

    monkeypatch.setattr(server_module, "WORKER_STOP_S", 0.2)
    backend = FakeBackend()
    server = PolicyServer(backend, "tcp://127.0.0.1:0").start()
    peer = RawPeer(server.endpoint)
    try:
        peer.handshake()
        seq = 0
        # fast ones until the next runs on the loop's thread (a window of 16 all under 1 ms: on a loaded
        # machine one may take longer, and the window must fill again)
        while not server._runs_inline() and seq < 20 * server_module.INLINE_WINDOW:
            assert isinstance(peer.request(observation(seq)), ActionChunk)
            seq += 1
        assert server._runs_inline()
        backend.delay_s = 3.0
        peer.send(observation(1000))  # newer than every fast one
        assert wait_for(lambda: backend.calls[-1]["state"][0, -1, 0] == 1000.0, 5)  # under way, inline
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="polcache.serve.server"):
            server.stop()
        assert 2.0 < time.monotonic() - t0 < 2.9 and server._thread.is_alive()
        assert "the server's loop was still running 2.2 s after the stop" in caplog.text
    finally:
        peer.close()
        server._thread.join(5)
    assert not server._thread.is_alive()


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:1")
    assert is_loopback(f"ipc://{tmp_path}/x") and not is_loopback("tcp://*:5555") and not is_loopback("tcp://10.0.0.2:1")
    with pytest.raises(InsecureBindError, match="polcache keys"):
        PolicyServer(FakeBackend(), "tcp://0.0.0.0:0")
    with PolicyServer(FakeBackend(), "tcp://0.0.0.0:0", insecure=True):
        pass


def test_curve_encrypted_session(tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys)
    with pytest.raises(PolcacheError, match="already exists"):
        generate_keys(keys)
    assert oct((keys / "server.key_secret").stat().st_mode)[-3:] == "600"
    spec = {"state": ((STATE_DIM,), "float32")}
    with PolicyServer(FakeBackend(), "tcp://0.0.0.0:0", keys_dir=str(keys)) as server:
        port = server.endpoint.rsplit(":", 1)[1]
        with PolicyClient(f"tcp://127.0.0.1:{port}", spec, ACTION_DIM, hz=50, keys_dir=str(keys)) as client:
            assert client.connect(timeout_s=3)["action_dim"] == ACTION_DIM
        plain = PolicyClient(f"tcp://127.0.0.1:{port}", spec, ACTION_DIM, hz=50)
        with pytest.raises(ConnectError, match="no answer"):
            plain.connect(timeout_s=0.5)
        plain.close()


def test_missing_keys_and_busy_ports_are_clear_errors(tmp_path):
    with pytest.raises(PolcacheError, match="polcache keys"):
        PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", keys_dir=str(tmp_path / "nokeys"))
    with PolicyServer(FakeBackend(), "tcp://127.0.0.1:0") as server:
        with pytest.raises(PolcacheError, match=f"cannot serve on {server.endpoint}"):
            PolicyServer(FakeBackend(), server.endpoint)


def handshake_map(**override) -> bytes:
    obj = {"v": PROTOCOL_VERSION, "type": "handshake", "obs_spec": {"state": {"shape": [STATE_DIM], "dtype": "float32"}},
           "action_dim": ACTION_DIM, "hz": 50.0, "name": "x"}
    obj.update(override)
    return msgpack.packb(obj)


@pytest.mark.parametrize("frame, fragment", [
    (handshake_map(hz=5e-324), "handshake.hz must be in [0.01, 10000] Hz"),  # would make every due time infinite
    (handshake_map(hz=1e9), "handshake.hz"),
    (handshake_map(action_dim=0), "handshake.action_dim must be in 1..65536"),
    (obs_map(seq=-1), "obs.seq must be in 0..2^63-1"),
    (obs_map(epoch=2**64 - 1), "obs.epoch"),
    (obs_map(t_capture=1e300), "obs.t_capture must be within"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "heartbeat", "t": -1e13}), "heartbeat.t"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "reset", "epoch": -3}), "reset.epoch"),
])
def test_numbers_out_of_range_are_refused_by_name(server, frame, fragment):
    p = RawPeer(server.endpoint)
    assert isinstance(p.handshake(), Welcome)
    reply = p.request(frame)
    assert isinstance(reply, Error) and reply.code == "out_of_range" and fragment in reply.message, reply
    assert_still_serving(p)
    p.close()


def test_field_errors_of_an_observation_carry_its_seq(peer):
    reply = peer.request(obs_map(seq=77, t_capture="soon"))
    assert reply.code == "bad_type" and reply.seq == 77
    reply = peer.request(obs_map(seq=78, arrays={"state": {"dtype": "float32", "shape": [-1], "data": b""}}))
    assert reply.code == "bad_array" and reply.seq == 78


def test_the_first_documented_field_wins_when_several_are_wrong(peer):
    # epoch comes before seq and t_capture in the obs table: it is the one named, every time.
    for _ in range(5):
        reply = peer.request(obs_map(epoch="a", seq="b", t_capture="c"))
        assert reply.code == "bad_type" and reply.message.startswith("obs.epoch") and reply.seq is None


def test_an_observation_that_is_not_newer_gets_an_error(peer):
    assert isinstance(peer.request(obs_map(seq=57)), ActionChunk)
    for seq in (57, 3):  # a repeat; a robot counting from the start again without a new epoch
        reply = peer.request(obs_map(seq=seq))
        assert isinstance(reply, Error) and reply.code == "stale_seq" and reply.seq == seq
        assert f"obs.seq {seq} is not newer than this epoch's last, 57" in reply.message
    assert isinstance(peer.request(obs_map(seq=58)), ActionChunk)


def test_observation_of_an_ended_epoch_gets_an_error(peer):
    from polcache_client.protocol import Reset

    assert isinstance(peer.request(msgpack.packb({"v": PROTOCOL_VERSION, "type": "reset", "epoch": 5})), Reset)
    reply = peer.request(obs_map(epoch=4, seq=9))
    assert isinstance(reply, Error) and reply.code == "stale_epoch" and reply.seq == 9
    assert "older than this session's epoch 5" in reply.message
    # a reset to an older epoch is refused and changes nothing; the current one may be repeated (a retry)
    reply = peer.request(msgpack.packb({"v": PROTOCOL_VERSION, "type": "reset", "epoch": 3}))
    assert isinstance(reply, Error) and reply.code == "stale_epoch" and "reset.epoch 3 is older" in reply.message
    assert peer.request(obs_map(epoch=3, seq=10)).code == "stale_epoch"
    assert isinstance(peer.request(msgpack.packb({"v": PROTOCOL_VERSION, "type": "reset", "epoch": 5})), Reset)
    assert isinstance(peer.request(obs_map(epoch=5, seq=11)), ActionChunk)


def test_a_flooding_peer_is_muted_while_others_are_served(server, peer, caplog):
    """A peer sending far more than its declared rate while others are served has its messages
    dropped unread for the next second, and is told so once; it is heard again once it slows."""
    records = []
    server.on_record = records.append
    flooder = RawPeer(server.endpoint)
    flooder.handshake(name="flooder")  # 50 Hz: 4 * 50 + 20 = 220 messages a second allowed
    heartbeat = encode(Heartbeat(t=1.0))
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        deadline = time.monotonic() + 3.0
        told = None
        next_beat = 0.0
        while told is None and time.monotonic() < deadline:  # flood until a window closes and mutes it
            for _ in range(50):
                flooder.send(heartbeat)
            if time.monotonic() >= next_beat:  # the robot beside it is heard in the window too, at 50 Hz
                peer.send(heartbeat)
                next_beat = time.monotonic() + 0.02
            while flooder.socket.poll(0):
                reply = decode(flooder.socket.recv())
                if type(reply) is Error:
                    told = reply
            while peer.socket.poll(0):
                peer.socket.recv()
        assert told is not None and told.code == "rate_limited" and "more than 220 messages in one second" in told.message
        assert "flooder (session" in caplog.text and "dropped unread until it sends fewer" in caplog.text
        # each message dropped is counted as refused (they were in no metric: "refused messages: none")
        assert {(r.robot, r.code) for r in records if r.kind == "error"} == {("flooder", "rate_limited")}
        while peer.socket.poll(200):  # the echoes of its heartbeats
            peer.socket.recv()
        assert_still_serving(peer)
    flooder.close()


def test_a_flooding_peer_without_a_handshake_is_named_as_the_others_are(server, peer, caplog):
    """Its flood line named a bare routing id, where every other line says "(no handshake) (session ID)"."""
    flooder = RawPeer(server.endpoint)
    heartbeat = encode(Heartbeat(t=1.0))
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        deadline = time.monotonic() + 3.0
        while "messages in one second" not in caplog.text and time.monotonic() < deadline:
            for _ in range(50):
                flooder.send(heartbeat)
            peer.send(heartbeat)
            time.sleep(0.02)
            for sock in (flooder.socket, peer.socket):
                while sock.poll(0):
                    sock.recv()
    line = next(r.getMessage() for r in caplog.records if "messages in one second" in r.getMessage())
    assert line.startswith("(no handshake) (session ") and "more than its 100" in line, line
    flooder.close()


def test_the_flood_guard_mutes_only_beside_others_and_hears_a_peer_that_slowed_down():
    guard = FloodGuard()
    allowed = {b"robot": allowance(50.0), b"flooder": allowance(50.0), b"stranger": allowance(None)}.__getitem__
    assert allowed(b"robot") == 220 and allowed(b"stranger") == 100
    guard.counts = {b"flooder": 5000}
    assert guard.new_window(allowed) == {} and not guard.muted  # alone: no one to starve
    guard.counts = {b"flooder": 5000, b"robot": 60, b"stranger": 101}
    assert guard.new_window(allowed) == {b"flooder": 5000, b"stranger": 101}
    assert guard.muted == {b"flooder", b"stranger"} and guard.counts == {}
    guard.told.add(b"flooder")
    guard.counts = {b"flooder": 5000, b"robot": 60}  # still flooding (its dropped messages count): muted, not new
    assert guard.new_window(allowed) == {} and guard.muted == {b"flooder"} and not guard.told
    guard.counts = {b"flooder": 10, b"robot": 60}  # slowed down: heard again
    assert guard.new_window(allowed) == {} and not guard.muted


def test_a_peer_alone_is_never_muted(server, peer):
    """A benchmark's ping-pong or a fast robot alone on its server is no flood."""
    for seq in range(400):
        assert type(peer.request(encode(Heartbeat(t=float(seq))))) is Heartbeat
    time.sleep(1.1)
    assert_still_serving(peer)
    assert not server._flood.muted


def test_a_state_far_outside_the_training_range_is_refused_by_name_and_the_robot_goes_on():
    """The shipped DP-T served: a state of 1e3 (a sensor fault) is answered with an `inference` error
    naming the key, the dimension and the training range, not with saturated actions; the robot's
    next, sane observation gets its chunk from a window without the bad frame."""
    from polcache.policy import load_backend

    backend = load_backend(str(Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"))
    zeros = np.zeros(39, np.float32)
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        p = RawPeer(server.endpoint)
        hello = Handshake(obs_spec={"state": ((39,), "float32")}, action_dim=4, hz=50.0, name="arm")
        assert isinstance(p.request(encode(hello)), Welcome)
        assert isinstance(p.request(observation(1, state=zeros)), ActionChunk)
        faulty = zeros.copy()
        faulty[5] = 1e3
        reply = p.request(observation(2, state=faulty))
        assert reply.code == "inference" and reply.seq == 2
        assert re.search(r"observation 'state'\[5\] is 1000: the policy was trained on .* a sensor fault", reply.message)
        chunk = p.request(observation(3, state=zeros))
        assert isinstance(chunk, ActionChunk) and chunk.obs_seqs == [3, 3]
        p.close()


@pytest.mark.parametrize("stall_s, reconnects", [(0.4, False), (1.6, True)])
def test_after_a_network_stall_the_robot_never_acts_on_stale_actions(stall_s, reconnects):
    """The link stalls with its connections open (TCP then delivers everything held, late): the robot
    holds, stops once, and resumes with fresh actions only; what was computed for observations sent
    before or during the stall comes too late and is dropped. A stall over the robot's timeout ends
    in a reconnect, which the old connection's late chunks cannot cross."""
    robot, ticks = StepRobot(50), []
    gc.collect()  # a full collection of what earlier tests left paused the process ~300 ms mid-run: a second stop
    with PolicyServer(FakeBackend(), "tcp://127.0.0.1:0") as server, \
            StallingLink(int(server.endpoint.rsplit(":", 1)[1])) as link:
        client = PolicyClient(link.address, robot.obs_spec, robot.action_dim, hz=50, timeout_s=0.8)
        try:
            client.connect(timeout_s=2)
            loop = ControlLoop(robot, client, 50, watchdog=Watchdog(hold_s=0.1), on_tick=ticks.append)
            loop.run(ticks=25, then_stop=False)
            link.stalled.set()
            loop.run(seconds=stall_s, then_stop=False)
            stalled_until = robot.tick
            link.stalled.clear()
            loop.run(until=lambda: len(ticks) > 500 or (robot.tick > stalled_until + 10 and ticks[-1].state == "fresh"),
                     then_stop=False)
            loop.run(ticks=20, then_stop=False)
        finally:
            client.close()
    assert ticks[-1].state == "fresh"
    assert len(robot.stops) == 1 and stalled_until > robot.stops[0]  # held, then one safe stop, while stalled
    resumed = [(t, v) for t, v in robot.applied if t > robot.stops[0]]
    assert resumed and all(v == t for t, v in resumed)  # on time: no action computed before the link came back
    assert all(v <= t for t, v in robot.applied)  # fresh or held, never ahead of its step
    # an epoch for the safe stop, and another for the reconnect
    assert (client.connections == 2) == reconnects and client.epoch == 1 + reconnects


def test_after_a_safe_stop_the_policy_plans_from_frames_of_the_stopped_robot_only():
    """Chunks lost on the way (a link gone quiet) until the watchdog stopped the robot: the first chunk it
    acted on after the stop was computed from a window holding a frame of the robot still in motion, and
    the server's executed actions and real-time-chunking plan were those of before the stop. The stop
    starts a new epoch, so the server starts the robot's history afresh."""
    hz = 50.0
    robot = StepRobot(hz)
    windows = []  # per inference: the ticks of its frames, oldest first

    class Recording(FakeBackend):
        def predict(self, obs, seed=None, past_actions=None):
            windows.append(obs["state"][0, :, 0].tolist())
            return super().predict(obs, seed, past_actions)

    with PolicyServer(Recording(), "tcp://127.0.0.1:0") as server, \
            PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz, name="arm") as client:
        client.connect(timeout_s=10)
        poll = client.poll
        client.poll = lambda: [] if 20 <= robot.tick < 40 else poll()  # lost on the way: the watchdog stops it
        ControlLoop(robot, client, hz, watchdog=Watchdog(0.1)).run(until=lambda: robot.tick >= 60)
    stop = robot.stops[0]
    assert 20 < stop < 40 and len(robot.stops) == 2  # the watchdog's, then run()'s at the end
    assert any(newest > stop for *_, newest in windows) and robot.applied[-1][0] > 40
    assert all(oldest > stop for oldest, *_, newest in windows if newest > stop)  # no frame of the robot moving


def test_the_last_line_of_a_burst_is_said_once_its_interval_has_passed(monkeypatch, caplog):
    """A robot safe-stopped as its server went away, 4 s after a routine stop: that stop's line was
    held back by the 5 s limit and said only with the next stop, 32 s later, once reconnected (an
    operator reading the log could not tell whether the robot had held still)."""
    from polcache_client import logs

    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    log = logs.RateLimitedLog(logging.getLogger("polcache.test"), interval_s=5.0)
    with caplog.at_level(logging.INFO, logger="polcache.test"):
        for t, message in ((0.0, "stop 1"), (3.0, "stop 2"), (4.0, "stop 3")):
            clock[0] = 100.0 + t
            log.warning("safe-stop", message)
            log.flush()
        clock[0] = 104.9
        log.flush()  # within the interval: still held
        assert [r.message for r in caplog.records] == ["stop 1"]
        clock[0] = 105.0
        log.flush()
        log.flush()  # said once
        clock[0] = 136.0
        log.warning("safe-stop", "stop 4")  # no count of what was already said
    assert [r.message for r in caplog.records] == [
        "stop 1", "stop 3 (logged 1.0 s after it happened, held back by the rate limit; 1 similar before it suppressed)",
        "stop 4"]


def test_a_problem_that_goes_on_is_said_ever_less_often_up_to_the_longest_interval(monkeypatch, caplog):
    """A server overloaded all night said its late chunks 35 times a minute (50,000 lines by the
    morning): while a problem goes on without a pause its interval doubles, up to `longest_s`; after a
    pause it is said at once and every interval_s again."""
    from polcache_client import logs

    clock = [0.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    log = logs.RateLimitedLog(logging.getLogger("polcache.test"), longest_s=8.0)
    with caplog.at_level(logging.INFO, logger="polcache.test"):
        for tick in range(400):  # every 0.1 s for 40 s
            clock[0] = tick / 10
            log.warning("late", "late")
        clock[0] = 100.0  # a minute's pause, then again
        log.warning("late", "late")
        clock[0] = 100.5
        log.warning("late", "late")
        clock[0] = 101.0
        log.warning("late", "late")
    assert [r.getMessage() for r in caplog.records] == [
        "late", "late (9 similar suppressed)", "late (19 similar suppressed in the last 2 s)",
        "late (39 similar suppressed in the last 4 s)", *["late (79 similar suppressed in the last 8 s)"] * 4,
        "late (9 similar suppressed after the last such line, 61 s ago)",
        "late (1 similar suppressed)"]  # every interval_s again


def test_a_burst_that_ends_is_said_with_its_count_and_the_problem_back_is_said_at_once(monkeypatch, caplog):
    """Late chunks at 3 a second for a minute, then none for 40 s: the burst's count waited for the
    next line, which came 14 s after the problem was back (its interval still a minute) and read
    "(61 similar suppressed in the last 60 s)", 40 of them a pause."""
    from polcache_client import logs

    clock = [0.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    log = logs.RateLimitedLog(logging.getLogger("polcache.test"), longest_s=60.0)
    with caplog.at_level(logging.INFO, logger="polcache.test"):
        for tick in range(181):  # 60 s, 3 a second
            clock[0] = tick / 3
            log.warning("late", "late")
            log.flush()
        said = len(caplog.records)
        clock[0] = 61.0
        log.flush()  # 1 s without it: not yet a pause
        assert len(caplog.records) == said
        clock[0] = 62.1
        log.flush()  # a pause: the burst's last line, with its count
        clock[0] = 100.0
        log.warning("late", "late")  # back: at once
        clock[0] = 100.4
        log.warning("late", "late")
        clock[0] = 101.0
        log.warning("late", "late")  # every second again
    lines = [r.getMessage() for r in caplog.records]
    assert lines[said].startswith("late (logged 2.1 s after it happened, held back by the rate limit; ")
    assert lines[said + 1:] == ["late", "late (1 similar suppressed)"]


def test_a_server_flushing_every_second_still_says_a_problem_that_goes_on_ever_less_often(monkeypatch, caplog):
    """The server flushes its held lines once a second: where the flush, not the next occurrence, said a
    line, the interval stayed a second, and an overloaded night was 3,600 lines an hour again."""
    from polcache_client import logs

    clock = [0.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    log = logs.RateLimitedLog(logging.getLogger("polcache.test"), longest_s=60.0)
    with caplog.at_level(logging.INFO, logger="polcache.test"):
        for tick in range(2 * 600):  # twice a second for 10 minutes, the housekeeping's flush just before each
            clock[0] = tick / 2
            log.flush()
            log.warning("late", "late")
    assert 12 <= len(caplog.records) <= 18  # 1, 2, 4 .. 32 s, then once a minute


def test_a_count_of_suppressed_lines_says_when_they_were_if_long_ago(monkeypatch, caplog):
    """A robot under a fixed routing id whose handshakes piled up while the server warmed up, then
    restarted 41 s later: its connect line said "(15 similar suppressed)", as if just now."""
    from polcache_client import logs

    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    say = logs.RateLimitedLog(logging.getLogger("polcache.test")).info
    with caplog.at_level(logging.INFO, logger="polcache.test"):
        for dt in (0.0, 0.1, 0.2, 1.5, 1.6, 45.0):
            clock[0] = 100.0 + dt
            say("hello", "connected")
    assert [r.message for r in caplog.records] == ["connected", "connected (2 similar suppressed)",
                                                   "connected (1 similar suppressed after the last such line, 44 s ago)"]
