"""Wire protocol: every message type round-trips, and every kind of bad input is refused by name."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest

from polcache_client import protocol as P


def _messages() -> list[P.Message]:
    return [
        P.Handshake(obs_spec={"state": ((39,), "float32"), "image_front": ((96, 96, 3), "uint8")}, action_dim=4, hz=50.0, name="arm"),
        P.Welcome(policy={"obs": {"state": {"shape": [39], "dtype": "float32"}}, "action_dim": 4}, max_message_bytes=1024, server="s"),
        P.Observation(epoch=2, seq=7, t_capture=12.5, arrays={"state": np.arange(39, dtype=np.float32), "image_front": np.zeros((96, 96, 3), np.uint8)}),
        P.ActionChunk(epoch=2, seq=7, obs_seqs=[6, 7], t_capture=12.5, t_actions=12.5 + np.arange(8) / 50.0,
                      actions=np.ones((8, 4), np.float32), timing={"decode": 0.1, "inference": 3.0}),
        P.Heartbeat(t=3.25),
        P.Reset(epoch=3),
        P.Error(code="bad_shape", message="observation 'state' has shape (3,)", seq=None),
        P.Error(code="inference", message="boom", seq=5),
    ]


def _assert_same(a: P.Message, b: P.Message) -> None:
    assert type(a) is type(b)
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
                assert x[k].dtype == y[k].dtype
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype
        else:
            assert x == y, name


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    _assert_same(P.decode(P.encode(msg)), msg)


def test_chunk_reports_its_own_encode_time():
    chunk = _messages()[3]
    frame, encode_ms = P.encode_chunk(chunk)
    decoded = P.decode(frame)
    assert decoded.timing["encode"] == encode_ms
    assert decoded.timing["inference"] == 3.0 and decoded.timing["encode"] >= 0.0
    np.testing.assert_array_equal(decoded.actions, chunk.actions)


def test_arrays_are_little_endian_raw_bytes():
    wire = msgpack.unpackb(P.encode(P.Heartbeat(t=1.0)))
    assert wire == {"v": P.PROTOCOL_VERSION, "type": "heartbeat", "t": 1.0}
    enc = P.encode_array(np.array([1, 2], dtype=">i4"))
    assert enc == {"dtype": "int32", "shape": [2], "data": b"\x01\x00\x00\x00\x02\x00\x00\x00"}


def _raw(**obj) -> bytes:
    return msgpack.packb({"v": P.PROTOCOL_VERSION, **obj})


def _obs_wire(**override) -> bytes:
    obj = {"type": "obs", "epoch": 0, "seq": 0, "t_capture": 1.0,
           "arrays": {"state": P.encode_array(np.zeros(3, np.float32))},
           "executed_seqs": [], "executed": P.encode_array(np.zeros((0, 0), np.float32))}
    obj.update(override)
    return _raw(**{k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    "data, code, fragment",
    [
        (b"\xc1\xff\x00", "malformed", r"not a msgpack message: FormatError \(a byte no msgpack value starts with\)$"),
        (b"\x91" * 2000 + b"\xc0", "malformed", r"not a msgpack message: StackError \(maps and lists nested deeper "
                                                r"than msgpack decodes\)$"),
        (msgpack.packb([1, 2, 3]), "malformed", "map"),
        (msgpack.packb({"v": 99, "type": "heartbeat", "t": 1.0}), "version", "99"),
        (msgpack.packb({"v": True, "type": "heartbeat", "t": 1.0}), "version", "True"),
        (msgpack.packb({"type": "heartbeat", "t": 1.0}), "version", "None"),
        (_raw(type="teleport"), "unknown_type", "teleport"),
        (_obs_wire(seq=...), "missing_key", "seq"),
        (_obs_wire(colour="red"), "extra_key", "colour"),
        (_obs_wire(seq="7"), "bad_type", "obs.seq"),
        (_obs_wire(t_capture=float("nan")), "bad_type", "obs.t_capture"),
        (_obs_wire(arrays={"state": {"dtype": "float32", "shape": [3], "data": b"\x00" * 5}}), "bad_array", "obs.arrays.state"),
        (_obs_wire(arrays={"state": {"dtype": "object", "shape": [1], "data": b"\x00" * 8}}), "bad_dtype", "object"),
        (_obs_wire(arrays={"state": {"dtype": "uint8", "shape": [-1], "data": b""}}), "bad_array", "shape"),
        (_obs_wire(arrays={"state": [1.0, 2.0]}), "bad_array", "obs.arrays.state"),
        (_obs_wire(arrays=[1]), "bad_type", "obs.arrays"),
        (_obs_wire(executed=...), "missing_key", "executed"),
        (_obs_wire(seq=5, executed_seqs=[3, 4], executed=P.encode_array(np.zeros((1, 2), np.float32))), "bad_shape",
         "one row per"),
        (_obs_wire(seq=5, executed_seqs=[5], executed=P.encode_array(np.zeros((1, 2), np.float32))), "out_of_range",
         "earlier ticks"),
        (_obs_wire(seq=5, executed_seqs=[4], executed=P.encode_array(np.full((1, 2), np.nan, np.float32))),
         "non_finite", "obs.executed"),
        (_obs_wire(seq=5, executed_seqs=[4], executed=P.encode_array(np.zeros((1, 2), np.int32))), "bad_dtype",
         "obs.executed must be a float array, got int32"),
        (_obs_wire(seq=2 ** 63), "out_of_range", "obs.seq must be in 0..2\\^63-1, got 9223372036854775808$"),
        (msgpack.packb({"v": 3, "type": "heartbeat", "t": 1.0, 7: 1}), "malformed", "a map key is not a string"),
        (_raw(type="welcome", policy={}, max_message_bytes=-1, server="s"), "out_of_range",  # every obs "too large"
         "welcome.max_message_bytes must be a positive byte count, got -1"),
        (_obs_wire(arrays={"state": {"dtype": "float32", "shape": [2**31 - 1] * 8, "data": b"1234"}}), "bad_array",
         r"4 bytes for shape .* float32 \(expected more than 2\^63\)"),
        (_obs_wire(arrays={"state": {"dtype": "float32", "shape": [2**40], "data": b"1234"}}), "bad_array",
         r"shape must be a list of at most 8 ints in 0..2\^31-1, got \[1099511627776\]"),
        (_raw(type="handshake", obs_spec={"k" * 4097: {"shape": [3], "dtype": "float32"}}, action_dim=2, hz=50.0,
              name="arm"), "bad_type", "handshake.obs_spec key must be a string"),
        (_raw(type="handshake", obs_spec={"state": {"shape": [3], "dtype": "float32"}}, action_dim=2, hz=10000.001,
              name="arm"), "out_of_range", "got 10000.001$"),
        (_raw(type="handshake", obs_spec={"state": {"shape": [3], "dtype": "float32"}}, action_dim=2, hz=50.0,
              name="arm\n2026-11-27 CRITICAL: forged\x1b[31m"), "bad_type", "handshake.name must be printable"),
        (_raw(type="handshake", obs_spec={"state": {"shape": [3], "dtype": "float32"}}, action_dim=2, hz=50.0,
              name="(no handshake)"), "bad_type", "names in parentheses are the server's own labels"),
        (_raw(type="handshake", obs_spec={"state": {"shape": [3], "dtype": "float32"}}, action_dim=2, hz=50.0,
              name=" (unnamed) "), "bad_type", "names in parentheses are the server's own labels"),
        (_raw(type="handshake", obs_spec={"state": {"shape": [2**40], "dtype": "float32"}}, action_dim=2, hz=50.0,
              name="arm"), "bad_type", r"handshake.obs_spec.state: unsupported shape \[1099511627776\]"),
        (_raw(type="chunk", epoch=0, seq=0, obs_seqs=[0], t_capture=0.0, t_actions=P.encode_array(np.zeros(2)),
              actions=P.encode_array(np.zeros((3, 4), np.float32)), timing={}), "bad_shape", "due times"),
        (_raw(type="chunk", epoch=0, seq=0, obs_seqs=[0], t_capture=0.0, t_actions=P.encode_array(np.zeros(1)),
              actions=P.encode_array(np.full((1, 4), np.inf, np.float32)), timing={}), "non_finite", "NaN"),
    ],
)
def test_bad_input_is_refused_by_name(data, code, fragment):
    with pytest.raises(P.ProtocolError, match=fragment) as info:
        P.decode(data)
    assert info.value.code == code


def test_oversized_message_is_refused_before_parsing():
    data = P.encode(_messages()[2])
    with pytest.raises(P.ProtocolError, match=f"{len(data)} bytes exceeds the limit of 1000") as info:
        P.decode(data, max_bytes=1000)
    assert info.value.code == "too_large"


SPEC = {"state": ((3,), "float32"), "image": ((2, 2, 3), "uint8")}


def _arrays(**override):
    arrays = {"state": np.zeros(3, np.float32), "image": np.zeros((2, 2, 3), np.uint8)}
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    "arrays, code, fragment",
    [
        (_arrays(image=None), "missing_key", "image"),
        (_arrays(depth=np.zeros(1, np.float32)), "extra_key", "depth"),
        (_arrays(state=np.zeros(4, np.float32)), "bad_shape", r"'state' has shape \(4,\), expected \(3,\)"),
        (_arrays(state=np.zeros(3, np.float64)), "bad_dtype", "'state' has dtype float64, expected float32"),
        (_arrays(state=np.array([0, np.nan, 0], np.float32)), "non_finite", "'state'"),
        (_arrays(state=np.array([0, -np.inf, 0], np.float32)), "non_finite", "'state'"),
    ],
)
def test_observation_must_match_spec(arrays, code, fragment):
    with pytest.raises(P.ProtocolError, match=fragment) as info:
        P.check_arrays(arrays, SPEC)
    assert info.value.code == code


def test_matching_observation_passes():
    P.check_arrays(_arrays(), SPEC)


def test_version_1_robots_are_read_and_answered_in_version_1():
    obs = P.Observation(epoch=1, seq=4, t_capture=2.0, arrays={"state": np.zeros(3, np.float32)})
    v1 = P.encode(obs, version=1)
    wire = msgpack.unpackb(v1)
    assert wire["v"] == 1 and "executed" not in wire and "executed_seqs" not in wire
    msg, version = P.decode_versioned(v1)
    assert version == 1 and msg.executed_seqs == [] and msg.executed.size == 0
    with pytest.raises(P.ProtocolError, match="extra_key|unexpected") as info:  # a v1 message has no v2 fields
        P.decode(msgpack.packb({**wire, "executed_seqs": []}))
    assert info.value.code == "extra_key"


def test_version_2_observations_carry_the_executed_actions():
    executed = np.array([[0.1, -0.2], [0.3, 0.4]], np.float32)
    obs = P.Observation(epoch=1, seq=6, t_capture=2.0, arrays={"state": np.zeros(3, np.float32)},
                        executed_seqs=[4, 5], executed=executed)
    msg, version = P.decode_versioned(P.encode(obs))
    assert version == P.PROTOCOL_VERSION >= 2 and msg.executed_seqs == [4, 5]
    np.testing.assert_array_equal(msg.executed, executed)


# ------------------------------------------------------------ the per-tick fast paths

TICK_SPEC = {"state": ((3,), "float32"), "image": ((2, 2, 3), "uint8")}
READER = P.ObservationReader(TICK_SPEC)


def _valid_tick_wires() -> list[dict]:
    obs = msgpack.unpackb(P.encode(P.Observation(
        epoch=1, seq=6, t_capture=2.5, arrays={"state": np.arange(3, dtype=np.float32), "image": np.ones((2, 2, 3), np.uint8)},
        executed_seqs=[4, 5], executed=np.ones((2, 2), np.float32))))
    chunk = msgpack.unpackb(P.encode_chunk(_messages()[3])[0])
    return [obs, {**obs, "v": 2}, {**obs, "executed_seqs": [], "executed": P.encode_array(P.NO_ACTIONS)}, chunk,
            {**chunk, "v": 1}]


BAD_VALUES = [None, True, "7", -1, 2**63, 2**64 - 1, 1.5, float("nan"), float("inf"), -1e13, [], {}, b"", [True], ["x"],
              {"x": 1.0}, {"k" * 4097: 1.0}, {"k": float("nan")}, {"k": True}, {"k": "x"}]
BAD_ARRAYS = [{"dtype": "float32", "shape": [3]}, {"dtype": "float32", "shape": [3], "data": b"\0" * 12, "x": 1},
              {"dtype": "object", "shape": [1], "data": b"\0" * 8}, {"dtype": 5, "shape": [1], "data": b"\0" * 4},
              {"dtype": "uint8", "shape": [-1], "data": b""}, {"dtype": "uint8", "shape": [2**31], "data": b""},
              {"dtype": "uint8", "shape": [1] * 9, "data": b"\0"}, {"dtype": "uint8", "shape": "3", "data": b"\0" * 3},
              {"dtype": "uint8", "shape": [3], "data": "abc"}, {"dtype": "uint8", "shape": [3], "data": b"\0" * 4},
              {"dtype": "int32", "shape": [2, 2], "data": b"\0" * 16}, {"dtype": "float32", "shape": [2], "data": b"\0" * 8},
              {"dtype": "float64", "shape": [3], "data": b"\0" * 24}, {"dtype": "float32", "shape": [3], "data": b"\0" * 8},
              {"dtype": "uint8", "shape": [2, 2, 3], "data": b"\0" * 11}, {"dtype": "uint8", "shape": [2, 3, 2], "data": b"\0" * 12},
              {"dtype": "float32", "shape": [2, 2], "data": np.full(4, np.nan, np.float32).tobytes()},
              {"dtype": "float32", "shape": [3], "data": np.array([0, np.inf, 0], np.float32).tobytes()}]


def _mutations(wire: dict):
    """The valid frame, then each field missing, replaced by a bad value or array, plus extra keys;
    each array of obs.arrays missing, replaced or joined by another."""
    yield wire
    yield {**wire, "colour": "red"}
    for key in wire:
        yield {k: v for k, v in wire.items() if k != key}
        for bad in BAD_VALUES + BAD_ARRAYS:
            yield {**wire, key: bad}
    if wire["type"] == "obs":
        arrays = wire["arrays"]
        for name in arrays:
            yield {**wire, "arrays": {k: v for k, v in arrays.items() if k != name}}
            for bad in BAD_ARRAYS:
                yield {**wire, "arrays": {**arrays, name: bad}}
        yield {**wire, "arrays": {**arrays, "k" * 4097: arrays["state"]}}
        yield {**wire, "arrays": {**arrays, "depth": arrays["state"]}}
        yield {**wire, "arrays": {f"k{i}": arrays["state"] for i in range(P.MAX_MAP_KEYS + 1)}}
    # lists and maps one entry over their limits, then at them
    for n in (P.MAX_LIST_ITEMS + 1, P.MAX_LIST_ITEMS):
        yield {**wire, "executed_seqs" if wire["type"] == "obs" else "obs_seqs": list(range(n))}
    if wire["type"] == "chunk":
        for n in (P.MAX_MAP_KEYS + 1, P.MAX_MAP_KEYS):
            yield {**wire, "timing": {f"s{i}": 1.0 for i in range(n)}}


def _strict(frame: bytes):
    """The strict decoder's message, an observation also checked against TICK_SPEC; None if refused."""
    try:
        msg, version = P._decode_strict(frame)
        if type(msg) is P.Observation:
            P.check_arrays(msg.arrays, TICK_SPEC)
        return msg, version
    except P.ProtocolError:
        return None


