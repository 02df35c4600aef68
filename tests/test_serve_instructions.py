"""Instructions over the wire (protocol version 3): at handshake and per episode, checked by name."""

from __future__ import annotations

import dataclasses
import logging

import msgpack
import numpy as np
import pytest

from fakes import FakeBackend, RawPeer, fake_spec
from polcache.policy.language import InstructionError, decode_instruction
from polcache.policy.spec import ArraySpec
from polcache.serve.server import PolicyServer
from polcache_client import PolicyClient
from polcache_client import protocol as P

STATE = {"state": ((3,), "float32")}


def language_spec(length: int = 16):
    spec = fake_spec()
    return dataclasses.replace(spec, obs={**spec.obs, "instruction": ArraySpec((length,), "uint8")})


def hello(instruction=None, version: int = P.PROTOCOL_VERSION) -> bytes:
    return P.encode(P.Handshake(obs_spec=STATE, action_dim=2, hz=50.0, name="arm", instruction=instruction), version)


def observation(seq: int, epoch: int = 0) -> bytes:
    return P.encode(P.Observation(epoch=epoch, seq=seq, t_capture=1.0 + seq,
                                  arrays={"state": np.array([seq, 0, 0], np.float32)}))


def test_protocol_carries_instructions_from_version_3_and_names_bad_ones():
    msg, version = P.decode_versioned(hello("öffne die Tür"))
    assert version == 3 and msg.instruction == "öffne die Tür"
    assert P.decode(hello("x", version=2)).instruction is None  # version 2 has no such field
    assert P.decode(P.encode(P.Reset(epoch=3, instruction="close it"))).instruction == "close it"
    minimal = msgpack.packb({"v": 3, "type": "reset", "epoch": 1})  # optional: a minimal robot leaves it out
    assert P.decode(minimal).instruction is None
    bad_utf8 = msgpack.packb({"v": 3, "type": "reset", "epoch": 1, "instruction": None})
    bad_utf8 = bad_utf8.replace(b"\xc0", b"\xa2\xff\xfe")  # nil -> a 2-byte string that is not UTF-8
    with pytest.raises(P.ProtocolError, match=r"reset.instruction is not valid UTF-8") as exc:
        P.decode(bad_utf8)
    assert exc.value.code == "bad_type"
    with pytest.raises(P.ProtocolError, match=r"handshake.instruction must be at most 1024 UTF-8 bytes") as exc:
        P.decode(hello("ü" * 513))
    assert exc.value.code == "out_of_range"
    with pytest.raises(P.ProtocolError, match="handshake.instruction must be a string or nil"):
        P.decode(msgpack.packb({"v": 3, "type": "handshake", "obs_spec": {"state": {"shape": [3], "dtype": "float32"}},
                                "action_dim": 2, "hz": 50.0, "name": "a", "instruction": 7}))


def test_server_adds_the_robots_instruction_to_every_observation_and_resets_change_it(caplog):
    backend = FakeBackend(language_spec())
    with caplog.at_level(logging.INFO, logger="polcache.serve"), PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        peer = RawPeer(server.endpoint)
        refused = peer.request(hello())  # the policy needs an instruction and the server has no default
        assert isinstance(refused, P.Error) and refused.code == "bad_instruction"
        assert "handshake.instruction: the hosted policy follows an instruction" in refused.message
        as_key = peer.request(P.encode(P.Handshake(obs_spec={**STATE, "instruction": ((16,), "uint8")}, action_dim=2,
                                                    hz=50.0, name="arm")))
        assert as_key.code == "spec_mismatch" and "goes in handshake.instruction" in as_key.message
        too_long = peer.request(hello("push the puck to the goal"))  # 25 bytes, the policy reads 16
        assert too_long.code == "bad_instruction" and "handshake.instruction: 25 UTF-8 bytes, at most 16" in too_long.message
        assert isinstance(peer.request(hello("push the puck")), P.Welcome)
        assert isinstance(peer.request(observation(0)), P.ActionChunk)
        assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "push the puck"
        bad = peer.request(P.encode(P.Reset(epoch=1, instruction="open the drawer, please")))
        assert bad.code == "bad_instruction" and "reset.instruction" in bad.message
        assert isinstance(peer.request(observation(1)), P.ActionChunk)  # still served, same instruction
        assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "push the puck"
        assert isinstance(peer.request(P.encode(P.Reset(epoch=1, instruction="open drawer"))), P.Reset)
        assert isinstance(peer.request(observation(0, epoch=1)), P.ActionChunk)
        assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "open drawer"
        assert isinstance(peer.request(P.encode(P.Reset(epoch=2, instruction="open drawer"))), P.Reset)  # unchanged
        peer.close()
    # what the policy is told, for the operator: the server's default (none here), each robot's, each change
    assert "robots must send an instruction (no --instruction default)" in caplog.text
    assert "connected (50 Hz), following 'push the puck'" in caplog.text
    assert caplog.text.count("follows 'open drawer' from epoch") == 1  # a change, once
    assert "open the drawer, please' from" not in caplog.text  # refused: no change


