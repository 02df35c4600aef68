"""10,000+ random and mutated messages: the server never crashes, never grows, and still
answers a valid observation afterwards."""

from __future__ import annotations

import collections
import gc
import random
import tracemalloc

import msgpack
import numpy as np
import zmq

from fakes import STATE_DIM, FakeBackend, RawPeer, observation
from polcache.serve.server import PolicyServer
from polcache_client.protocol import (ActionChunk, Error, Handshake, Heartbeat, Reset, Welcome, encode,
                                      encode_array)

N_WARMUP = 1000
N_FUZZ = 10_000


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 1:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), -float("inf"), 1e308])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.randbytes(rng.randrange(64))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.choice([msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(8))),
                           msgpack.Timestamp(rng.randrange(2**32))])
    if kind == 6:
        return {"dtype": rng.choice(["float32", "uint8", "object", "<U4", "complex64", 7]),
                "shape": [rng.randrange(-2, 5) for _ in range(rng.randrange(4))], "data": rng.randbytes(rng.randrange(40))}
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {rng.choice(["state", "v", "type", "seq", "x"]): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"state": encode_array(np.array([rng.choice([0.0, np.nan, np.inf, 1.0])] * STATE_DIM, np.float32))}


def _valid_messages(seq: int) -> list:
    return [
        Handshake(obs_spec={"state": ((STATE_DIM,), "float32")}, action_dim=2, hz=50.0, name="fuzz"),
        Welcome(policy={}, max_message_bytes=10, server="x"),
        ActionChunk(epoch=0, seq=seq, obs_seqs=[seq], t_capture=0.0, t_actions=np.zeros(2), actions=np.zeros((2, 2), np.float32), timing={}),
        Heartbeat(t=1.0),
        Reset(epoch=0),
        Error(code="x", message="y", seq=None),
    ]


def fuzz_frames(rng: random.Random, start: int, n: int):
    for i in range(start, start + n):  # sequence numbers keep increasing, so valid observations count
        strategy = rng.randrange(7)
        if strategy == 0:
            yield [rng.randbytes(rng.randrange(200))]
        elif strategy == 1:  # a valid observation (answered with a chunk) or other message, byte-mutated
            data = bytearray(observation(i) if rng.random() < 0.5 else encode(rng.choice(_valid_messages(i))))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                pos = rng.randrange(len(data) + 1)
                if op == 0 and pos < len(data):
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    del data[pos:]
                else:
                    data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
            yield [bytes(data)]
        elif strategy == 2:  # structurally mutated map
            obj = msgpack.unpackb(observation(i) if rng.random() < 0.6 else encode(rng.choice(_valid_messages(i))))
            for _ in range(rng.randrange(1, 3)):
                key = rng.choice(list(obj) + ["extra"])
                if rng.random() < 0.3 and key in obj:
                    del obj[key]
                else:
                    obj[key] = _random_value(rng)
            yield [msgpack.packb(obj)]
        elif strategy == 3:  # deep nesting, huge length claims, non-map top level
            yield [rng.choice([b"\x91" * 5000 + b"\xc0", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                               msgpack.packb(_random_value(rng)), b"\xdd\x7f\xff\xff\xff" + b"\x00" * 10])]
        elif strategy == 4:  # several frames
            yield [observation(i)] * rng.randrange(2, 4)
        elif strategy == 5:
            yield [observation(i)]
        else:
            yield [encode(rng.choice(_valid_messages(i)))]


def _pump(peer: RawPeer, frames_iter) -> tuple[int, int]:
    sent = replies = 0
    for frames in frames_iter:
        peer.socket.send_multipart(frames)
        sent += 1
        while peer.socket.poll(0):
            peer.socket.recv()
            replies += 1
    while peer.socket.poll(200):
        peer.socket.recv()
        replies += 1
    return sent, replies


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_fuzzed_messages_never_crash_or_grow_the_server():
    rng = random.Random(1234)
    handled = collections.Counter()
    server = PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", on_record=lambda r: handled.update([r.kind])).start()
    peer = RawPeer(server.endpoint)
    peer.socket.setsockopt(zmq.SNDTIMEO, 5000)
    try:
        peer.handshake(name="fuzz")
        tracemalloc.start()
        _pump(peer, fuzz_frames(rng, 0, N_WARMUP))
        gc.collect()
        heap_before, rss_before = tracemalloc.get_traced_memory()[0], _rss_kb()
        sent, replies = _pump(peer, fuzz_frames(rng, N_WARMUP, N_FUZZ))
        gc.collect()
        heap_after, rss_after = tracemalloc.get_traced_memory()[0], _rss_kb()
        tracemalloc.stop()
        assert sent == N_FUZZ and replies > N_FUZZ // 4  # replies beyond the socket HWM may be dropped
        assert handled["error"] > N_FUZZ // 2 and handled["request"] > 10  # refused, or answered (latest wins)
        assert server._thread.is_alive()
        assert heap_after - heap_before < 512 * 1024, (heap_before, heap_after)
        assert rss_after - rss_before < 0.05 * rss_before + 4096, (rss_before, rss_after)
        fresh = RawPeer(server.endpoint)
        assert isinstance(fresh.handshake(), Welcome)
        reply = fresh.request(observation(0))
        assert isinstance(reply, ActionChunk)
        fresh.close()
    finally:
        peer.close()
        server.stop()
