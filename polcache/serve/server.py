"""The policy server: one policy, many robots, latest observation wins.

The main thread owns the ROUTER socket. It drains every waiting message before each
dispatch, answers heartbeats, handshakes and resets at once, appends every observation to
its robot's history and keeps only the newest one per robot as pending, so a busy policy
always works on the freshest data and nothing queues without bound. One inference at a time
runs on the worker thread, for up to `max_batch` waiting robots at once (the ones served longest
ago; one backend call where the backend batches, see polcache.policy.batching); each chunk goes
back stamped with due times on the robot's clock and the time each stage took. A policy fast
enough (every recent inference under `inline_ms`) runs on the main thread instead: the two thread
wake-ups of the hand-off would cost it more than its inference (BENCHMARKS.md, transport).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from polcache.errors import PolcacheError
from polcache.config import INSTRUCTION_KEY
from polcache.policy.batching import batching_blocker
from polcache.policy.spec import CommittedActions, PolicyBackend, PolicySession, chunking_blocker
from polcache.serve.handshake import (check_handshake, operator_instruction, rate_warning, robot_obs_spec,
                                     session_instruction)
from polcache.serve.flood import DROP_PAUSE_S, FloodGuard, allowance
from polcache.serve.history import ExecutedLog, ObservationHistory
from polcache.serve.records import NO_HANDSHAKE, ErrorRecord, RequestRecord
from polcache.serve.security import apply_server_keys, check_bind, start_authenticator
from polcache.serve.worker import InferenceWorker, Job, robot_label
from polcache_client.logs import RateLimitedLog
from polcache_client.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ActionChunk,
    Error,
    Handshake,
    Heartbeat,
    Observation,
    ObservationReader,
    ProtocolError,
    Reset,
    Welcome,
    decode_versioned,
    default_deadline_ms,
    error_message,
    encode,
    encode_chunk,
)

log = logging.getLogger("polcache.serve")

# Messages per robot, each way. Small, so a flooding robot queues little; not smaller: ZeroMQ
# passes flow-control credit between its threads every HWM/2 messages, and at 4 that cost a
# thread wake-up every second message (BENCHMARKS.md, transport).
SOCKET_HWM = 16
LOOP_WAKE_MS = 100  # the longest the loop waits for a message: housekeeping and stop() run between
# A session silent this long may be forgotten for a new robot when all are taken: a robot that hears
# nothing for its timeout (the reference client's: 1 s) reconnects as a new session anyway.
EVICTABLE_SILENCE_S = 1.0
# A robot reconnecting (after a server stall, its own restart) shakes hands before the server may have
# read its old connection's closing: a name shared with a connected robot is told this much later
SHARED_NAME_CHECK_S = 0.5
# An epoch's capture times may run ahead of their arrival times by this much (sensor lag changing
# from frame to frame); more is a clock that jumped (time.time() in place of time.monotonic()).
CLOCK_JUMP_S = 5.0
# A robot that lost power or its cable is found by the kernel, not held open for minutes: TCP keepalive
# probes after 1 s of silence (every 1 s, 3 unanswered: closed), and data unacknowledged for
# DEAD_PEER_MS (TCP_USER_TIMEOUT) closes it too; the disconnect is logged. Not ZeroMQ's own heartbeats:
# libzmq 4.3.5 aborts the process ("Assertion failed: !_io_error (src/stream_engine_base.cpp:310)") when
# one falls due on a connection whose robot left while the loop was not reading (an inference on its
# thread that hung). A robot with a fixed routing id that comes back on a new connection takes its id
# over from the old one (ROUTER_HANDOVER) rather than being ignored while that one lingers.
DEAD_PEER_MS = 3000
_DEAD_PEER_OPTIONS = ((zmq.TCP_KEEPALIVE, 1), (zmq.TCP_KEEPALIVE_IDLE, 1), (zmq.TCP_KEEPALIVE_INTVL, 1),
                  (zmq.TCP_KEEPALIVE_CNT, 3), (zmq.TCP_MAXRT, DEAD_PEER_MS))
MAX_DRAIN = 1000  # messages read per loop turn, so a flood cannot starve replies
LONGEST_LOG_INTERVAL_S = 60.0  # a problem that goes on (a policy too slow all night) is said at least this often
BACKLOG_WAIT_MS = 20  # after a stall, how long a drain waits for the kernel's backlog to reach ZeroMQ's queue
LOOP_WAKE_S = LOOP_WAKE_MS / 1e3
# A wait past its timeout, or a turn's work (a drain of a flood's MAX_DRAIN messages included) past inline_ms, by
# this much: the process stood still meanwhile
STALLED_WAIT_S, STALLED_WORK_S = 0.05, 0.15
DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_MAX_BATCH = 8  # robots per inference: a batch takes longer than one row, the cap bounds that wait
DEFAULT_MAX_SESSIONS = 64  # robots served at once; no batch is larger
DEFAULT_INLINE_MS = 1.0  # inference this fast runs on the server thread (see PolicyServer)
MAX_SIMULATED_LATENCY_MS = 10_000.0  # a slower computer's inference, for tests of chunking under latency
MAX_INLINE_MS = 100.0  # beyond this, heartbeats and other robots would wait too long behind an inline inference
MIN_MESSAGE_BYTES = 4096  # the largest handshake and welcome of a small policy fit
INLINE_WINDOW = 16  # recent inference times that decide where the next one runs
WORKER_STOP_S = 10.0  # how long a stop waits for the inference under way
# pyzmq's flags and options as plain ints: combining or testing its enum members runs enum.py's Python
# (~1 us each), and even passing one costs ~0.2 us more than an int (getsockopt, twice per message)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)


_GENERATIONS = itertools.count()  # Session.generation: unique in the process


class Pending(NamedTuple):
    obs: Observation
    decode_ms: float
    received: float  # perf_counter


@dataclass
class Session:
    """One connected robot, from its handshake until it is evicted."""

    name: str
    hz: float
    history: ObservationHistory
    executed: ExecutedLog
    policy: PolicySession  # the robot's own policy state (e.g. its embedding ring buffer)
    action_offsets_s: np.ndarray  # when each action of a chunk is due, after its observation's capture
    deadline_ms: float  # observation to reply: a chunk later than this is logged and counted as late
    version: int = PROTOCOL_VERSION  # the robot's protocol version: every reply is written in it
    epoch: int = 0
    last_seen: float = 0.0
    last_served: float = 0.0  # perf_counter of its last dispatched observation: fairness across robots
    pending: Pending | None = None  # the newest observation not yet answered
    superseded: int = 0
    needs_reset: bool = True  # the policy session is reset by the worker before its next chunk
    planned: tuple[np.ndarray, np.ndarray] | None = None  # its last chunk's due times and actions (RTC)
    latency_s: float | None = None  # smoothed observation-to-reply time (RTC's delay)
    instruction: np.ndarray | None = None  # encoded; joins every observation of a language-conditioned policy
    # What the history belongs to: new at each handshake and each (re)started epoch. A chunk computed for
    # an older one is stale: a second handshake starts at epoch 0 again, and a reset may repeat its epoch.
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    last_t_capture: float = -math.inf  # the epoch's newest observation's: a robot clock must not go back
    last_obs_at: float = 0.0  # perf_counter when that observation arrived: its clock must not leap ahead either
    fd: int | None = None  # its connection's descriptor: the session closes with that connection
    # an observation read this much later than the one before it, counted from their captures: half a socket
    # queue of its periods, so more may wait in the kernel (PolicyServer._drain); once, not per observation
    backlog_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.backlog_s = SOCKET_HWM / 2 / self.hz

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generation = next(_GENERATIONS)
        self.last_t_capture = -math.inf
        self.history.clear()
        self.executed.clear()
        self.pending = None
        self.needs_reset = True
        self.planned = None

    def committed(self, t_capture: float) -> CommittedActions | None:
        """Real-time chunking's input for a chunk observed at `t_capture`: the last chunk's actions
        still due from then on, the first ceil(latency * hz) of them frozen."""
        if self.planned is None:
            return None
        t_actions, actions = self.planned
        due = actions[t_actions >= t_capture - 0.5 / self.hz]
        if not len(due):
            return None
        return CommittedActions(due, math.ceil((self.latency_s or 0.0) * self.hz))


def served_batch(backend: PolicyBackend, max_batch: int, max_sessions: int = DEFAULT_MAX_SESSIONS) -> int:
    """Robots per inference as served: 1 where the backend cannot batch, and no more than the robots
    served at once."""
    return min(max_batch, max_sessions) if batching_blocker(backend) is None else 1


def _check_options(backend: PolicyBackend, bind: str, keys_dir: str | None, insecure: bool, max_message_bytes: int,
                   deadline_ms: float | None, max_sessions: int, session_timeout_s: float, max_batch: int, rtc: bool,
                   simulated_latency_ms: float, inline_ms: float) -> None:
    """PolicyServer's options, each refused by name before anything is bound."""
    check_bind(bind, keys_dir, insecure)
    if max_batch < 1:
        raise PolcacheError(f"max_batch must be >= 1 (robots per inference), got {max_batch}")
    if not 0 <= simulated_latency_ms <= MAX_SIMULATED_LATENCY_MS:  # longer holds shutdown hostage
        raise PolcacheError(f"simulated_latency_ms must be in [0, {MAX_SIMULATED_LATENCY_MS:g}] ms, "
                            f"got {simulated_latency_ms}")
    if deadline_ms is not None and not 0 < deadline_ms < math.inf:
        raise PolcacheError(f"deadline_ms must be a positive number of ms (or None: n_action_steps - 1 periods), "
                            f"got {deadline_ms}")
    if max_sessions < 1:
        raise PolcacheError(f"max_sessions must be >= 1 (robots served at once), got {max_sessions}")
    if not 0 < session_timeout_s < math.inf:
        raise PolcacheError(f"session_timeout_s must be a positive number of seconds, got {session_timeout_s}")
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise PolcacheError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES} (a handshake must fit), "
                            f"got {max_message_bytes}")
    if not 0 <= inline_ms <= MAX_INLINE_MS:
        raise PolcacheError(f"inline_ms must be in [0, {MAX_INLINE_MS:g}] ms (inference run on the server thread), "
                            f"got {inline_ms}")
    if rtc and (why := chunking_blocker(backend)):
        raise PolcacheError(why)


