"""The wire protocol between a robot and a policy server (docs/protocol.md is the contract).

Every message is one msgpack map in one ZeroMQ frame: no multipart, so nothing depends on
CONFLATE, and no pickle, so a peer can never make the other side execute code. Arrays
travel as dtype name, shape and raw little-endian bytes. Decoding is strict: unknown
versions, unknown types, missing or extra keys and wrong types are refused with a
`ProtocolError` whose code and message name the problem, never with a crash.

The two messages of every control tick take a compiled path (msgspec): a server reads
observations with an ObservationReader, `decode` reads chunks through a typed record; a frame
either does not accept goes through the strict decoder, the one place where errors are named.
msgspec also writes every message.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import sys
import time
from typing import Annotated, Any, Callable, ClassVar, Literal, Union

import msgpack
import msgspec
import numpy as np

PROTOCOL_VERSION = 3  # what this side writes by default
SUPPORTED_VERSIONS = (1, 2, 3)  # what it reads; a server answers each robot in the robot's version
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20

# dtypes a peer may send; object and structured dtypes are never accepted.
ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64"]
)
MAX_NDIM = 8
MAX_COUNT = 2**63 - 1  # epoch and seq: non-negative int64
MIN_HZ, MAX_HZ = 0.01, 10_000.0  # control rates outside these are not a robot's (5e-324 Hz: infinite due times)
MAX_TIME_S = 1e12  # robot-clock timestamps: finite and within +-1e12 s
MAX_ACTION_DIM = 65_536
MAX_INSTRUCTION_BYTES = 1024  # UTF-8 bytes of an instruction on the wire (a policy may allow fewer)
# Entries of any one map and any one list in a message. A frame under the byte limit can still hold
# 100,000 one-byte arrays, which took the server 0.6 s to refuse: every peer waited that long.
MAX_MAP_KEYS, MAX_LIST_ITEMS = 1024, 65_536


MAX_ERROR_MESSAGE_CHARS = 1024  # an error's message: a 4 MB message listing its 1000 bad keys is not answered whole


def error_message(text: str) -> str:
    """An error's message as sent and logged: its first MAX_ERROR_MESSAGE_CHARS characters, and how
    long it was. Messages that name what was refused (every bad key, a huge shape) would otherwise
    grow with the message refused: a 4 MB frame drew a 16 MB reply (escaped control characters),
    more than a robot's size limit, and as long a log line."""
    if len(text) <= MAX_ERROR_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_ERROR_MESSAGE_CHARS - 40]}... (cut short: {len(text)} characters)"


def default_deadline_ms(n_action_steps: int, hz: float) -> float:
    """A server's budget for one request where none is configured: (n_action_steps - 1) periods, after
    which every action of the chunk is due before it can arrive; half a period for one action per chunk
    (the robot still takes an action up to half a period past due: zero would count every request late)."""
    return max(n_action_steps - 1, 0.5) / hz * 1e3


# Per-step observation layout: key -> (shape, dtype name).
ObsSpec = dict[str, tuple[tuple[int, ...], str]]


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is machine-readable, str(self) names the problem;
    `seq` is the observation concerned when the message was an observation with a readable seq;
    `version` the protocol version the message was written in, where that was readable (a refusal
    to a robot without a session is written in it)."""

    def __init__(self, code: str, message: str, seq: int | None = None, version: int | None = None):
        super().__init__(message)
        self.code = code
        self.seq = seq
        self.version = version


class Handshake(msgspec.Struct, frozen=True):
    """Robot -> server, first message on a connection: what the robot will send and at what rate."""

    obs_spec: ObsSpec
    action_dim: int
    hz: float
    name: str
    instruction: str | None = None  # version 3: what a language-conditioned policy should do


class Welcome(msgspec.Struct, frozen=True):
    """Server -> robot: the handshake matched; `policy` is PolicySpec.to_dict() of the hosted policy."""

    policy: dict
    max_message_bytes: int
    server: str


NO_ACTIONS = np.zeros((0, 0), np.float32)  # "none reported": shared by every such observation, so
NO_ACTIONS.flags.writeable = False  # read-only (it is empty anyway)


class Observation(msgspec.Struct, frozen=True):
    """Robot -> server: one control step. `seq` counts ticks within `epoch`; `t_capture` is robot clock.
    Version 2: `executed[i]` is the action the robot actually applied at tick `executed_seqs[i]`
    (ticks since its previous observation), which self-verifying policies compare their
    predicted past actions with."""

    epoch: int
    seq: int
    t_capture: float
    arrays: dict[str, np.ndarray]
    executed_seqs: list[int] = msgspec.field(default_factory=list)
    executed: np.ndarray = NO_ACTIONS


class ActionChunk(msgspec.Struct, frozen=True):
    """Server -> robot: actions answering observation (`epoch`, `seq`); `obs_seqs` are the history steps
    used (oldest first); `t_actions[i]` is when `actions[i]` is due, on the robot's clock;
    `timing` holds per-stage server milliseconds."""

    epoch: int
    seq: int
    obs_seqs: list[int]
    t_capture: float
    t_actions: np.ndarray
    actions: np.ndarray
    timing: dict[str, float]


class Heartbeat(msgspec.Struct, frozen=True):
    """Robot -> server, echoed back unchanged: keeps the session alive and measures round trip."""

    t: float


class Reset(msgspec.Struct, frozen=True):
    """Robot -> server, echoed back as acknowledgement: a new episode starts at `epoch`.
    Version 3: `instruction`, if not None, replaces the robot's instruction from this episode on."""

    epoch: int
    instruction: str | None = None


