"""The robot's connection to a policy server: handshake, non-blocking observation sends,
heartbeats, and reconnection without ever blocking the control loop.

A silent server (no reply for `timeout_s`) or a server that no longer knows this robot
(`no_session`, e.g. after a restart) starts a new connection and a new epoch, so no chunk
from before the interruption can be executed after it.
"""

from __future__ import annotations

import logging
import math
import socket
import time

import numpy as np
import zmq
from msgspec.structs import replace

from polcache_client.curve import apply_client_keys
from polcache_client.logs import RateLimitedLog
from polcache_client.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HZ,
    MAX_INSTRUCTION_BYTES,
    MIN_HZ,
    PROTOCOL_VERSION,
    ActionChunk,
    Error,
    Handshake,
    Heartbeat,
    Message,
    Observation,
    ObsSpec,
    ProtocolError,
    Reset,
    Welcome,
    check_action_width,
    check_arrays,
    decode,
    encode,
    instruction_bytes,
    robot_name,
)
from polcache_client.rate import Clock, MonotonicClock

log = logging.getLogger("polcache_client")

SOCKET_HWM = 4  # messages; a full queue drops observations instead of delaying them
MAX_DRAIN = 256  # messages read per poll, so a flood cannot stall a tick
STILL_LOST_LOG_S = 5.0  # while a lost server does not answer, a line this often says the robot still waits