def seed_routing_ids() -> None:
    """Seed the C library's rand(), from which libzmq draws a ROUTER's first routing id: unseeded, every
    server process named its first robot's session 006b8b4567 and the next 006b8b4568, so a night's
    logs across restarts mixed different sessions under one id. Where libc cannot be reached (not
    Linux or macOS), ids stay as libzmq makes them."""
    try:
        ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))
    except (OSError, AttributeError, TypeError):
        pass


class PolicyServer:
    """Serve `backend` on `bind` (use port 0 / '*' for an ephemeral one; see `endpoint`)."""

    def __init__(
        self,
        backend: PolicyBackend,
        bind: str = DEFAULT_BIND,
        *,
        keys_dir: str | None = None,
        insecure: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        deadline_ms: float | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_timeout_s: float = 60.0,
        on_record: Callable[[RequestRecord | ErrorRecord], None] | None = None,
        on_session_closed: Callable[[str], None] | None = None,
        name: str = "polcache",
        instruction: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        rtc: bool = False,
        simulated_latency_ms: float = 0.0,
        inline_ms: float = DEFAULT_INLINE_MS,
    ):
        """`on_session_closed`: told the name of each robot whose session ends (its connection closed,
        silent past `session_timeout_s`, evicted), e.g. so its metrics' gauges stop showing a reading.
        `instruction`: what a language-conditioned policy follows for robots that send none.
        `max_batch`: robots whose waiting observations share one inference (1 where the backend
        cannot batch, see polcache.policy.batching). `rtc`: real-time chunking (polcache.policy.rtc):
        each robot's next chunk is guided toward the actions of its last chunk still due, the first
        ceil(latency * hz) of them held exactly (latency: this robot's measured observation-to-reply
        time); robots should then execute the newest chunk (`sim-robot --blend latest`)."""
        _check_options(backend, bind, keys_dir, insecure, max_message_bytes, deadline_ms, max_sessions,
                       session_timeout_s, max_batch, rtc, simulated_latency_ms, inline_ms)
        self.rtc = rtc
        if instruction is not None:  # a bad default is the operator's error, refused before serving
            operator_instruction(instruction, backend.spec, "--instruction")
        self.backend = backend
        self.spec = backend.spec
        self.max_message_bytes = max_message_bytes
        self.deadline_ms = deadline_ms
        self.max_sessions = max_sessions
        blocker = batching_blocker(backend)
        self.max_batch = served_batch(backend, max_batch, max_sessions)
        if blocker is not None and max_batch > 1:
            log.info("one inference per robot: %s", blocker)
        self.session_timeout_s = session_timeout_s
        self.on_record = on_record
        self.on_session_closed = on_session_closed
        self.name = name
        self.instruction = instruction
        self._reader = ObservationReader(robot_obs_spec(self.spec))
        self._past_offsets = self.spec.frame_offsets[:-1]  # the past frames' steps, asked once per chunk
        self._log = RateLimitedLog(log, longest_s=LONGEST_LOG_INTERVAL_S)
        self._warn = self._log.warning
        self.sessions: OrderedDict[bytes, Session] = OrderedDict()
        # open connections by file descriptor: the robot (routing id, name) that shook hands on each,
        # so the monitor's disconnect event (which gives only the descriptor) can name it
        self._connections: dict[int, tuple[bytes, str]] = {}
        self._closed_fds: set[int] = set()  # descriptors whose connection closed, none opened on them since
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._backlog = False  # a robot's observation was read late: wait for its newer ones (see _drain)
        self._stall: tuple[float, float] | None = None  # the last time the server stood still, and how long
        self._next_sweep = 0.0
        self._name_checks: dict[bytes, float] = {}  # robots that shook hands: when to look for a name shared
        self._told_shared: set[str] = set()  # the sets of robots sharing a name that were said
        self._flood = FloodGuard()
        self.inline_ms = inline_ms
        self._recent_inference_ms: deque[float] = deque(maxlen=INLINE_WINDOW)

        self._ctx = zmq.Context()
        self._auth = None
        seed_routing_ids()
        self._router = self._bound_router(bind, keys_dir)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        # Connections' openings too: a closing read with a handshake is then told apart from an earlier one's.
        # The monitor is read once a second, so its queue is unbounded: at ZeroMQ's default bound (1000
        # messages) a burst of connections between two reads blocked ZeroMQ's I/O thread, and with it every
        # robot's traffic, until the next read (a test churned 1000 connections: a second without replies).
        monitor = f"inproc://polcache-monitor-{id(self)}"
        self._router.monitor(monitor, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor = self._ctx.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._monitor.connect(monitor)
        wake_endpoint = f"inproc://polcache-wake-{id(self)}"
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.bind(wake_endpoint)
        self._worker = InferenceWorker(backend, self._ctx, wake_endpoint, simulated_latency_ms / 1e3)

    def _bound_router(self, bind: str, keys_dir: str | None) -> zmq.Socket:
        """The robots' socket, bound (with CurveZMQ keys and their authenticator where `keys_dir` is
        given); nothing is left open where it cannot be."""
        router = self._ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, SOCKET_HWM), (zmq.RCVHWM, SOCKET_HWM),
                           (zmq.MAXMSGSIZE, 2 * self.max_message_bytes), (zmq.RCVTIMEO, LOOP_WAKE_MS),
                           (zmq.ROUTER_HANDOVER, 1), *_DEAD_PEER_OPTIONS):
            router.setsockopt(opt, value)
        try:
            if keys_dir:
                apply_server_keys(router, keys_dir)
                self._auth = start_authenticator(self._ctx, keys_dir)
            router.bind(bind)
        except (zmq.ZMQError, PolcacheError) as exc:
            router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise PolcacheError(f"cannot serve on {bind}: {exc}") from None
        return router

    # ------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        """Serve until stop() (from another thread or a signal handler); then release everything."""
        try:
            self._loop()
        finally:
            self._shutdown()
            self._log.flush(everything=True)  # the lines still held (the last late chunks, a stall) are said
            log.info("stopped serving on %s (%d robot session%s closed)", self.endpoint, len(self.sessions),
                     "" if len(self.sessions) == 1 else "s")

    def _loop(self) -> None:
        # While no inference is out, the loop waits in the network socket's own receive, which costs
        # fewer calls per message than a poll (BENCHMARKS.md, transport); while one is, it polls the
        # network and the worker's wake-up. Disconnects are logged once a second.
        busy = zmq.Poller()
        for sock in (self._router, self._wake):
            busy.register(sock, zmq.POLLIN)
        default = ("" if INSTRUCTION_KEY not in self.spec.obs else
                   f"; robots that send no instruction follow {self.instruction!r}" if self.instruction is not None
                   else "; robots must send an instruction (no --instruction default)")
        log.info("serving %s on %s%s", self.spec.task or "policy", self.endpoint, default)
        # The process stood still (stopped, swapped out, starved of CPU) where a wait for messages outlasts its
        # timeout by STALLED_WAIT_S, or a turn's work after it (replies, a drain, an inference on this thread) its
        # inline_ms by STALLED_WORK_S: the stall is said and the robots' backlog waited for (see _drain).
        work_limit_s = STALLED_WORK_S + self.inline_ms / 1e3
        woke = time.perf_counter()
        while not self._stop.is_set():
            waited = time.perf_counter()
            if waited - woke > work_limit_s:
                self._stood_still(waited - woke - self.inline_ms / 1e3)
            if self._busy:
                events = dict(busy.poll(LOOP_WAKE_MS))
                woke = time.perf_counter()
                if woke - waited > LOOP_WAKE_S + STALLED_WAIT_S:
                    self._stood_still(woke - waited - LOOP_WAKE_S)
                if self._wake in events:
                    self._collect_results()
                if self._backlog or self._router in events:
                    self._drain()
            else:
                try:
                    self._receive()  # waits up to LOOP_WAKE_MS (RCVTIMEO)
                except zmq.Again:
                    pass
                woke = time.perf_counter()
                if woke - waited > LOOP_WAKE_S + STALLED_WAIT_S:
                    self._stood_still(woke - waited - LOOP_WAKE_S)
                if self._backlog or self._router.getsockopt(_EVENTS) & _POLLIN:
                    self._drain()
            self._once_a_second()
            self._dispatch()  # last: the woken worker then finds the GIL free, this thread waiting

    def _stood_still(self, still_s: float) -> None:
        """The loop stood still for about `still_s` (see _loop): the robots' observations backed up
        (the next drain waits for them, see _drain), and the chunks under way are late for a reason
        that is not the policy's, which their deadline lines say. Not while stopping: a SIGTERM during a
        wait restarts it (pyzmq retries an interrupted call with its whole timeout)."""
        if self._stop.is_set():
            return
        self._stall = (time.perf_counter(), still_s)
        self._backlog = True
        self._warn("stood-still", f"the server stood still for about {still_s:.2f} s (its process stopped, swapped "
                                  f"out, starved of CPU or blocked): robots' observations from meanwhile are skipped "
                                  f"for their newest, the chunks under way come late")

    def start(self) -> "PolicyServer":
        """Serve on a background thread (tests, benchmarks, in-process robots); once only."""
        if self._thread is not None or self._stop.is_set():
            raise PolcacheError("this server was started before (its sockets close when it stops): create a new "
                                "PolicyServer")
        self._thread = threading.Thread(target=self.serve_forever, name="polcache-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait for the loop to close its sockets (serve_forever returns): up to the
        inference under way's WORKER_STOP_S, plus the loop's wake-up and a margin."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WORKER_STOP_S + 2.0)
            if self._thread.is_alive():  # an inference on the loop's own thread (the inline path) that hangs
                log.warning("the server's loop was still running %g s after the stop (an inference under way on "
                            "it): left behind", WORKER_STOP_S + 2.0)

    def _shutdown(self) -> None:
        """The robots' connections close first, then the worker is waited for. While an inference ran
        on (up to the worker's join), nothing read the connections: robots gave up and reconnected, and
        libzmq 4.3.5 aborted the process on such a connection's reset ("Assertion failed: !_io_error
        (src/stream_engine_base.cpp:310)", exit 134 instead of a clean stop)."""
        self._router.disable_monitor()
        for sock in (self._monitor, self._router):
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        stopped = self._worker.close(WORKER_STOP_S)
        self._wake.close(linger=0)
        if stopped:
            self._ctx.term()
        else:  # term() would wait for the worker's socket: forever, if the device hung
            log.warning("an inference was still running %g s after the stop: left behind (its thread ends with the "
                        "process)", WORKER_STOP_S)

    # ------------------------------------------------------------ receiving

    def _drain(self) -> None:
        """Read everything waiting before the next dispatch, so only the newest observation counts.
        After the server stalled (stopped, swapped out, starved of CPU) or the network held messages
        back, a robot's backlog goes on in the kernel's buffers beyond the SOCKET_HWM messages ZeroMQ
        queues for it, and reaches the queue only while it is read: where one was seen (`_backlog`: the
        loop stood still, an observation read late, or a turn that read a half queue more than one
        message per robot), the drain waits up to BACKLOG_WAIT_MS for the rest. Else the dispatch
        answered an observation from before the stall, its chunk past due on arrival and the robot's
        fresh one an inference later."""
        turn = 0
        for _ in range(MAX_DRAIN):
            if not self._router.getsockopt(_EVENTS) & _POLLIN:
                backlog = self._backlog or turn >= len(self.sessions) + SOCKET_HWM // 2
                self._backlog = False
                if not backlog or not self._router.poll(BACKLOG_WAIT_MS):
                    return
                turn = 0
            if not self._receive(_NOBLOCK):  # a flooder's: the robots waiting are served first
                return
            turn += 1

    def _receive(self, flags: int = 0) -> bool:
        """Read and handle one message. A robot without a session (one about to shake hands) is read
        as a zmq.Frame for its connection's file descriptor, which a disconnect event reports; the
        rest as bytes, as recv_multipart would (which makes as many calls). False: the message was a
        muted peer's, dropped unread."""
        robot = self._router.recv(flags)
        counts = self._flood.counts
        counts[robot] = counts.get(robot, 0) + 1
        if robot in self._flood.muted:
            self._drop(robot)
            return False
        fd = None
        if robot in self.sessions and robot[:1] == b"\x00":  # ZeroMQ's id: one connection ever holds it
            frames = [self._router.recv()]
        else:  # a new robot, or a fixed id that a new connection may have taken over (ROUTER_HANDOVER)
            frame = self._router.recv(copy=False)
            frames, fd = [frame.bytes], frame.get(zmq.SRCFD)
        while self._router.getsockopt(_RCVMORE):
            frames.append(self._router.recv())
        self._handle(robot, frames, fd)
        return True

    def _drop(self, robot: bytes) -> None:
        """Read a muted peer's message and drop it unread (polcache.serve.flood); tell it once a window."""
        while self._router.getsockopt(_RCVMORE):
            self._router.recv(copy=False)
        # Reading it slowly lets its connection's queue fill, so ZeroMQ stops reading it too (and the
        # flooder's sends wait); the pause frees the core and the GIL for everyone else meanwhile.
        time.sleep(DROP_PAUSE_S)
        session = self.sessions.get(robot)
        if self.on_record is not None:  # every refused message is counted, these too (they were in no metric)
            self.on_record(ErrorRecord(t=time.time(), robot=session.name if session else NO_HANDSHAKE,
                                       code="rate_limited"))
        if robot not in self._flood.told:
            self._flood.told.add(robot)
            why = (f"more than {self._allowance(robot):g} messages in one second while other robots are served: this "
                   f"robot's messages are dropped unread until it sends fewer")
            self._send(robot, encode(Error(code="rate_limited", message=why, seq=None),
                                     session.version if session else PROTOCOL_VERSION))

    def _handle(self, robot: bytes, frames: list[bytes], fd: int | None = None) -> None:
        session = self.sessions.get(robot)
        if session is not None:
            session.last_seen = time.monotonic()
            self.sessions.move_to_end(robot)
        t0 = time.perf_counter()
        version = msg = None  # the version of a readable message: a robot without a session is answered in it
        try:
            if len(frames) != 1:
                raise ProtocolError("malformed", f"expected one frame per message, got {len(frames)}")
            # a robot with a session sent its observations in the negotiated layout, which the reader
            # checks as it decodes; without one, an observation is refused with no_session first
            read = self._reader.read if session is not None else decode_versioned
            msg, version = read(frames[0], self.max_message_bytes)
            decode_ms = (time.perf_counter() - t0) * 1e3
            if isinstance(msg, (Observation, Reset)):  # observations first: nearly every message is one
                if session is None:
                    seq = msg.seq if type(msg) is Observation else None
                    raise ProtocolError("no_session", "no handshake on this connection (server restarted?): send a "
                                                      "handshake first", seq)
                if type(msg) is Observation:
                    self._on_observation(robot, session, msg, decode_ms)
                else:
                    if msg.epoch < session.epoch:  # a robot bug, as an old epoch's obs: nothing changes
                        raise ProtocolError("stale_epoch", f"reset.epoch {msg.epoch} is older than this session's epoch "
                                                           f"{session.epoch}; epochs only grow")
                    if msg.instruction is not None:  # refused whole (the epoch too) if it does not fit
                        told = session.instruction
                        session.instruction = session_instruction(msg.instruction, self.spec, None,
                                                                  "reset.instruction")
                        if told is not None and not np.array_equal(told, session.instruction):  # the operator sees
                            log.info("robot %s follows %r from epoch %d", robot_label(session.name, robot),
                                     msg.instruction, msg.epoch)  # what the policy is told, each change once
                    session.start_epoch(msg.epoch)
                    self._send(robot, frames[0])
            elif isinstance(msg, Handshake):
                self._on_handshake(robot, msg, version, fd)
            elif isinstance(msg, Heartbeat):
                self._send(robot, frames[0])
            else:
                raise ProtocolError("unknown_type", f"the server does not accept {type(msg).__name__} messages")
        except ProtocolError as exc:
            if exc.version is None:
                exc.version = version
            self._refuse(robot, session, exc, seq=exc.seq, handshake=msg if isinstance(msg, Handshake) else None)

    def _refuse(self, robot: bytes, session: Session | None, exc: ProtocolError, seq: int | None = None,
                handshake: Handshake | None = None) -> None:
        """Answer with an error: in the session's protocol version, else the refused message's where
        it was readable (a version-1 robot after a server restart reads its no_session), else ours.
        A refused `handshake` is logged under the name it announced (the metrics label stays "no
        handshake": a name refused is no robot's series), so the operator knows which robot to fix."""
        who = session.name if session else NO_HANDSHAKE  # the metrics label
        message = error_message(str(exc))
        what = (f"the handshake of {robot_label(handshake.name, robot)}" if handshake is not None
                else f"message from {robot_label(who, robot)}")
        self._warn(f"{robot.hex()}:{exc.code}", f"refused {what}: [{exc.code}] {message}")
        version = session.version if session else exc.version or PROTOCOL_VERSION
        self._send(robot, encode(Error(code=exc.code, message=message, seq=seq), version))
        if self.on_record is not None:
            self.on_record(ErrorRecord(t=time.time(), robot=who, code=exc.code))

    def _on_handshake(self, robot: bytes, msg: Handshake, version: int, fd: int | None) -> None:
        """`fd`: the connection's file descriptor (None for a robot shaking hands again on its session's)."""
        check_handshake(msg, self.spec)
        instruction = session_instruction(msg.instruction, self.spec, self.instruction, "handshake.instruction")
        if fd is not None and fd >= 0:  # -1: a transport without descriptors (inproc)
            # A descriptor is reused only after its connection closed, and that closing is queued on the
            # monitor before it: read it first, so that neither the entry below nor the session names
            # the previous connection's robot (nor its closing closes this session). Where the last
            # event read of the descriptor (now or before, at another robot's handshake) is its closing,
            # no reuse accepted after it, the connection closed is this robot's, gone since it sent the
            # handshake (a robot crashing right after its start): a session made now would never hear
            # of that and stayed for the idle timeout.
            self._log_disconnects()
            if fd in self._closed_fds:
                self._log.info(f"gone:{robot.hex()}", f"robot {robot_label(msg.name, robot)}: its connection closed "
                                                      f"right after its handshake, so no session was opened")
                return
        old = self.sessions.get(robot)
        if old is None and len(self.sessions) >= self.max_sessions:
            self._make_room()
        if (old is not None and fd is not None and old.fd is not None and min(fd, old.fd) >= 0 and fd != old.fd
                and old.fd not in self._closed_fds):  # a fixed id taken from a connection still open
            self._warn(f"takeover:{robot.hex()}:{msg.name}",
                       f"robot {robot_label(msg.name, robot)} connected under the fixed routing id of {old.name}'s "
                       f"session while that connection is still open, and took it over (ZeroMQ's ROUTER_HANDOVER): "
                       f"the robot on the older connection gets no more answers (two robots, or two copies of one, "
                       f"given one id? give each its own, or none: docs/protocol.md)")
        if old is not None and old.name != msg.name:
            self._ended(old.name)  # renamed on its connection: the old name's session ended
        if fd is None and old is not None:  # shaking hands again on its connection
            fd = old.fd
        self.sessions[robot] = Session(name=msg.name, hz=msg.hz, fd=fd,
                                       history=ObservationHistory(self.spec.n_obs_steps, self.spec.obs_stride,
                                                                  self.spec.frame_mode),
                                       executed=ExecutedLog(self.spec.history_span), policy=self.backend.session(),
                                       version=version, instruction=instruction,
                                       last_seen=time.monotonic(),
                                       deadline_ms=self.deadline_ms or default_deadline_ms(self.spec.n_action_steps,
                                                                                           msg.hz),
                                       action_offsets_s=np.arange(self.spec.n_action_steps, dtype=np.float64) / msg.hz)
        self.sessions.move_to_end(robot)
        if fd is not None and fd >= 0:
            self._connections[fd] = (robot, msg.name)
        # per session and name: robots sharing a name (or one restarted) each get their line, a renamed session too
        follows = (f", following {msg.instruction!r}" if msg.instruction is not None else
                   f", following the server's instruction {self.instruction!r}") if instruction is not None else ""
        self._log.info(f"hello:{robot.hex()}:{msg.name}",
                       f"robot {robot_label(msg.name, robot)} connected ({msg.hz:g} Hz){follows}")
        self._name_checks[robot] = time.monotonic() + SHARED_NAME_CHECK_S
        if (why := rate_warning(msg, self.spec, robot_label(msg.name, robot))) is not None:
            self._warn(f"rate:{robot.hex()}:{msg.hz}", why)
        self._send(robot, encode(Welcome(policy=self.spec.to_dict(), max_message_bytes=self.max_message_bytes,
                                         server=self.name), version))

    def _warn_shared_names(self, now: float) -> None:
        """Metrics label a robot by its name only: two connected robots with one name mix theirs.
        Looked for a moment after a handshake, and only among open connections, so a robot restarted
        or reconnecting (its old connection closed, read by now) is no other robot. One line names the
        whole set, in the order they connected (one line for the checks of several of them at once)."""
        for robot, due in list(self._name_checks.items()):
            if due > now:
                continue
            del self._name_checks[robot]
            if (session := self.sessions.get(robot)) is None:
                continue
            name = session.name
            sharing = list(dict.fromkeys(other for other, other_name in self._connections.values()
                                         if other_name == name and other in self.sessions))
            if robot not in sharing:  # a transport without descriptors (inproc)
                sharing.append(robot)
            key = f"shared-name:{name}:{','.join(sorted(r.hex() for r in sharing))}"
            if len(sharing) > 1 and key not in self._told_shared:  # each robot's check finds the same set: said once
                self._told_shared.add(key)
                *first, last = (robot_label(name, r) for r in sharing)
                self._warn(key,
                           f"robots {', '.join(first)} and {last} share one name: name them apart (the handshake's "
                           f"name: PolicyClient(name=...), sim-robot --name), or their metrics mix")

    def _make_room(self) -> None:
        """Forget the least recently seen session for a new robot, unless it is still active: a burst
        of handshakes (a process opening sockets in a loop) used to push out every running robot."""
        robot, oldest = next(iter(self.sessions.items()))
        silent_s = time.monotonic() - oldest.last_seen
        if silent_s < EVICTABLE_SILENCE_S:
            raise ProtocolError("server_full", f"this server serves at most {self.max_sessions} robot(s) at once and "
                                               f"each was heard from within the last {EVICTABLE_SILENCE_S:g} s; try "
                                               f"again once one has stopped")
        self._close(robot)
        self._warn(f"evict:{robot.hex()}", f"too many robots: forgot {robot_label(oldest.name, robot)} (least "
                                           f"recently seen, {silent_s:.1f} s ago)")

    def _on_observation(self, robot: bytes, session: Session, obs: Observation, decode_ms: float) -> None:
        """`obs` matches the negotiated spec (ObservationReader)."""
        if obs.epoch < session.epoch:  # a robot bug: reset/reconnect start a newer epoch, never an older one
            self._refuse(robot, session, ProtocolError(
                "stale_epoch", f"obs.epoch {obs.epoch} is older than this session's epoch {session.epoch}; "
                               f"observations of an ended epoch are not answered"), seq=obs.seq)
            return
        # Every check before anything changes: a refused observation leaves the session as it was (a newer
        # epoch's had started that epoch, clearing the history; a repeat's executed actions replaced those reported).
        if obs.executed_seqs and obs.executed.shape[1] != self.spec.action_dim:  # most observations report none
            self._refuse(robot, session, ProtocolError(
                "bad_shape", f"obs.executed has {obs.executed.shape[1]} values per action, the policy's actions "
                             f"have {self.spec.action_dim}"), seq=obs.seq)
            return
        newest = session.history.newest_seq
        if obs.epoch == session.epoch and newest is not None and obs.seq <= newest:  # a repeat, or counting again
            self._refuse(robot, session, ProtocolError(
                "stale_seq", f"obs.seq {obs.seq} is not newer than this epoch's last, {newest}: not answered; a robot "
                             f"that counts from the start again must reset (a new epoch)"), seq=obs.seq)
            return
        if obs.epoch > session.epoch:
            session.start_epoch(obs.epoch)
        if obs.executed_seqs:
            session.executed.record(obs.executed_seqs, obs.executed)
        arrays = obs.arrays if session.instruction is None else {**obs.arrays, INSTRUCTION_KEY: session.instruction}
        session.history.push(obs.seq, arrays)  # newer than the newest held: checked above
        now = time.perf_counter()
        gap = obs.t_capture - session.last_t_capture  # inf for an epoch's first
        if gap < 0:
            self._clock_went_back(robot, session, obs)
        elif gap > now - session.last_obs_at + CLOCK_JUMP_S and gap != math.inf:
            self._warn(f"{robot.hex()}:clock-ahead",
                       f"{robot_label(session.name, robot)}: obs.t_capture of seq {obs.seq} is {gap:.3f} s later than "
                       f"the last observation's in epoch {obs.epoch}, which arrived {now - session.last_obs_at:.3f} s "
                       f"before it: the robot's clock jumped ahead; stamp observations with one monotonic clock "
                       f"(time.monotonic(), not time.time())")
        if now - session.last_obs_at - gap > session.backlog_s:  # more of the robot's observations may wait in
            self._backlog = True  # the kernel (see _drain)
        session.last_t_capture, session.last_obs_at = obs.t_capture, now
        if session.pending is not None:
            session.superseded += 1
        session.pending = Pending(obs, decode_ms, now)

    def _clock_went_back(self, robot: bytes, session: Session, obs: Observation) -> None:
        """A t_capture earlier than the epoch's last: a robot stamping with a wall clock that NTP stepped
        back (time.time(), not a monotonic clock). Its chunks still come (their due times are on the
        robot's clock, whatever it is), but real-time chunking's plan, on the old time line, would count
        every old action as still due and freeze stale ones: it starts over."""
        session.planned = None
        self._warn(f"{robot.hex()}:clock", f"{robot_label(session.name, robot)}: obs.t_capture of seq {obs.seq} is "
                                           f"{session.last_t_capture - obs.t_capture:.3f} s earlier than the last "
                                           f"observation's in epoch {obs.epoch}; stamp observations with a monotonic "
                                           f"clock (time.monotonic(), not time.time())")

    def _log_disconnects(self) -> None:
        """Log the connections closed since the last call, closing their sessions; keep which
        descriptors' last event was a closing (`_closed_fds`)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            fd = event["value"]  # either event's value: the descriptor
            if event["event"] != zmq.EVENT_DISCONNECTED:  # opened: a closing before it was another connection's
                self._closed_fds.discard(fd)
                continue
            self._closed_fds.add(fd)
            robot, name = self._connections.pop(fd, (b"", ""))  # none: it closed before shaking hands
            limit = f"a message over the {2 * self.max_message_bytes}-byte transport limit"
            # the authenticator logs the keys it refuses, never a robot that presented none
            refused = (", a robot without CurveZMQ keys or with keys refused (logged before if so)"
                       if self._auth is not None else "")
            # Its session goes with it: it was logged again a minute later as "silent", and counted as
            # served at shutdown. Only where ZeroMQ made up the routing id (a zero first byte; a peer's
            # own ids cannot start with one): a reconnect gets a new id, so the session is unreachable.
            # A robot with a fixed id comes back under it (ZeroMQ reconnects after a network blip) and
            # keeps its session; nor is a session closed that such a robot opened on a new connection.
            session = self.sessions.get(robot)
            closed = session is not None and session.fd == fd and robot[:1] == b"\x00"
            if closed:
                self._close(robot)
            self._log.info(f"disconnect:{robot.hex()}",
                           f"robot {robot_label(name, robot)} disconnected (robot exited or reconnecting, network "
                           f"loss, or {limit}){': session closed' if closed else ''}"
                           if robot else f"a connection closed before any handshake (a health check such as "
                                         f"launch's, a robot that exited{refused}, or {limit})")

    # ------------------------------------------------------------ inference

    def _dispatch(self) -> None:
        if self._busy:
            return
        waiting = [robot for robot, s in self.sessions.items() if s.pending is not None]
        if not waiting:
            return
        # The robots served longest ago go first. (Least recently *seen* is not fair: robots that
        # send at the same instant every tick keep the same arrival order, and the first would
        # win every time.) A robot left out by max_batch is older than all served now: next turn
        # it goes first.
        if len(waiting) > 1:
            waiting.sort(key=lambda r: self.sessions[r].last_served)
        robots = waiting[:self.max_batch]
        jobs = [self._job(robot, len(waiting), len(robots)) for robot in robots]
        if self._runs_inline():
            for job in self._worker.infer(jobs):
                self._reply(job)
            return
        self._busy = True
        self._worker.submit(jobs)

    def _runs_inline(self) -> bool:
        """Whether the next inference runs on this thread: only once the window of recent
        inference times is full and all of it under inline_ms, so a slow policy never blocks here
        and a fast one that turns slow goes back to the worker after one inference."""
        recent = self._recent_inference_ms
        return len(recent) == INLINE_WINDOW and max(recent) < self.inline_ms

    def _job(self, robot: bytes, queue_depth: int, batch_size: int) -> Job:
        """Take `robot`'s pending observation into a job: its window, its executed actions."""
        session = self.sessions[robot]
        pending = session.pending
        t0 = time.perf_counter()
        obs_seqs, stacked = session.history.window()
        job = Job(robot=robot, name=session.name, epoch=session.epoch, generation=session.generation,
                  seq=pending.obs.seq, obs_seqs=obs_seqs,
                  t_capture=pending.obs.t_capture, received=pending.received, obs=stacked, session=session.policy,
                  reset_session=session.needs_reset, queue_depth=queue_depth, batch_size=batch_size,
                  superseded=session.superseded,
                  past_actions=session.executed.at(pending.obs.seq, self._past_offsets, self.spec.action_dim)
                  if self._past_offsets else None,
                  committed=session.committed(pending.obs.t_capture) if self.rtc else None)
        job.timing.update(decode=pending.decode_ms, preprocess=(time.perf_counter() - t0) * 1e3,
                          queue=(t0 - pending.received) * 1e3)
        session.pending, session.superseded, session.needs_reset = None, 0, False
        session.last_served = t0
        return job

    def _collect_results(self) -> None:
        self._wake.recv()  # the worker's one wake-up per batch, sent after the batch's results
        self._busy = False
        for job in self._worker.done.get_nowait():
            self._reply(job)

    def _reply(self, job: Job) -> None:
        if job.actions is not None:
            self._recent_inference_ms.append(job.timing["inference"])
        session = self.sessions.get(job.robot)
        if session is None or session.generation != job.generation:
            return  # the robot reset, shook hands again or left while we computed: the chunk would be stale
        if job.actions is None:  # the window that failed is not reused: a frame in it (say a finite 1e30 the
            # network overflows on) would fail every window it is part of. Its steps are forgotten; an
            # observation that arrived meanwhile stays pending and starts the next window afresh.
            session.history.drop_through(job.seq)
            session.needs_reset = True
            self._refuse(job.robot, session, ProtocolError("inference", f"{job.error} (this robot's observation "
                                                                        f"history up to {job.seq} was cleared)"),
                         seq=job.seq)
            return
        chunk = ActionChunk(epoch=job.epoch, seq=job.seq, obs_seqs=job.obs_seqs, t_capture=job.t_capture,
                            t_actions=job.t_capture + session.action_offsets_s, actions=job.actions,
                            timing=job.timing)
        frame, encode_ms = encode_chunk(chunk, session.version)
        total_ms = (time.perf_counter() - job.received) * 1e3 + job.timing["decode"]  # before the send, which
        self._send(job.robot, frame)  # hands the reply to ZeroMQ: a process stopped right after it is no late chunk
        if self.rtc:
            session.planned = (chunk.t_actions, job.actions)
            seen = total_ms / 1e3
            session.latency_s = seen if session.latency_s is None else 0.7 * session.latency_s + 0.3 * seen
        timing = job.timing
        late = total_ms > session.deadline_ms
        if late:  # said with where the time went: a policy too slow for this robot's rate, or robots waiting before it
            robots = f"{job.batch_size} robot{'' if job.batch_size == 1 else 's'}"
            stood_still = (f"; the server stood still for about {self._stall[1]:.2f} s meanwhile (process stopped, "
                           f"swapped out, starved of CPU or blocked), which these times include"
                           if self._stall is not None and self._stall[0] > job.received else "")
            self._warn(f"{job.robot.hex()}:deadline", f"observation {job.seq} (epoch {job.epoch}) of "
                                                      f"{robot_label(session.name, job.robot)} "
                                                      f"took {total_ms:.1f} ms, over its {session.deadline_ms:.1f} ms "
                                                      f"deadline (inference {timing['inference']:.1f} ms for {robots}, "
                                                      f"waiting {timing['queue']:.1f} ms before it){stood_still}")
        if self.on_record is not None:  # built only for a listener
            self.on_record(RequestRecord(
                t=time.time(), robot=session.name, epoch=job.epoch, seq=job.seq, decode_ms=timing["decode"],
                preprocess_ms=timing["preprocess"], queue_ms=timing["queue"], inference_ms=timing["inference"],
                postprocess_ms=timing["postprocess"], encode_ms=encode_ms, total_ms=total_ms,
                queue_depth=job.queue_depth, batch_size=job.batch_size, superseded=job.superseded,
                deadline_miss=late))

    # ------------------------------------------------------------ plumbing

    def _send(self, robot: bytes, frame: bytes) -> None:
        try:  # a ROUTER drops (never blocks on) messages to a full or departed robot
            self._router.send(robot, _SEND_MORE)  # two sends: send_multipart's checks cost more
            self._router.send(frame, _NOBLOCK)
        except zmq.ZMQError as exc:
            self._warn("send", f"reply to {robot.hex()} not sent: {exc}")

    def _once_a_second(self) -> None:
        """Housekeeping kept off the per-message path: closed connections logged, silent robots forgotten."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        self._log.flush()  # a held line (the last late chunk of a burst, a stall) is said, with its count
        self._log_disconnects()
        self._warn_shared_names(now)
        for robot, n in self._flood.new_window(self._allowance).items():
            session = self.sessions.get(robot)
            self._warn(f"flood:{robot.hex()}", f"{robot_label(session.name if session else NO_HANDSHAKE, robot)} sent "
                                               f"{n} messages in one second, more than its {self._allowance(robot):g}, "
                                               f"while other robots were served: its messages are dropped unread "
                                               f"until it sends fewer")
        for robot, session in list(itertools.takewhile(lambda kv: now - kv[1].last_seen > self.session_timeout_s,
                                                       self.sessions.items())):
            log.info("robot %s silent for %.0f s (over the %g s session timeout): session closed",
                     robot_label(session.name, robot), now - session.last_seen, self.session_timeout_s)
            self._close(robot)

    def _close(self, robot: bytes) -> None:
        """Forget a robot's session, and say so to `on_session_closed`."""
        self._ended(self.sessions.pop(robot).name)

    def _ended(self, name: str) -> None:
        if self.on_session_closed is not None:
            self.on_session_closed(name)

    def _allowance(self, robot: bytes) -> float:
        session = self.sessions.get(robot)
        return allowance(session.hz if session else None)

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