class Error(msgspec.Struct, frozen=True):
    """Server -> robot: a request was refused; `seq` is the observation it concerns, if any."""

    code: str
    message: str
    seq: int | None


Message = Union[Handshake, Welcome, Observation, ActionChunk, Heartbeat, Reset, Error]

TYPE_NAMES: dict[type, str] = {
    Handshake: "handshake",
    Welcome: "welcome",
    Observation: "obs",
    ActionChunk: "chunk",
    Heartbeat: "heartbeat",
    Reset: "reset",
    Error: "error",
}
TYPES_BY_NAME = {name: cls for cls, name in TYPE_NAMES.items()}


# ---------------------------------------------------------------- arrays


_DTYPE_NAMES = {np.dtype(name): name for name in ALLOWED_DTYPES}
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}  # what the bytes hold
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


def _dtype_name(dtype: np.dtype) -> str:
    """dtype.name without its cost: numpy builds that string anew (~3 us), several times a message."""
    return _DTYPE_NAMES.get(dtype) or dtype.name


def encode_array(arr: np.ndarray) -> dict:
    dtype, shape, data = _array_parts(arr)
    return {"dtype": dtype, "shape": shape, "data": data}


def _array_parts(arr: np.ndarray) -> tuple[str, list[int], bytes]:
    """An array's wire fields: dtype name, shape, raw little-endian C-order bytes."""
    if type(arr) is not np.ndarray:
        arr = np.asarray(arr)
    name = _dtype_name(arr.dtype)
    if name not in ALLOWED_DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {arr.dtype} cannot be sent")
    wire = _WIRE_DTYPES[name]
    return name, list(arr.shape), (arr if arr.dtype == wire else arr.astype(wire)).tobytes()  # tobytes: C order


def _is_dim(s: Any) -> bool:
    return type(s) is int and 0 <= s < 2**31


