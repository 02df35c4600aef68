"""Instructions over the wire (protocol version 3): at handshake and per episode, checked by name."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from fakes import FakeBackend, RawPeer, fake_spec
from polcache.policy.language import decode_instruction
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


def test_server_adds_the_robots_instruction_to_every_observation_and_resets_change_it():
    backend = FakeBackend(language_spec())
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        peer = RawPeer(server.endpoint)
        refused = peer.request(hello())  # the policy needs an instruction and the server has no default
        assert isinstance(refused, P.Error) and refused.code == "bad_instruction"
        assert "handshake.instruction: the hosted policy follows an instruction" in refused.message
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
        peer.close()


def test_older_robots_get_the_servers_default_instruction_and_policies_without_language_ignore_it():
    backend = FakeBackend(language_spec())
    with PolicyServer(backend, "tcp://127.0.0.1:0", instruction="reach") as server:
        peer = RawPeer(server.endpoint)
        assert isinstance(peer.request(hello(version=2)), P.Welcome)
        assert isinstance(peer.request(P.encode(P.Observation(epoch=0, seq=0, t_capture=1.0,
                                                              arrays={"state": np.zeros(3, np.float32)}), 2)),
                          P.ActionChunk)
        assert decode_instruction(backend.calls[-1]["instruction"][0, -1]) == "reach"
        peer.close()
    with pytest.raises(P.ProtocolError, match="--instruction: 33 UTF-8 bytes, at most 16"):
        PolicyServer(backend, "tcp://127.0.0.1:0", instruction="x" * 33)
    plain = FakeBackend()
    with PolicyServer(plain, "tcp://127.0.0.1:0") as server:
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


def _wait(done, timeout_s: float = 5.0) -> None:
    import time

    end = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)