def _assert_fast_agrees(frame: bytes) -> bool:
    """The fast paths (chunks: decode's; observations: the spec's reader) accept nothing the
    strict decoder refuses, and what they accept decodes alike. True if one took the frame."""
    chunk, obs, strict = P._decode_chunk(frame), READER._read_observation(frame), _strict(frame)
    assert chunk is None or obs is None
    fast = chunk or obs
    if strict is None:
        assert fast is None, f"fast path accepted what the strict decoder refuses: {msgpack.unpackb(frame)!r:.300}"
    elif fast is not None:
        assert fast[1] == strict[1]
        _assert_same(fast[0], strict[0])
    return fast is not None


def test_fast_paths_read_valid_observations_and_chunks():
    for wire in _valid_tick_wires():
        assert _assert_fast_agrees(msgpack.packb(wire)), wire["type"]  # taken, not just agreeing


def test_fast_paths_are_no_looser_than_the_strict_decoder():
    frames = [msgpack.packb(m) for wire in _valid_tick_wires() for m in _mutations(wire)]
    assert len(frames) > 700
    # flipped bytes: msgpack of other types and lengths, invalid UTF-8, truncations
    rng = np.random.default_rng(0)
    for _ in range(3000):
        frame = bytearray(frames[rng.integers(len(frames))])
        for pos in rng.integers(len(frame), size=rng.integers(1, 4)):
            frame[pos] = rng.integers(256)
        frames.append(bytes(frame))
    assert sum(_assert_fast_agrees(f) for f in frames) > 5  # some taken; every one agreeing