class ConnectError(RuntimeError):
    """The server could not be reached, or refused this robot's handshake: then `code` is its error
    code (docs/protocol.md), for a program to act on without reading the message."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def _check_obs_spec(obs_spec: ObsSpec) -> None:
    """Refused here, naming the key, rather than as a TypeError at the first observation."""
    if not isinstance(obs_spec, dict) or not obs_spec:
        raise ValueError(f"obs_spec: expected a dict of key -> (shape, dtype name), got {obs_spec!r}")
    for key, entry in obs_spec.items():
        ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], str)
              and isinstance(entry[0], (tuple, list)) and all(type(n) is int and n >= 0 for n in entry[0]))
        if not ok:
            raise ValueError(f"obs_spec[{key!r}]: expected (shape tuple of ints, dtype name), e.g. ((39,), 'float32'), "
                             f"got {entry!r}")


def _unresolved_host(address: str) -> str | None:
    """Why the host of a tcp:// `address` does not resolve, if it does not: ZeroMQ resolves it in the
    background and says nothing, so a mistyped name looked like a server not running."""
    if not address.startswith("tcp://"):
        return None
    host = address[len("tcp://"):].rpartition(":")[0].rpartition(";")[2].strip("[]")  # tcp://[source;]host:port
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        return f"the host name {host!r} does not resolve ({exc})"
    return None


class PolicyClient:
    """This robot's connection to a policy server at `address` (e.g. tcp://host:5555; with
    `keys_dir` over CurveZMQ): `connect()` waits for the welcome (the policy's spec), then
    `send_observation` never blocks and `poll()` returns the chunks that arrived. A server silent
    for `timeout_s`, or one that forgot this robot, is reconnected to in a new epoch. Usually
    driven by ControlLoop rather than called directly."""

    def __init__(
        self,
        address: str,
        obs_spec: ObsSpec,
        action_dim: int,
        hz: float,
        *,
        name: str = "robot",
        keys_dir: str | None = None,
        heartbeat_s: float = 0.25,
        timeout_s: float = 1.0,
        clock: Clock | None = None,
        context: zmq.Context | None = None,
        version: int = PROTOCOL_VERSION,
        instruction: str | None = None,
    ):
        """`obs_spec`: key -> (shape, dtype name) of one control step's observation. `heartbeat_s`:
        how often a welcomed client pings (and an unwelcomed one repeats its handshake); a server
        silent for `timeout_s` is reconnected to, so it must be longer. `instruction`: what a
        language-conditioned policy should do (protocol version 3; a policy without language
        ignores it); `reset` may change it per episode. An instruction no policy could follow
        (not a string, not UTF-8, empty, containing NUL, over 1024 bytes) is refused here with a
        ProtocolError (a ValueError), code `bad_instruction`."""
        if not 0 < heartbeat_s < timeout_s < math.inf:
            raise ValueError(f"heartbeat_s and timeout_s: expected 0 < heartbeat_s < timeout_s (finite seconds), "
                             f"got {heartbeat_s} and {timeout_s}")
        _check_obs_spec(obs_spec)
        if isinstance(hz, bool) or not (isinstance(hz, (int, float, np.number)) and MIN_HZ <= hz <= MAX_HZ):
            raise ValueError(f"hz: expected a control rate in [{MIN_HZ:g}, {MAX_HZ:g}] Hz, got {hz!r}")
        robot_name(name)
        port = address.rpartition(":")[2]
        if address.startswith("tcp://") and port.isdigit() and not 0 < int(port) < 65536:  # ZeroMQ: modulo 65536
            raise ConnectError(f"cannot connect to {address!r} (expected e.g. tcp://host:5555): port {port} is not "
                               "in 1..65535")
        self.policy: dict | None = None  # the server's PolicySpec, once welcomed
        if instruction is not None:
            self._check_instruction(instruction)
        self.address = address
        self.version = version  # 2 reports executed actions, 3 instructions; older servers get their version
        self.obs_spec = obs_spec
        self.keys_dir = keys_dir
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.clock = clock or MonotonicClock()
        self._hello = Handshake(obs_spec=obs_spec, action_dim=action_dim, hz=float(hz), name=name,
                                instruction=instruction)
        self._handshake = encode(self._hello, version)
        self._context = context or zmq.Context.instance()
        self._warn = RateLimitedLog(log).warning
        self.epoch = 0  # bumped on every reset and reconnect
        self.seq = -1  # of the last observation (sent or not) in this epoch
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.rtt_s = float("nan")
        self.connections = 0  # welcomes received: the first connection and every reconnect
        self.policy_changes = 0  # reconnects that found another policy or server than the connection before
        self.server = ""  # the welcoming server's name (welcome.server)
        self._full = ""  # the server's last server_full refusal of our handshake, if any
        self._lost_at: float | None = None  # when the connection was lost (until a welcome), for the waiting line
        self._lost_how = "the connection was lost"  # or how the robot learned it must reconnect
        self._next_lost_log = 0.0
        self._polled_at, self._unpolled_s = self.clock.now(), 0.0  # the last poll, and the gap before this one
        self._socket: zmq.Socket | None = None
        self._open()

    @property
    def ready(self) -> bool:
        """Welcomed by the server (and not closed): observations are sent."""
        return self._ready

    @property
    def action_dim(self) -> int:
        """The width of this robot's actions, as its handshake states it."""
        return self._hello.action_dim

    @property
    def hz(self) -> float:
        """The control rate this robot announced; the server times each chunk's actions at it."""
        return self._hello.hz

    def _open(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_BYTES)
        if self.keys_dir:
            apply_client_keys(sock, self.keys_dir)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConnectError(f"cannot connect to {self.address!r} (expected e.g. tcp://host:5555): {exc}") from None
        self._socket = sock
        # Instructions asked for, oldest first, as (epoch of the reset, text, awaiting the server's
        # answer): the first is the one the server follows, an accepted one drops those before it, a
        # refused one is removed; the handshake carries the last, so a reconnect never repeats a
        # refused instruction (which would be refused again, and for good).
        self._instructions: list[tuple[int, str | None, bool]] = [(self.epoch, self._hello.instruction, False)]
        # An instruction whose reset found the send queue full: sent before this epoch's first
        # observation (which would start the epoch under the previous instruction), or not at all.
        self._held_instruction: str | None = None
        now = self.clock.now()
        self._ready = False
        self._handshake_due = now
        self._last_rx = now
        self._last_heartbeat = now

    def _reconnect(self, reason: str, forgotten: bool = False) -> None:
        """`forgotten`: the server answered that it does not know this robot (restarted while its heartbeats,
        which any server answers, kept the connection looking alive): counted from that answer."""
        log.warning("%s; reconnecting to %s with a new epoch", reason, self.address)
        if self._lost_at is None:  # when it was last heard from, not when the silence was noticed
            self._lost_at = self._last_rx
            self._lost_how = "the server said it did not know this robot" if forgotten else "the connection was lost"
        self._next_lost_log = self.clock.now() + STILL_LOST_LOG_S
        self.epoch += 1
        self.seq = -1
        self._open()

    def _send(self, frame: bytes) -> bool:
        try:
            self._socket.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def connect(self, timeout_s: float = 10.0) -> dict:
        """Block until the server welcomes this robot; returns the policy spec."""
        self._check_open()
        deadline = time.monotonic() + timeout_s
        while not self._ready:
            if time.monotonic() > deadline:
                if self._full:
                    raise ConnectError(f"the policy server at {self.address} stayed full for {timeout_s:g} s: {self._full}")
                unresolved = _unresolved_host(self.address)
                hint = (f": {unresolved}" if unresolved else
                        f" (none running there, or one that does not admit this robot's keys: CurveZMQ refuses a "
                        f"client key or server.key it does not know without any reply; check client.key_secret and "
                        f"server.key in {self.keys_dir})" if self.keys_dir else
                        f" (none running there? one started with --keys answers only robots given its keys; one "
                        f"still loading and warming up its policy answers once it serves, which can take longer than "
                        f"{timeout_s:g} s on a slow computer: a longer timeout_s waits for it)")
                raise ConnectError(f"no answer from a policy server at {self.address} within {timeout_s:g} s{hint}")
            self.poll()
            self._socket.poll(10)
        return self.policy

    def poll(self) -> list[ActionChunk]:
        """Read everything the server sent (never blocks); returns the action chunks among it."""
        self._check_open()
        now = self.clock.now()
        self._unpolled_s, self._polled_at = now - self._polled_at, now  # a pause on the robot shows here
        chunks = []
        for _ in range(MAX_DRAIN):
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._last_rx = now
            try:
                msg = decode(frame)
                if type(msg) is ActionChunk:  # as NaN actions: refused, never handed to act()
                    check_action_width(msg, self._hello.action_dim)
            except ProtocolError as exc:
                self._warn(exc.code, f"unreadable message from server: {exc}")
                continue
            if isinstance(msg, ActionChunk):
                chunks.append(msg)
            elif not self._handle(msg, now):
                return chunks  # the connection was replaced; the rest belonged to the old one
        self._keep_alive(now)
        return chunks

    def _handle(self, msg: Message, now: float) -> bool:
        """Handle a non-chunk message; False when it replaced the connection."""
        if isinstance(msg, Welcome):
            policy_dim = msg.policy.get("action_dim", self._hello.action_dim)
            if not self._ready and policy_dim != self._hello.action_dim:  # a server that skipped its check
                raise ConnectError(f"server at {self.address} welcomed this robot to a policy with action_dim "
                                   f"{policy_dim!r}, but this robot's is {self._hello.action_dim}")
            if not self._ready:
                changed = _changes(self.policy, msg.policy, self.server, msg.server) if self.connections else ""
                if changed:  # a server restarted with another checkpoint, or (polcache serve's name) sampler or cache
                    self.policy_changes += 1
                    log.warning("the server at %s serves another policy than before this reconnect (%s): the chunks "
                                "from now on are its", self.address, changed)
                self._ready, self.policy, self.server = True, msg.policy, msg.server
                self.max_message_bytes = msg.max_message_bytes
                self.connections += 1
                lost = f", {now - self._lost_at:.1f} s after {self._lost_how}" if self._lost_at is not None else ""
                log.info("connected to %s at %s (epoch %d%s)", msg.server, self.address, self.epoch, lost)
                self._lost_at = None
        elif isinstance(msg, Heartbeat):
            self.rtt_s = now - msg.t
        elif isinstance(msg, Error):
            if msg.code == "version" and not self._ready and self.version > 1:
                self.version -= 1  # an older server: try its version (fewer fields)
                self._handshake = encode(self._hello, self.version)
                self._handshake_due = now
                log.info("server at %s does not speak our protocol version: falling back to version %d",
                         self.address, self.version)
                return True
            if msg.code == "server_full" and not self._ready:  # every session active: the handshake is resent
                self._warn(msg.code, f"server at {self.address} is full, retrying: {msg.message}")
                self._full = msg.message
                return True
            if msg.code == "spec_mismatch" or not self._ready:  # before the welcome only a handshake was sent
                raise ConnectError(f"server at {self.address} refused the handshake: [{msg.code}] {msg.message}",
                                   msg.code)
            if msg.code == "no_session":
                self._reconnect(f"server does not know this robot ({msg.message})", forgotten=True)
                return False
            if msg.code == "bad_instruction" and self._instruction_refused(msg.message):
                return True
            self._warn(msg.code, f"server error {msg.code} (seq {msg.seq}): {msg.message}")
        elif isinstance(msg, Reset):
            if msg.instruction is not None:
                self._instruction_accepted(msg.epoch)
        else:
            self._warn("unexpected", f"unexpected {type(msg).__name__} message from server")
        return True

    def _instruction_accepted(self, epoch: int) -> None:
        """The server echoed the reset of `epoch`: it follows that reset's instruction from now on."""
        for i, (e, text, awaiting) in enumerate(self._instructions):
            if e == epoch and awaiting:
                self._instructions[: i + 1] = [(e, text, False)]
                return

    def _instruction_refused(self, message: str) -> bool:
        """The server refused a reset's instruction (and keeps the previous one): forget it. It
        answers resets in order, so the refused one is the oldest awaiting an answer. False when
        none awaits one (the refusal is then only logged)."""
        awaiting = [i for i, (_, _, waits) in enumerate(self._instructions) if waits]
        if not awaiting:
            return False
        _, refused, _ = self._instructions.pop(awaiting[0])
        self._set_instruction(self._instructions[-1][1])
        self._warn("bad_instruction", f"server refused the instruction {refused!r} and keeps the previous one "
                                      f"({self._instructions[0][1]!r}): {message}")
        return True

    def _set_instruction(self, instruction: str | None) -> None:
        """The instruction the next handshake carries."""
        if instruction != self._hello.instruction:
            self._hello = replace(self._hello, instruction=instruction)
            self._handshake = encode(self._hello, self.version)

    def _check_instruction(self, instruction: str) -> None:
        """Refuse, before anything changes, what the server would refuse: the protocol's limits and,
        once welcomed by a language-conditioned policy, that policy's (welcome.policy.obs.instruction
        has shape (n,): it reads at most n bytes)."""
        try:
            limit = min(int(self.policy["obs"]["instruction"]["shape"][0]), MAX_INSTRUCTION_BYTES)
        except (TypeError, KeyError, IndexError, ValueError):  # not welcomed yet, or a policy without language
            limit = MAX_INSTRUCTION_BYTES
        instruction_bytes(instruction, limit)
        if len(instruction.encode("utf-8")) > MAX_INSTRUCTION_BYTES:  # the wire counts surrounding spaces too
            raise ProtocolError("bad_instruction", f"instruction: more than {MAX_INSTRUCTION_BYTES} UTF-8 bytes")

    def _keep_alive(self, now: float) -> None:
        if self._ready and now - self._last_rx > self.timeout_s:
            paused = (f" (this robot did not poll for {self._unpolled_s:.2f} s of it: a pause here, such as a "
                      f"stalled loop or process, not necessarily the server)" if self._unpolled_s > self.timeout_s / 2
                      else "")
            self._reconnect(f"no reply from server for {now - self._last_rx:.2f} s{paused}")
        elif not self._ready and now >= self._handshake_due:
            self._handshake_due = now + self.heartbeat_s
            self._send(self._handshake)
            if self._lost_at is not None and now >= self._next_lost_log:  # the operator sees it still waits
                self._next_lost_log = now + STILL_LOST_LOG_S
                log.warning("still no answer from %s, %.0f s after %s (handshake resent every %.2g s)", self.address,
                            now - self._lost_at, self._lost_how, self.heartbeat_s)
        elif self._ready and now - self._last_heartbeat >= self.heartbeat_s:
            self._last_heartbeat = now
            self._send(encode(Heartbeat(t=now), self.version))

    def send_observation(self, arrays: dict, t_capture: float,
                         executed: list[tuple[int, np.ndarray]] | None = None) -> bool:
        """Send one control step's observation without blocking. False (and a log line for
        invalid data) when it was not sent; the step still consumes a sequence number.
        `executed`: (seq, action) applied at earlier ticks of this epoch since the last
        observation (protocol version 2; dropped when talking to a version-1 server)."""
        self._check_open()
        self.seq += 1
        if not self._ready:
            return False
        try:
            check_arrays(arrays, self.obs_spec)
            done = [(s, a) for s, a in (executed or []) if 0 <= s < self.seq] if self.version >= 2 else []
            frame = encode(Observation(epoch=self.epoch, seq=self.seq, t_capture=t_capture, arrays=arrays,
                                       executed_seqs=[int(s) for s, _ in done],
                                       executed=(np.stack([np.asarray(a, np.float32) for _, a in done]) if done
                                                 else np.zeros((0, 0), np.float32))), self.version)
            if len(frame) > self.max_message_bytes:
                raise ProtocolError("too_large", f"{len(frame)} bytes exceed the server's limit of {self.max_message_bytes}")
        except ProtocolError as exc:
            self._warn(exc.code, f"observation {self.seq} not sent: {exc}")
            return False
        return self._send_held_reset() and self._send(frame)

    def _send_held_reset(self) -> bool:
        """Send the reset whose instruction found the send queue full; False while it still does."""
        if self._held_instruction is None:
            return True
        if not self._send(encode(Reset(epoch=self.epoch, instruction=self._held_instruction), self.version)):
            return False
        self._instructions[-1] = (self.epoch, self._held_instruction, True)  # now it is answered
        self._held_instruction = None
        return True

    def reset(self, instruction: str | None = None) -> int:
        """Start a new episode: a new epoch, so old chunks can never be executed in it. A new
        `instruction` holds from this episode on (also across reconnects) unless the server refuses
        it (`bad_instruction`, logged), which keeps the previous one; one the server would refuse
        for certain raises ProtocolError (a ValueError) here, and nothing changes."""
        if instruction is not None:
            self._check_instruction(instruction)
        self.epoch += 1
        self.seq = -1
        if self._held_instruction is not None:  # it never reached the server: this reset carries it on
            self._instructions.pop()
            instruction = instruction if instruction is not None else self._held_instruction
            self._held_instruction = None
        sent = self._ready and self._send(encode(Reset(epoch=self.epoch, instruction=instruction), self.version))
        if instruction is not None:
            if self._ready and self.version >= 3:  # a sent reset is answered; an unsent one is sent again first
                self._instructions.append((self.epoch, instruction, sent))
                self._held_instruction = None if sent else instruction
            else:  # the next handshake carries it (a version-2 server never sees it)
                self._instructions = [(self.epoch, instruction, False)]
            self._set_instruction(instruction)
        return self.epoch

    def close(self) -> None:
        """Close the connection; the client cannot be used again (create a new one)."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._ready = False

    def _check_open(self) -> None:
        if self._socket is None:
            raise ConnectError(f"this client's connection to {self.address} was closed: create a new PolicyClient")

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _changes(policy: dict, new_policy: dict, server: str, new_server: str) -> str:
    """What differs between two welcomes: each changed policy field (its values where short), and the server."""
    changed = [f"{key} {policy.get(key)!r} -> {new_policy.get(key)!r}" if len(repr(policy.get(key))) < 40 else key
               for key in sorted(set(policy) | set(new_policy)) if policy.get(key) != new_policy.get(key)]
    return ", ".join(changed + ([f"server {server!r} -> {new_server!r}"] if server != new_server else []))