def decode_array(obj: Any, where: str) -> np.ndarray:
    """Read-only view on the received bytes; `where` names the field in errors."""
    if not isinstance(obj, dict) or obj.keys() != _ARRAY_KEYS:
        raise ProtocolError("bad_array", f"{where}: an array is a map with keys dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    _wire_dtype(dtype, where)  # named before the shape is looked at
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(map(_is_dim, shape)):
        raise ProtocolError("bad_array", f"{where}: shape must be a list of at most {MAX_NDIM} ints in "
                                         f"0..2^31-1, got {_short(shape)}")
    if not isinstance(data, bytes):
        raise ProtocolError("bad_array", f"{where}: data must be binary")
    return _array(dtype, shape, data, where)


def _wire_dtype(dtype: Any, where: str) -> np.dtype:
    """The numpy dtype of a wire dtype name, or bad_dtype naming it."""
    np_dtype = _WIRE_DTYPES.get(dtype) if isinstance(dtype, str) else None
    if np_dtype is None:
        raise ProtocolError("bad_dtype", f"{where}: dtype {_short(dtype)} is not one of {sorted(ALLOWED_DTYPES)}")
    return np_dtype


def _array(dtype: str, shape: list[int], data: bytes | memoryview, where: str) -> np.ndarray:
    """The array of well-typed wire fields: a dtype we accept, as many bytes as the shape needs."""
    np_dtype = _wire_dtype(dtype, where)
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        shown = expected if expected < 2**63 else "more than 2^63"  # eight dimensions of 2^31-1: 75 digits
        raise ProtocolError("bad_array", f"{where}: {len(data)} bytes for shape {shape} {dtype} (expected {shown})")
    return np.ndarray(shape, np_dtype, buffer=data)  # read-only, as the frame it views


def all_finite(arr: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity (count_nonzero: half the time of
    isfinite().all(), which goes through a Python wrapper; paid several times a message)."""
    return np.count_nonzero(np.isfinite(arr)) == arr.size


def check_arrays(arrays: dict[str, np.ndarray], spec: ObsSpec) -> None:
    """Refuse observations that do not match the negotiated spec, naming the first offending key."""
    if arrays.keys() != spec.keys():
        missing = sorted(set(spec) - set(arrays))
        if missing:
            raise ProtocolError("missing_key", f"observation lacks key(s) {missing}")
        raise ProtocolError("extra_key", f"observation has unexpected key(s) {sorted(set(arrays) - set(spec))}")
    for key, (shape, dtype) in spec.items():
        arr = arrays[key]
        if not isinstance(arr, np.ndarray):  # a list or a torch tensor: the adapter must give numpy
            raise ProtocolError("bad_type", f"observation {key!r} is a {type(arr).__name__}, expected a numpy array")
        if arr.shape != tuple(shape):
            raise ProtocolError("bad_shape", f"observation {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if _dtype_name(arr.dtype) != dtype:
            raise ProtocolError("bad_dtype", f"observation {key!r} has dtype {arr.dtype.name}, expected {dtype}")
        if arr.dtype.kind == "f" and not all_finite(arr):
            raise ProtocolError("non_finite", f"observation {key!r} contains NaN or infinite values")


# ---------------------------------------------------------------- field codecs
# Each codec turns a wire value into its Python value or raises ProtocolError naming the field.


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise ProtocolError("bad_type", f"{where} must be an integer")
    return value


def _float(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ProtocolError("bad_type", f"{where} must be a finite number")
    return float(value)


def _ranged(parse: Callable[[Any, str], Any], lo: float, hi: float, allowed: str) -> Callable[[Any, str], Any]:
    """A field codec: `parse`, then refuse values outside [lo, hi] with `out_of_range`."""

    def codec(value: Any, where: str) -> Any:
        value = parse(value, where)
        if not lo <= value <= hi:
            # repr: an int exactly (not 9.22337e+18), a float to the digit that put it out of range (not 10000)
            raise ProtocolError("out_of_range", f"{where} must be {allowed}, got {value!r}")
        return value

    return codec


_count = _ranged(_int, 0, MAX_COUNT, "in 0..2^63-1")
_hz = _ranged(_float, MIN_HZ, MAX_HZ, f"in [{MIN_HZ:g}, {MAX_HZ:g}] Hz")
_time = _ranged(_float, -MAX_TIME_S, MAX_TIME_S, f"within +-{MAX_TIME_S:g} s (robot clock)")
_dim = _ranged(_int, 1, MAX_ACTION_DIM, f"in 1..{MAX_ACTION_DIM}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise ProtocolError("bad_type", f"{where} must be a string of at most 4096 characters")
    try:  # frames are unpacked with surrogateescape, so a string of invalid UTF-8 is named here
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError("bad_type", f"{where} is not valid UTF-8 (at character {exc.start})") from None
    return value


def robot_name(value: Any, where: str = "name") -> str:
    """A robot's name: it goes into the server's log lines, so no control characters. The client
    checks its own with this before sending (a name that cannot be encoded would crash the encoder)."""
    value = _str(value, where)
    if not value.isprintable():
        raise ProtocolError("bad_type", f"{where} must be printable text (no newlines or other control characters)")
    if value.strip().startswith("(") and value.strip().endswith(")"):  # the server's own labels: mixed with them
        raise ProtocolError("bad_type", f"{where} {value!r}: names in parentheses are the server's own labels (such "
                                        f"as '(no handshake)'); name the robot otherwise")
    return value


def _instruction(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_type", f"{where} must be a string or nil")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ProtocolError("bad_type", f"{where} is not valid UTF-8 (at character {exc.start})") from None
    if size > MAX_INSTRUCTION_BYTES:
        raise ProtocolError("out_of_range", f"{where} must be at most {MAX_INSTRUCTION_BYTES} UTF-8 bytes, got {size}")
    return value


def instruction_bytes(text: Any, limit: int = MAX_INSTRUCTION_BYTES, field: str = "instruction") -> bytes:
    """The UTF-8 bytes a policy reads of `text` (surrounding whitespace stripped). Refuses with
    `bad_instruction`, naming `field`, what no policy reading `limit` bytes can follow: not a
    string, not encodable as UTF-8, empty, containing NUL (the padding) or longer. One check for
    the server, `polcache eval` and the client, which applies it before it sends an instruction."""
    if not isinstance(text, str):
        raise ProtocolError("bad_instruction", f"{field}: expected a string, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8").strip()
    except UnicodeEncodeError:
        raise ProtocolError("bad_instruction", f"{field}: not encodable as UTF-8 (lone surrogate)") from None
    if not raw:
        raise ProtocolError("bad_instruction", f"{field}: empty instruction")
    if b"\0" in raw:
        raise ProtocolError("bad_instruction", f"{field}: contains a NUL character")
    if len(raw) > limit:
        raise ProtocolError("bad_instruction", f"{field}: {len(raw)} UTF-8 bytes, at most {limit} allowed")
    return raw


def _optional_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise ProtocolError("bad_type", f"{where} must be a list of integers")
    return [_int(v, where) for v in value]


def _float_map(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{where} must be a map of numbers")
    out = {}
    for k, v in value.items():  # the usual entry passes the first test; any other is checked in full
        if not (type(k) is str and len(k) <= 4096 and k.isascii() and type(v) is float and math.isfinite(v)):
            k, v = _str(k, f"{where} key"), _float(v, f"{where}.{k}")
        out[k] = float(v)
    return out


def _array_map(value: Any, where: str) -> dict[str, np.ndarray]:
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{where} must be a map of arrays")
    return {_str(k, f"{where} key"): decode_array(v, f"{where}.{k}") for k, v in value.items()}


def _obs_spec(value: Any, where: str) -> ObsSpec:
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{where} must be a map of {{shape, dtype}}")
    spec: ObsSpec = {}
    for key, entry in value.items():
        key = _str(key, f"{where} key")
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise ProtocolError("bad_type", f"{where}.{key} must be a map with keys shape, dtype")
        shape = _int_list(entry["shape"], f"{where}.{key}.shape")
        dtype = _str(entry["dtype"], f"{where}.{key}.dtype")
        if dtype not in ALLOWED_DTYPES or not all(map(_is_dim, shape)) or len(shape) > MAX_NDIM:  # as arrays' shapes
            raise ProtocolError("bad_type", f"{where}.{key}: unsupported shape {shape} or dtype {dtype!r}")
        spec[key] = (tuple(shape), dtype)
    return spec


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"{where} must be a map")
    return value


def _wire_obs_spec(spec: ObsSpec) -> dict:
    return {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in spec.items()}


def _wire_arrays(arrays: dict[str, np.ndarray]) -> dict:
    return {k: encode_array(v) for k, v in arrays.items()}


def _identity(value: Any) -> Any:
    return value


# (decode, encode) per field; fields not listed here use their value as is.
_FIELD_CODECS: dict[tuple[type, str], tuple[Callable[[Any, str], Any], Callable[[Any], Any]]] = {
    (Handshake, "obs_spec"): (_obs_spec, _wire_obs_spec),
    (Handshake, "action_dim"): (_dim, int),
    (Handshake, "hz"): (_hz, float),
    (Handshake, "name"): (robot_name, str),
    (Handshake, "instruction"): (_instruction, _identity),
    (Welcome, "policy"): (_dict, _identity),
    (Welcome, "max_message_bytes"): (_ranged(_int, 1, MAX_COUNT, "a positive byte count"), int),
    (Welcome, "server"): (_str, str),
    (Observation, "epoch"): (_count, int),
    (Observation, "seq"): (_count, int),
    (Observation, "t_capture"): (_time, float),
    (Observation, "arrays"): (_array_map, _wire_arrays),
    (Observation, "executed_seqs"): (_int_list, list),
    (Observation, "executed"): (decode_array, encode_array),
    (ActionChunk, "epoch"): (_count, int),
    (ActionChunk, "seq"): (_count, int),
    (ActionChunk, "obs_seqs"): (_int_list, list),
    (ActionChunk, "t_capture"): (_time, float),
    (ActionChunk, "t_actions"): (decode_array, encode_array),
    (ActionChunk, "actions"): (decode_array, encode_array),
    (ActionChunk, "timing"): (_float_map, dict),
    (Heartbeat, "t"): (_time, float),
    (Reset, "epoch"): (_count, int),
    (Reset, "instruction"): (_instruction, _identity),
    (Error, "code"): (_str, str),
    (Error, "message"): (_str, str),
    (Error, "seq"): (_optional_int, _identity),
}


# ---------------------------------------------------------------- messages


# The version that added a field: messages of older versions lack it, newer ones carry it.
FIELD_SINCE = {(Observation, "executed_seqs"): 2, (Observation, "executed"): 2,
               (Handshake, "instruction"): 3, (Reset, "instruction"): 3}


# Fields a message may leave out (they then take their default, nil): what a minimal robot needs not write.
OPTIONAL_FIELDS = frozenset({(Handshake, "instruction"), (Reset, "instruction")})


@functools.lru_cache(maxsize=None)  # a few (type, version) pairs, asked twice per message each way
def _fields(cls: type, version: int) -> tuple[str, ...]:
    return tuple(n for n in cls.__struct_fields__ if version >= FIELD_SINCE.get((cls, n), 1))


@functools.lru_cache(maxsize=None)
def _decoders(cls: type, version: int) -> tuple[tuple[str, Callable[[Any, str], Any], str], ...]:
    """(field, decode, name in errors) per field, built once instead of per message."""
    return tuple((n, _FIELD_CODECS[(cls, n)][0], f"{TYPE_NAMES[cls]}.{n}") for n in _fields(cls, version))


@functools.lru_cache(maxsize=None)
def _key_sets(cls: type, version: int) -> tuple[frozenset[str], frozenset[str]]:
    """The keys a message of this type and version may carry, and those it must."""
    names = _fields(cls, version)
    return frozenset(names), frozenset(n for n in names if (cls, n) not in OPTIONAL_FIELDS)


_ENVELOPE = frozenset({"v", "type"})


@functools.lru_cache(maxsize=None)
def _encoders(cls: type, version: int) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    return tuple((n, _FIELD_CODECS[(cls, n)][1]) for n in _fields(cls, version))


def _wire_items(msg: Message, skip: str | None = None, version: int = PROTOCOL_VERSION) -> list[tuple[str, Any]]:
    cls = type(msg)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write protocol version {version} (this side speaks {SUPPORTED_VERSIONS})")
    items: list[tuple[str, Any]] = [("v", version), ("type", TYPE_NAMES[cls])]
    for name, to_wire in _encoders(cls, version):
        if name != skip:
            items.append((name, to_wire(getattr(msg, name))))
    return items


_ENCODER = msgspec.msgpack.Encoder()  # floats always as float64, maps in insertion order


def encode(msg: Message, version: int = PROTOCOL_VERSION) -> bytes:
    if type(msg) is Observation and version in _WireObservation.versions:
        return _ENCODER.encode(_WireObservation.of(msg, version))
    return _ENCODER.encode(dict(_wire_items(msg, version=version)))


def encode_chunk(chunk: ActionChunk, version: int = PROTOCOL_VERSION) -> tuple[bytes, float]:
    """Encode a chunk whose timing["encode"] is the time this very encoding took (also returned,
    in ms): the frame is written with 0.0 there, as the last field's last entry, so its final 8
    bytes (a msgpack float64) are then overwritten with the time the rest took."""
    t0 = time.perf_counter()
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write protocol version {version} (this side speaks {SUPPORTED_VERSIONS})")
    frame = bytearray()
    _ENCODER.encode_into(_WireChunk.of(chunk, version), frame)
    encode_ms = (time.perf_counter() - t0) * 1e3
    struct.pack_into(">d", frame, len(frame) - 8, encode_ms)
    return bytes(frame), encode_ms


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one frame. Raises ProtocolError for anything that is not a valid message."""
    return decode_versioned(data, max_bytes)[0]


def decode_versioned(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[Message, int]:
    """`decode`, also returning the protocol version the peer wrote (a server answers in it)."""
    if len(data) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    return _decode_chunk(data) or _decode_strict(data)


_OVER_LIMIT = re.compile(r"(\d+) exceeds max_(map|array)_len\((\d+)\)")  # msgpack's words for MAX_MAP_KEYS etc.


def _decode_strict(data: bytes) -> tuple[Message, int]:
    """Every message, every check in the documented order: the first problem is named."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, unicode_errors="surrogateescape",
                              max_map_len=MAX_MAP_KEYS, max_array_len=MAX_LIST_ITEMS)
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        if (over := _OVER_LIMIT.fullmatch(str(exc))) is not None:  # refused as soon as its length was read
            kind = "map" if over[2] == "map" else "list"
            raise ProtocolError("too_large", f"a {kind} of {over[1]} entries exceeds the limit of {over[3]} entries "
                                             f"per {kind}") from None
        what = "a map key is not a string" if "map key" in str(exc) else "not a msgpack message"  # strict_map_key
        detail = (f": {exc}" if str(exc) else  # FormatError and StackError say nothing
                  " (maps and lists nested deeper than msgpack decodes)" if isinstance(exc, msgpack.StackError) else
                  " (a byte no msgpack value starts with)")
        raise ProtocolError("malformed", f"{what}: {type(exc).__name__}{detail}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"message must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError("version", f"protocol version {_short(version)} is not supported (this side speaks "
                                       f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                            _obs_seq(obj) if obj.get("type") == "obs" else None)
    try:
        return _decode_body(obj, version), version
    except ProtocolError as exc:
        exc.version = version
        raise


def _obs_seq(obj: dict) -> int | None:
    """An observation's seq where that field is readable and in range: its refusal names it."""
    seq = obj.get("seq")
    return seq if type(seq) is int and 0 <= seq <= MAX_COUNT else None


def _decode_body(obj: dict, version: int) -> Message:
    """The message of a map whose version is supported (_decode_strict's remaining checks)."""
    cls = TYPES_BY_NAME.get(obj.get("type")) if isinstance(obj.get("type"), str) else None
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {_short(obj.get('type'))}; known: {sorted(TYPES_BY_NAME)}")
    name = TYPE_NAMES[cls]
    seq = _obs_seq(obj) if cls is Observation else None
    expected, required = _key_sets(cls, version)
    given = obj.keys() - _ENVELOPE
    if not required <= given:
        raise ProtocolError("missing_key", f"{name} message lacks key(s) {sorted(required - given)}", seq)
    if not given <= expected:
        unexpected = _short(sorted(map(str, given - expected)))
        raise ProtocolError("extra_key", f"{name} message has unexpected key(s) {unexpected}", seq)
    # Fields are checked in their documented order, so where several are wrong the same one is named.
    try:
        msg = cls(**{n: parse(obj[n], where) for n, parse, where in _decoders(cls, version) if n in given})
        if isinstance(msg, Observation):
            _check_executed(msg)
    except ProtocolError as exc:
        exc.seq = seq
        raise
    if isinstance(msg, ActionChunk):
        _check_chunk(msg)
    return msg


def _short(value: Any, limit: int = 80) -> str:
    """repr() bounded in length, so an error message about a huge bad value stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_executed(obs: Observation) -> None:
    executed, seqs = obs.executed, obs.executed_seqs
    if not seqs and executed.size == 0:
        return
    if executed.dtype.kind != "f":
        raise ProtocolError("bad_dtype", f"obs.executed must be a float array, got {executed.dtype}")
    if executed.ndim != 2 or len(seqs) != len(executed):
        raise ProtocolError("bad_shape", f"obs.executed must be ({len(seqs)}, action_dim) floats, one row per "
                                         f"obs.executed_seqs entry, got {executed.shape}")
    if not all_finite(executed):
        raise ProtocolError("non_finite", "obs.executed contains NaN or infinite values")
    if any(not 0 <= s < obs.seq for s in seqs):
        raise ProtocolError("out_of_range", f"obs.executed_seqs must be earlier ticks of the epoch (0..{obs.seq - 1}), "
                                            f"got {_short(seqs)}")


def _check_chunk(chunk: ActionChunk) -> None:
    actions, t_actions = chunk.actions, chunk.t_actions
    if actions.ndim != 2 or actions.dtype.kind != "f" or t_actions.ndim != 1 or t_actions.dtype.kind != "f":
        raise ProtocolError("bad_shape", "chunk.actions must be (n, action_dim) floats and chunk.t_actions (n,) floats")
    if len(t_actions) != len(actions):
        raise ProtocolError("bad_shape", f"chunk has {len(actions)} actions but {len(t_actions)} due times")
    if not (all_finite(actions) and all_finite(t_actions)):
        raise ProtocolError("non_finite", "chunk contains NaN or infinite values")


def check_action_width(chunk: ActionChunk, action_dim: int) -> None:
    """Refuse, with `bad_shape`, a chunk whose actions are not `action_dim` wide: the robot declared
    that width in its handshake and its `act()` takes vectors of it (a buggy or foreign server's
    (n, 7) actions would otherwise reach a 4-joint arm)."""
    width = chunk.actions.shape[1]
    if width != action_dim:
        raise ProtocolError("bad_shape", f"chunk.actions has {width} values per action, but this robot's "
                                         f"action_dim (its handshake's) is {action_dim}")


# ---------------------------------------------------------------- the per-tick fast path
# msgspec decodes a chunk (and, in ObservationReader, an observation of the negotiated layout)
# into these typed records in compiled code, a fraction of the strict decoder's time
# (BENCHMARKS.md, transport); msgspec also writes observations and chunks from them. The records
# are at least as strict as the field codecs above and the checks after them are the same
# functions, so a frame they accept is one the strict decoder accepts as the same message
# (tests/test_protocol.py compares the two on valid and broken frames); whatever they do not
# accept, the strict decoder reads and names.

_WireCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_WireTime = Annotated[float, msgspec.Meta(ge=-MAX_TIME_S, le=MAX_TIME_S)]
_WireFinite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]  # refuses NaN too
_WireKey = Annotated[str, msgspec.Meta(max_length=4096)]
_WireList = Annotated[list[int], msgspec.Meta(max_length=MAX_LIST_ITEMS)]


class _WireArray(msgspec.Struct, forbid_unknown_fields=True):
    dtype: str
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=2**31)]], msgspec.Meta(max_length=MAX_NDIM)]
    data: memoryview  # read: a view into the received frame, no copy (written: bytes)

    @classmethod
    def of(cls, arr: np.ndarray) -> "_WireArray":
        return _WIRE_NO_ACTIONS if arr is NO_ACTIONS else cls(*_array_parts(arr))

    def array(self) -> np.ndarray:
        if self.shape == [0, 0] and self.dtype == "float32":  # most observations' executed actions
            return NO_ACTIONS
        return _array(self.dtype, self.shape, self.data, "")


_WIRE_NO_ACTIONS = _WireArray(*_array_parts(NO_ACTIONS))


class _WireObservation(msgspec.Struct, forbid_unknown_fields=True):
    versions: ClassVar[tuple[int, ...]] = (2, 3)  # those whose observations carry executed actions (FIELD_SINCE)
    type: Literal["obs"]  # a field, not a msgspec tag: a tag may be left out where no union needs it
    v: Literal[versions]
    epoch: _WireCount
    seq: _WireCount
    t_capture: _WireTime
    arrays: Annotated[dict[_WireKey, _WireArray], msgspec.Meta(max_length=MAX_MAP_KEYS)]
    executed_seqs: _WireList
    executed: _WireArray

    @classmethod
    def of(cls, obs: Observation, version: int) -> "_WireObservation":
        return cls("obs", version, int(obs.epoch), int(obs.seq), float(obs.t_capture),
                   {k: _WireArray.of(a) for k, a in obs.arrays.items()}, list(obs.executed_seqs),
                   _WireArray.of(obs.executed))


class _WireChunk(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["chunk"]
    v: Literal[SUPPORTED_VERSIONS]
    epoch: _WireCount
    seq: _WireCount
    obs_seqs: _WireList
    t_capture: _WireTime
    t_actions: _WireArray
    actions: _WireArray
    timing: Annotated[dict[_WireKey, _WireFinite], msgspec.Meta(max_length=MAX_MAP_KEYS)]

    @classmethod
    def of(cls, chunk: ActionChunk, version: int) -> "_WireChunk":
        """With timing["encode"] = 0.0 as the last entry (see encode_chunk)."""
        timing = {k: v for k, v in chunk.timing.items() if k != "encode"}
        timing["encode"] = 0.0
        return cls("chunk", version, int(chunk.epoch), int(chunk.seq), list(chunk.obs_seqs), float(chunk.t_capture),
                   _WireArray.of(chunk.t_actions), _WireArray.of(chunk.actions), timing)


_CHUNK_DECODER = msgspec.msgpack.Decoder(_WireChunk)


def _decode_chunk(data: bytes) -> tuple[ActionChunk, int] | None:
    """The message if it is a valid chunk; None for anything else. Its arrays are read-only views
    into `data`, which must therefore not change: bytes."""
    try:
        wire = _CHUNK_DECODER.decode(data if type(data) is bytes else bytes(data))
        msg = ActionChunk(epoch=wire.epoch, seq=wire.seq, obs_seqs=wire.obs_seqs, t_capture=wire.t_capture,
                          t_actions=wire.t_actions.array(), actions=wire.actions.array(), timing=wire.timing)
        _check_chunk(msg)
    except Exception:  # noqa: BLE001 - msgspec's errors, bad UTF-8, a failed check: the strict decoder names it
        return None
    return msg, wire.v


class ObservationReader:
    """Reads a server's messages from robots that negotiated `spec`. msgspec checks each array's
    key, dtype and shape while it decodes an observation, in compiled code; Python checks only
    the byte counts, the finiteness of float arrays and the executed actions. A frame it does not
    take (another message, version or layout, anything wrong) goes through `decode_versioned`,
    an observation from there through `check_arrays`: they name the problem."""

    def __init__(self, spec: ObsSpec):
        self.spec = spec
        # per array: struct field, key, wire dtype, shape, byte count, whether it must be finite
        self._arrays = [(f"a{i}", key, _WIRE_DTYPES[dtype], shape, math.prod(shape) * _WIRE_DTYPES[dtype].itemsize,
                         np.dtype(dtype).kind == "f") for i, (key, (shape, dtype)) in enumerate(spec.items())]
        arrays = msgspec.defstruct(
            "SpecArrays", [(field, msgspec.defstruct(f"SpecArray_{field}", [
                ("dtype", Literal[str(spec[key][1])]), ("shape", tuple[tuple(Literal[int(n)] for n in shape)]),
                ("data", memoryview)], forbid_unknown_fields=True)) for field, key, _, shape, _, _ in self._arrays],
            rename={field: key for field, key, *_ in self._arrays}, forbid_unknown_fields=True)
        observation = type("SpecObservation", (_WireObservation,), {"__annotations__": {"arrays": arrays}})
        self._decoder = msgspec.msgpack.Decoder(observation)  # _WireObservation with these arrays

    def read(self, data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[Message, int]:
        """`decode_versioned`, and an Observation returned matches the spec (ProtocolError, with
        the observation's seq, where it does not)."""
        if len(data) <= max_bytes and (obs := self._read_observation(data)) is not None:
            return obs
        msg, version = decode_versioned(data, max_bytes)
        if type(msg) is Observation:
            try:
                check_arrays(msg.arrays, self.spec)
            except ProtocolError as exc:
                exc.seq = msg.seq
                raise
        return msg, version

    def _read_observation(self, data: bytes) -> tuple[Observation, int] | None:
        try:
            wire = self._decoder.decode(data if type(data) is bytes else bytes(data))
            arrays = {}
            for field, key, dtype, shape, size, finite in self._arrays:
                buffer = getattr(wire.arrays, field).data
                if len(buffer) != size:
                    return None
                arrays[key] = arr = np.ndarray(shape, dtype, buffer=buffer)
                if finite and not all_finite(arr):
                    return None
            msg = Observation(epoch=wire.epoch, seq=wire.seq, t_capture=wire.t_capture, arrays=arrays,
                              executed_seqs=wire.executed_seqs, executed=wire.executed.array())
            _check_executed(msg)
        except Exception:  # noqa: BLE001 - as _decode_chunk
            return None
        return msg, wire.v