def test_a_map_or_list_over_its_limit_is_refused_as_its_length_is_read():
    """100,000 one-byte arrays in one frame (under the byte limit) took the server 0.6 s to refuse,
    without a handshake: every robot waited that long. Refused now before any of them is read."""
    arrays = {f"k{i}": {"dtype": "uint8", "shape": [1], "data": b"\0"} for i in range(100_000)}
    frame = msgpack.packb({"v": 3, "type": "obs", "epoch": 0, "seq": 4, "t_capture": 0.0, "arrays": arrays,
                           "executed_seqs": [], "executed": P.encode_array(P.NO_ACTIONS)})
    t0 = time.perf_counter()
    with pytest.raises(P.ProtocolError, match=r"^a map of 100000 entries exceeds the limit of 1024 entries per map$") as info:
        READER.read(frame)
    assert info.value.code == "too_large" and time.perf_counter() - t0 < 0.05
    with pytest.raises(P.ProtocolError, match="a list of 65537 entries exceeds the limit of 65536") as info:
        P.decode(msgpack.packb({"v": 3, "type": "heartbeat", "t": list(range(65537))}))
    assert info.value.code == "too_large"


def test_reader_reads_any_layout_a_spec_can_name():
    """Dotted keys (LeRobot's), 0-d arrays, numpy integers in shapes (specs built in code)."""
    spec = {"observation.state": ((), "float64"), "observation.images.top": ((np.int64(4), 4, 3), "uint8")}
    arrays = {"observation.state": np.array(1.5), "observation.images.top": np.arange(48, dtype=np.uint8).reshape(4, 4, 3)}
    msg, _ = P.ObservationReader(spec)._read_observation(P.encode(P.Observation(epoch=0, seq=1, t_capture=0.0,
                                                                                arrays=arrays)))
    for key, arr in arrays.items():
        np.testing.assert_array_equal(msg.arrays[key], arr)
        assert not msg.arrays[key].flags.writeable  # views into the frame


def test_reader_names_what_does_not_match_the_spec():
    obs = P.Observation(epoch=0, seq=9, t_capture=1.0, arrays={"state": np.zeros(4, np.float32),
                                                               "image": np.zeros((2, 2, 3), np.uint8)})
    with pytest.raises(P.ProtocolError, match=r"'state' has shape \(4,\), expected \(3,\)") as info:
        READER.read(P.encode(obs))
    assert info.value.code == "bad_shape" and info.value.seq == 9
    assert type(READER.read(P.encode(P.Heartbeat(t=1.0)))[0]) is P.Heartbeat  # other messages pass as decoded
    with pytest.raises(P.ProtocolError) as info:
        READER.read(P.encode(obs), max_bytes=10)
    assert info.value.code == "too_large"