def test_older_robots_get_the_servers_default_instruction_and_policies_without_language_ignore_it(caplog):
    backend = FakeBackend(language_spec())
    with (caplog.at_level(logging.INFO, logger="polcache.serve"),
          PolicyServer(backend, "tcp://127.0.0.1:0", instruction="reach") as server):
        peer = RawPeer(server.endpoint)
        assert isinstance(peer.request(hello(version=2)), P.Welcome)
        assert isinstance(peer.request(P.encode(P.Observation(epoch=0, seq=0, t_capture=1.0,
                                                              arrays={"state": np.zeros(3, np.float32)}), 2)),
                          P.ActionChunk)
        assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "reach"
        peer.close()
    assert "robots that send no instruction follow 'reach'" in caplog.text
    assert "connected (50 Hz), following the server's instruction 'reach'" in caplog.text
    for bad, why in (("x" * 33, "33 UTF-8 bytes, at most 16"), ("", "empty instruction"),
                     ("go \udcff", "not encodable as UTF-8")):  # "\udcff": a non-UTF-8 byte from argv
        with pytest.raises(InstructionError, match=f"--instruction: {why}"):  # a PolcacheError: one CLI line
            PolicyServer(backend, "tcp://127.0.0.1:0", instruction=bad)
    plain = FakeBackend()
    with pytest.raises(InstructionError, match="--instruction: this policy takes no instruction"):
        PolicyServer(plain, "tcp://127.0.0.1:0", instruction="reach")  # the operator's: refused, not ignored
    with PolicyServer(plain, "tcp://127.0.0.1:0") as server:  # a robot's: ignored (a mixed fleet)
        with PolicyClient(server.endpoint, STATE, 2, hz=50, instruction="anything") as client:
            client.connect(timeout_s=5)
            assert "instruction" not in client.policy["obs"]


def test_client_sends_its_instruction_at_handshake_and_reset():
    backend = FakeBackend(language_spec())
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        with PolicyClient(server.endpoint, STATE, 2, hz=50, instruction="push") as client:
            client.connect(timeout_s=5)
            assert client.send_observation({"state": np.zeros(3, np.float32)}, 1.0)
            _wait(lambda: client.poll() or backend.calls)
            assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "push"
            client.reset("pull")
            assert client.send_observation({"state": np.zeros(3, np.float32)}, 2.0)
            _wait(lambda: client.poll() and decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "pull")
        with PolicyClient(server.endpoint, STATE, 2, hz=50) as client:
            from polcache_client.connection import ConnectError

            with pytest.raises(ConnectError, match="follows an instruction"):
                client.connect(timeout_s=5)


BAD_INSTRUCTIONS = [("go \udcff", r"instruction: not encodable as UTF-8 \(lone surrogate\)"),  # $'go \xff' in a shell
                    (b"go", "instruction: expected a string, got bytes"), ("", "instruction: empty"),
                    (" \t", "instruction: empty"), ("a\0b", "instruction: contains a NUL"),
                    (" " * 1030 + "go", "instruction: more than 1024 UTF-8 bytes")]


def test_client_refuses_locally_what_the_server_would_and_keeps_its_instruction():
    """Refused before anything changes (epoch, the instruction a reconnect sends), once welcomed also
    what the policy cannot read: no traceback from the encoder, no text kept that the server refuses."""
    backend = FakeBackend(language_spec(16))
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        for bad, match in BAD_INSTRUCTIONS:
            with pytest.raises(P.ProtocolError, match=match) as exc:
                PolicyClient(server.endpoint, STATE, 2, hz=50, instruction=bad)
            assert exc.value.code == "bad_instruction"
        with PolicyClient(server.endpoint, STATE, 2, hz=50, instruction="push") as client:
            for bad, match in BAD_INSTRUCTIONS:
                with pytest.raises(P.ProtocolError, match=match):
                    client.reset(bad)
            client.connect(timeout_s=5)  # the handshake still carries "push"
            with pytest.raises(P.ProtocolError, match="instruction: 17 UTF-8 bytes, at most 16 allowed"):
                client.reset("x" * 17)  # the welcome says the policy reads 16 bytes
            assert client.epoch == 0 and client.seq == -1
            assert client.send_observation({"state": np.zeros(3, np.float32)}, 1.0)
            _wait(lambda: client.poll() or backend.calls)
            assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "push"


class ScriptedServer:
    """A bare ROUTER answering a client's messages as told: a server that refuses instructions the
    client cannot know it will (the reference server's refusals the client foresees)."""

    def __init__(self):
        import zmq

        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.robot = b""

    def answer(self, client: PolicyClient, reply) -> P.Message:
        """Poll `client` until a message other than a heartbeat arrives; send it `reply(message)`
        (unless None) and return the message."""
        import time

        end = time.monotonic() + 5
        while time.monotonic() < end:
            client.poll()
            if self.socket.poll(10):
                self.robot, frame = self.socket.recv_multipart()
                msg = P.decode(frame)
                answer = msg if isinstance(msg, P.Heartbeat) else reply(msg)
                if answer is not None:
                    self.socket.send_multipart([self.robot, P.encode(answer)])
                if not isinstance(msg, P.Heartbeat):
                    return msg
        raise AssertionError("timed out")

    def reconnect(self, client: PolicyClient) -> P.Handshake:
        """Forget the client (as a restarted server does): the handshake it then sends."""
        self.socket.send_multipart([self.robot, P.encode(P.Error(code="no_session", message="restarted", seq=None))])
        return self.answer(client, self.welcome)

    def welcome(self, msg: P.Message) -> P.Message:
        return P.Welcome(policy={}, max_message_bytes=P.DEFAULT_MAX_MESSAGE_BYTES, server="scripted")

    def close(self) -> None:
        self.socket.close(linger=0)


def test_a_refused_reset_instruction_is_dropped_so_a_reconnect_asks_for_the_one_the_server_follows():
    """A refused reset keeps the server on the previous instruction; a client that kept the refused
    one would send it in its next handshake, be refused for good, and its loop would safe-stop."""
    server = ScriptedServer()

    def refuse_pull(msg: P.Message) -> P.Message:
        if "pull" in msg.instruction:
            return P.Error(code="bad_instruction", message="reset.instruction: not this one", seq=None)
        return msg  # the echo: accepted

    with PolicyClient(server.endpoint, STATE, 2, hz=50, instruction="push", timeout_s=30) as client:
        assert server.answer(client, server.welcome).instruction == "push"
        client.connect(timeout_s=5)
        client.reset("pull")
        server.answer(client, refuse_pull)
        assert server.reconnect(client).instruction == "push"
        client.connect(timeout_s=5)
        client.reset("open")  # accepted, then one refused: answered in order
        client.reset("pull it")
        assert [server.answer(client, refuse_pull).instruction for _ in range(2)] == ["open", "pull it"]
        assert server.reconnect(client).instruction == "open"
        client.connect(timeout_s=5)
        client.reset("pull again")  # refused, then a later one accepted
        client.reset("close")
        server.answer(client, refuse_pull)
        server.answer(client, refuse_pull)
        assert server.reconnect(client).instruction == "close"
    server.close()


def test_a_reset_that_found_the_send_queue_full_goes_before_the_epochs_first_observation():
    """Its instruction was lost: the next observation started the new epoch under the previous
    instruction, which the policy then followed for the whole episode (an outside review)."""
    server = ScriptedServer()
    state = {"state": np.zeros(3, np.float32)}
    with PolicyClient(server.endpoint, STATE, 2, hz=50, instruction="push", timeout_s=30) as client:
        server.answer(client, server.welcome)
        client.connect(timeout_s=5)
        send, full = client._send, [True, True]  # the queue is full for the reset, then for its first resend
        client._send = lambda frame: send(frame) if not (full and full.pop()) else False
        assert client.reset("pull") == 1
        assert not client.send_observation(state, 1.0)  # neither the reset nor, without it, the observation
        assert client.send_observation(state, 2.0)
        reset = server.answer(client, lambda msg: msg)
        assert isinstance(reset, P.Reset) and (reset.epoch, reset.instruction) == (1, "pull")
        obs = server.answer(client, lambda msg: None)
        assert isinstance(obs, P.Observation) and (obs.epoch, obs.seq) == (1, 1)
        full[:] = [True]  # held again, then carried on by a reset without an instruction
        client.reset("open")
        client.reset()
        assert client.send_observation(state, 3.0)
        reset = server.answer(client, lambda msg: P.Error(code="bad_instruction", message="not now", seq=None))
        assert (reset.epoch, reset.instruction) == (3, "open")
        server.answer(client, lambda msg: None)
        assert server.reconnect(client).instruction == "pull"  # the refused one is forgotten
    server.close()


def _wait(done, timeout_s: float = 5.0) -> None:
    import time

    end = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_serve_refuses_a_bad_instruction_in_one_line(tmp_path, capsys):
    from helpers import tiny_vla
    from polcache.cli import main
    from polcache.config import ExperimentConfig
    from polcache.policy import save_checkpoint

    policy = tiny_vla()
    ckpt = save_checkpoint(tmp_path / "vla", ExperimentConfig(task="test", policy=policy.cfg,
                                                                 obs_keys=policy.obs_keys), policy)
    assert main(["serve", "--checkpoint", str(ckpt), "--bind", "tcp://127.0.0.1:0", "--instruction", ""]) == 2
    err = capsys.readouterr().err
    assert err == "polcache serve: error: --instruction: empty instruction\n"
