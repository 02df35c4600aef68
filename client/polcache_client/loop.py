"""The fixed-Hz control loop: one tick reads the robot, sends the observation without
waiting, and executes the action due now, while the server computes the next chunk.

Nothing in a tick blocks on the network, so inference overlaps execution and a slow or
dead server degrades to holding, then a safe stop, never to a stalled loop.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import Callable

import numpy as np

from polcache_client.adapter import RobotAdapter
from polcache_client.connection import PolicyClient
from polcache_client.logs import RateLimitedLog
from polcache_client.rate import Clock, MonotonicClock, Rate
from polcache_client.records import ChunkRecord, TickRecord
from polcache_client.schedule import ActionSchedule
from polcache_client.signals import interrupts_deferred, sigterm_as_interrupt
from polcache_client.watchdog import Decision, State, Watchdog

log = logging.getLogger(__name__)
LATE_CHUNK_LOG_S = 5.0  # at most one line this often about late chunks, and about ticks skipped
# An adapter's capture time further than this from its observe() call is on another clock (time.time(), a
# camera's hardware clock), not a lagging sensor: refused, rather than every action timed that far off.
MAX_CAPTURE_AGE_S = 10.0
CAPTURE_CLOCK_SLACK_S = 1e-3  # a capture stamped this much after observe() returned is rounding, not a clock mix-up
STOPPING = "stopping the robot safely"  # said when a Ctrl-C is held until the robot's safe stop returns
RESUMING = "waking the robot (the adapter's resume())"  # likewise while resume() runs


class ControlLoop:
    """Drive `adapter` at `hz` from `client`'s chunks: `run(seconds=...)` ticks (observe, send
    without waiting, act on the action due now) until done, then safe-stops the robot it moved;
    Ctrl-C, SIGTERM or any exception out of a tick safe-stops it before it propagates. `reset_episode()`
    starts a new epoch. With no fresh action the last one is held for the watchdog's `hold_s`
    (0.2 s), then `safe_stop` is called once; acting resumes when fresh actions return, never on what
    was planned before the stop, nor planned from the robot in motion (a stop starts a new epoch). The
    robot is never told to stop twice in a row (but a safe_stop that raised is tried once more on the
    way out, and a robot a raising resume() may have half woken is stopped again). Driven from one
    thread: call `stop()` and `reset_episode()` from the thread that runs it; from any other thread (an
    operator's stop button, a supervisor), `request_stop()`, which latches. `on_tick`/`on_chunk` receive
    per-tick and per-chunk records (loop timing, latency); `on_tick` also gets a record of the loop's own
    safe stop (see `stop`), so that the tick records' `safe_stops` count every stop, the watchdog's and
    the loop's."""

    def __init__(
        self,
        adapter: RobotAdapter,
        client: PolicyClient,
        hz: float,
        *,
        schedule: ActionSchedule | None = None,
        watchdog: Watchdog | None = None,
        clock: Clock | None = None,
        on_tick: Callable[[TickRecord], None] | None = None,
        on_chunk: Callable[[ChunkRecord], None] | None = None,
    ):
        _check_adapter(adapter, client)
        if abs(client.hz - hz) > 1e-9 * hz:  # the server would time each chunk's actions at the client's rate
            raise ValueError(f"hz: the loop ticks at {hz:g} Hz but the client told the server {client.hz:g} Hz; "
                             "give both the same rate")
        if schedule is not None and abs(schedule.hz - hz) > 1e-9 * hz:  # it would judge actions due at its own rate
            raise ValueError(f"schedule: built for {schedule.hz:g} Hz but the loop ticks at {hz:g} Hz; give both the "
                             "same rate")
        self.adapter = adapter
        self.client = client
        self.clock = clock or MonotonicClock()
        self.rate = Rate(hz, self.clock)
        self.schedule = schedule or ActionSchedule(hz)
        self.watchdog = watchdog or Watchdog()
        self.on_tick = on_tick
        self.on_chunk = on_chunk
        self.schedule.reset(client.epoch)
        self._executed: list[tuple[int, int, object]] = []  # (epoch, seq, action) not yet reported
        self._log = RateLimitedLog(log, interval_s=LATE_CHUNK_LOG_S)
        self._warn = self._log.warning
        self._work_s = 0.0  # how long the last tick's work took (observe, send, act or safe_stop, callbacks)
        self._acted = False  # an action was applied since the robot was last told to stop: `stop` undoes it
        self._acted_for: float | None = None  # the step (grid time) the last applied action was due at: see tick()
        self._capture_time = getattr(adapter, "capture_time", None)  # optional: see RobotAdapter
        self._resume = getattr(adapter, "resume", None)  # optional: see RobotAdapter
        self._stopped = False  # told to safe-stop, not resumed since: `resume()` comes before its next action
        self._capture_age_s = 0.0  # the last observation's age when observe() was called (its sensors' lag)
        self._last_capture = (-1, -math.inf)  # (epoch, time) of the last observation stamped by capture_time()
        self.safe_stops = 0  # how many times `stop` safe-stopped the robot (the watchdog's stops not among them)
        self._stop_request = threading.Event()  # set by request_stop() from any thread, cleared by clear_stop_request()
        self._told_thread = False  # said once that signals do not reach a run() off the main thread

    def request_stop(self) -> None:
        """Stop the robot from any thread: no action is applied after the tick under way, and run()
        returns with the robot safe-stopped (within one period). Latched, as an operator's stop should
        be: run() returns at once, acting on nothing, until `clear_stop_request()`; acting then resumes
        as after any safe stop (the adapter's resume(), fresh chunks only)."""
        self._stop_request.set()

    def clear_stop_request(self) -> None:
        """Release a `request_stop()`: the next run() ticks again."""
        self._stop_request.clear()

    @property
    def stop_requested(self) -> bool:
        """Whether a `request_stop()` holds the loop (run() returns at once until it is cleared)."""
        return self._stop_request.is_set()

    def reset_episode(self, instruction: str | None = None) -> None:
        """New episode: new epoch on the wire (with a new `instruction`, if given), empty schedule,
        watchdog waiting for a first action."""
        self.schedule.reset(self.client.reset(instruction))
        self._executed.clear()
        self._guard_moving_robot()
        self._restart_grid()

    def _restart_grid(self) -> None:
        """The ticks start a fresh grid (Rate.reset), and the steps acted for start over with it."""
        self.rate.reset()
        self._acted_for = None

    def _guard_moving_robot(self) -> None:
        """The watchdog waits for a new epoch's first action; a robot still moving is stopped hold_s after
        its last fresh action, as a held one would be (a hold counted from each reset let back-to-back
        resets put the stop off for good)."""
        self.watchdog.reset(moving_since=self.watchdog.last_fresh if self._acted else None)

    def tick(self) -> TickRecord:
        """One step: the action due at the tick's grid point, each step once, in order. A tick that woke
        or ran late acts for its own step, late, not the next one (which the next tick would then act
        for again, the step in between never executed), unless it is a period late or more: then for
        the last step due by then, those before it skipped. A tick right after such a late one, whose
        step that one took, acts on nothing. Skipped steps are counted as missed ticks."""
        tick = self.rate.sleep()
        now = tick.t
        period = self.rate.period
        due = tick.deadline if self._acted_for is None else max(tick.deadline, self._acted_for + period)
        # a process paused in its sleep wakes a period or more past the deadline it slept for: the
        # chunks it takes now are judged against the step due now (their actions dropped as past due)
        due = self._caught_up(due, now)
        self._receive(now, due)
        observing = self.clock.now()
        epoch = self.client.epoch
        done = [(seq, a) for e, seq, a in self._executed if e == epoch]
        arrays = self.adapter.observe()  # first: capture_time() speaks of the data it returned
        if not isinstance(arrays, Mapping):  # None: a robot driver's failure passed on, not an observation
            raise TypeError(f"observe() must return a dict of arrays (key -> numpy array), got "
                            f"{type(arrays).__name__}")
        sent = self.client.send_observation(arrays, self._captured(observing), executed=done)
        if sent or self.client.epoch != epoch:
            self._executed.clear()
        epoch, seq = self.client.epoch, self.client.seq  # this tick's, for its record (a stop starts a new epoch)
        acting = self.clock.now()
        if acting - now > self.schedule.half_period:  # the tick stalled (a slow observe(), a paused process):
            now = acting  # the watchdog and the record go by when it acts
        due = self._caught_up(due, acting)  # its step and maybe more are a period past: the last one due by now
        skipped = int(due > acting)  # not due yet: the late tick before acted for this one's step, skipping one
        if missed := tick.missed + skipped:
            self._ran_late(missed)
        if skipped:
            decision = Decision(self.watchdog.state, None, False)
        else:
            decision = self.watchdog.step(now, self.schedule.action_at(due))
        interrupted: KeyboardInterrupt | None = None
        held = False
        stopping = decision.stop and not self._stopped  # not again for a robot its adapter has held stopped since
        if stopping:
            stopped = False
            try:
                with interrupts_deferred(STOPPING):  # a Ctrl-C now would cut the watchdog's stop short, never redone
                    self._safe_stop()
                    stopped = True
                    self._warn("safe-stop", f"no fresh action for {self.watchdog.hold_s:g} s: the robot was "
                                            f"safe-stopped (it acts again when fresh actions come)")
            except KeyboardInterrupt as exc:  # held to the stop's end: raised once the stop is recorded
                if not stopped:
                    raise
                interrupted = exc
        elif decision.action is not None and (self._stop_request.is_set() or self._stopped and (
                decision.state is not State.FRESH or not self._resumed())):
            # kept still: a stop was requested (run() stops the robot after this tick); or, stopped, a held action is
            # no fresh one to wake the robot for (planned before the stop, the policy gone quiet), and the adapter may
            # hold it (an operator's acknowledgement)
            held = True
        elif decision.action is not None:
            self._acted = True
            # a copy: an adapter converting units in place changed the held action tick after tick (and
            # what is reported as executed), or failed on a chunk's read-only array
            self.adapter.act(decision.action.copy())
            self._acted_for = due
            # reported next tick, a held action too: the robot applied it again (a stop applies nothing)
            self._executed.append((self.client.epoch, self.client.seq, decision.action))
        record = TickRecord(
            t=now,
            epoch=epoch,
            seq=seq,
            period_error_ms=tick.error * 1e3,
            state=State.STOPPED.value if held else decision.state.value,
            queue_depth=self.schedule.depth(due),
            missed_ticks=missed,
            waiting=held or decision.state == State.WAITING,
            deadline_miss=decision.state in (State.HOLDING, State.STOPPED),
            safe_stops=int(stopping),
            obs_dropped=int(not sent),
        )
        if self.on_tick:
            self.on_tick(record)
        self._work_s = self.clock.now() - tick.t
        self._log.flush()  # after the tick's work: a line held back (a safe stop) is said within LATE_CHUNK_LOG_S
        if interrupted is not None:
            raise interrupted
        return record

    def _safe_stop(self) -> None:
        """The adapter's safe_stop (the callers hold Ctrl-C and SIGTERM meanwhile), then a fresh start
        (`_start_afresh`). A safe_stop that raises is tried once more by `stop()` on the way out (a lost
        acknowledgement on the robot's bus)."""
        self._acted = False
        self._stopped = True
        try:
            self.adapter.safe_stop()
        except Exception:
            self._acted = True  # not stopped, as far as anyone knows
            raise
        finally:
            self._start_afresh()

    def _start_afresh(self) -> None:
        """After a stop, nothing planned for the moving robot acts, nor is planned from: a new epoch, so
        the chunks held and those still to come for observations sent before it are stale, and the server
        forgets the robot's history, the actions it reported and any real-time-chunking plan (the first
        chunk after a stop was computed partly from a frame of the robot in motion, and with RTC steered
        toward the old plan)."""
        self.schedule.reset(self.client.reset())
        self._executed.clear()

    def _resumed(self) -> bool:
        """Whether a stopped robot may act again: the adapter's `resume()` (if any) woke it. One that
        returns a false value other than None (False, numpy's False, 0) holds it stopped for this tick and
        is asked again at the next; one that raises ends run() with the robot safe-stopped again (it may
        have woken part of it: drives enabled, brakes still on). Ctrl-C and SIGTERM wait for it to
        return, as for safe_stop: a robot woken is then stopped on the way out (one left half woken,
        Ctrl-C pressed twice, too)."""
        if self._resume is None:
            self._stopped = False
            return True
        finished = False
        try:
            with interrupts_deferred(RESUMING):
                answer = self._resume()
                woken = answer is None or bool(answer)  # False, but also numpy's False or 0: held stopped
                finished = True
                if woken:  # awake: any way out of run() now stops it
                    self._stopped, self._acted = False, True
        except BaseException:  # cut short (raised, Ctrl-C twice): maybe half woken, so stopped on the way out
            if not finished:
                self._acted = True
            raise
        if not woken:
            self._log.info("held", "the robot stays stopped: its adapter's resume() returned False (waiting for "
                                   "an operator's acknowledgement?); asked again every tick with a fresh action")
        return woken

    def _captured(self, observing: float) -> float:
        """The observation's capture time: the adapter's `capture_time()` where it has one (a camera
        frame is older than the call that fetched it, and action 0 belongs to the frame's step),
        else `observing`, when observe() was called."""
        if self._capture_time is None:
            return observing
        t = self._capture_time()
        if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not math.isfinite(t):
            raise ValueError(f"capture_time() must return a finite number of seconds on the loop's clock, got {t!r}")
        if isinstance(t, (int, np.integer)):  # int(time.monotonic()): up to a second of lag that is not there
            raise ValueError(f"capture_time() returned the integer {int(t)}: whole seconds, or nanoseconds "
                             f"(time.monotonic_ns()); return float seconds on the loop's clock")
        if isinstance(t, np.floating) and np.finfo(t).nmant < 52:  # a float32 holds a day's seconds to ~8 ms
            raise ValueError(f"capture_time() returned a {type(t).__name__}, {float(t):.6f}: too coarse for seconds "
                             f"on a monotonic clock (steps of milliseconds); return a Python float (float64)")
        t = float(t)
        now = self.clock.now()
        if not observing - MAX_CAPTURE_AGE_S <= t <= now + CAPTURE_CLOCK_SLACK_S:
            when = (f"{t - now:.3f} s after observe() returned" if t > now else
                    f"{observing - t:.3f} s before observe() was called")
            raise ValueError(f"capture_time() returned {t:.6f}, {when}: it must be on the loop's "
                             f"clock (time.monotonic(), or the clock given to ControlLoop), not time.time() or a "
                             f"sensor's own clock")
        epoch = self.client.epoch
        last_epoch, last_t = self._last_capture
        if epoch == last_epoch and t < last_t:  # the server would blame a wall clock, and RTC drop its plan
            self._warn("capture-back", f"capture_time() went back {(last_t - t) * 1e3:.1f} ms from the last "
                                       f"observation's: stamped with the last one's time (data older than the last "
                                       f"observation's; where sensors differ, return the oldest one's time every tick)")
            t = last_t
        self._last_capture = (epoch, t)
        self._capture_age_s = max(observing - t, 0.0)
        return t

    def _ran_late(self, missed: int) -> None:
        """Say, at most every few seconds, that ticks were skipped and what took the time: the loop
        fell to 32 Hz of 50 under a 30 ms observe() with nothing logged."""
        period_ms, work_ms = self.rate.period * 1e3, self._work_s * 1e3
        why = (f"the last tick's work (observe, send, act or safe_stop, callbacks) took {work_ms:.1f} ms of the "
               f"{period_ms:.1f} ms period: make it shorter or lower the rate" if work_ms > period_ms else
               f"the process was paused or not scheduled (the last tick's work took {work_ms:.1f} ms of the "
               f"{period_ms:.1f} ms period): a loaded machine; see use_realtime_priority()")
        self._warn("missed", f"control loop late: {missed} tick(s) skipped; {why}")

    def _caught_up(self, due: float, now: float) -> float:
        """The grid step due at `now`: `due` if it is less than a period past, else the last one due by then."""
        period = self.rate.period
        return due + math.floor((now - due) / period) * period if now - due >= period else due

    def _receive(self, now: float, due: float) -> None:
        """Take the chunks that arrived; of each, the actions due before the step this tick acts for
        (`due`) are dropped, never executed late."""
        chunks = self.client.poll()
        if self.client.epoch != self.schedule.epoch:  # reconnected: forget the old connection's chunks
            self.schedule.reset(self.client.epoch)
            self._guard_moving_robot()  # and its last action: nothing from before the reconnect is applied after it
        for chunk in chunks:
            # planned before the robot was stopped (for a robot still moving): stale, as another epoch's
            dropped = self.schedule.add(chunk, due)
            if dropped and dropped == len(chunk.actions):  # the robot waits, holds or stops: say why
                last_s = chunk.t_actions[-1] - chunk.t_capture + self.schedule.half_period  # when the last is dropped
                lag = (f" (of which {self._capture_age_s * 1e3:.0f} ms before observe() was called: the sensors' lag, "
                       f"from the adapter's capture_time())" if self._capture_age_s else "")
                cause = ("the sensors' lag alone is longer: use longer chunks, less lag, or check what capture_time() "
                         "returns" if self._capture_age_s >= last_s else "check the network and the server's load")
                self._warn("late", f"chunk for observation {chunk.seq} arrived {(now - chunk.t_capture) * 1e3:.0f} ms "
                                   f"after its capture{lag}, with all {dropped} actions past due: its last action "
                                   f"waits only {last_s * 1e3:.0f} ms after capture (its due time plus half a "
                                   f"period); {cause}")
            if self.on_chunk:
                self.on_chunk(
                    ChunkRecord(
                        t=now,
                        epoch=chunk.epoch,
                        seq=chunk.seq,
                        latency_ms=(now - chunk.t_capture) * 1e3,
                        inference_ms=chunk.timing.get("inference", float("nan")),
                        server_ms=sum(chunk.timing.values()),
                        dropped_actions=dropped or 0,
                        stale_chunks=int(dropped is None),
                    )
                )

    def run(self, seconds: float | None = None, ticks: int | None = None, until: Callable[[], bool] | None = None,
            *, then_stop: bool = True) -> None:
        """Tick until `seconds` or `ticks` elapse or `until()` is true, then `stop()` the robot
        (`then_stop=False`: leave it as it is, for a caller that ticks on, e.g. episode after
        episode); after a `request_stop()` (from any thread), stop it whatever `then_stop` says. On
        any exception the robot is safe-stopped before the exception propagates; so on SIGTERM (a
        process manager's stop), raised as `Terminated` (a KeyboardInterrupt) while the program has no
        SIGTERM handler of its own: it ended the process with the robot still executing its last
        command."""
        end = None if seconds is None else self.clock.now() + seconds
        n = 0
        self._restart_grid()  # the time since the last run() is the program's, not ticks this loop missed
        requested = self._stop_request
        if threading.current_thread() is not threading.main_thread() and not self._told_thread:
            self._told_thread = True  # a ROS executor's, a GUI's thread: Ctrl-C raised in the main thread, not here
            log.warning("ControlLoop.run() on thread %r: Ctrl-C and SIGTERM reach the main thread only, so they do "
                        "not stop this loop; there, call loop.request_stop(), then wait while this thread is_alive() "
                        "(docs/protocol.md: not a join(), which Ctrl-C can cut short)",
                        threading.current_thread().name)
        if requested.is_set():
            self._log.info("requested", "run() returns at once: request_stop() holds the loop until "
                                        "clear_stop_request()")
        with sigterm_as_interrupt(replace=False):
            try:
                while ((ticks is None or n < ticks) and (end is None or self.clock.now() < end)
                       and not requested.is_set() and not (until and until())):
                    self.tick()
                    n += 1
                if requested.is_set():
                    if not self.stop() and not self._stopped:  # a robot never moved is held as a stopped one too
                        self._stopped = True
                        self._start_afresh()
                elif then_stop:
                    self.stop()
            except BaseException:
                self.stop()
                raise
            finally:  # the lines the rate limit still holds (a safe stop seconds before a SIGTERM) are said
                self._log.flush(everything=True)

    def stop(self) -> bool:
        """Safe-stop the robot if this loop moved it since its last stop: not again after the
        watchdog's stop (`safe_stop` was called twice, by the watchdog and again on Ctrl-C), nor a
        robot it never commanded. Fresh actions resume acting. Returns whether it called `safe_stop`.
        While `safe_stop` runs (this one and the watchdog's), Ctrl-C and SIGTERM wait until it returns
        (polcache_client.signals.interrupts_deferred); Ctrl-C pressed twice meanwhile abandons it.

        A stop it made is recorded as the watchdog's are, in a tick record with `safe_stops=1`
        (handed to `on_tick` once `safe_stop` returned): a run that ended with this stop showed no
        safe stop in the metrics. That record is no tick: its `ticks` is 0 and its `period_error_ms`
        NaN (not measured), and its state "stopped"."""
        if not self._acted:
            return False
        self.watchdog.stop()
        epoch, seq = self.client.epoch, self.client.seq  # the last observation's, as the stop starts a new epoch
        with interrupts_deferred(STOPPING):  # its record made before a Ctrl-C held meanwhile is raised
            self._safe_stop()
            self.safe_stops += 1
            if self.on_tick:
                now = self.clock.now()
                self.on_tick(TickRecord(t=now, epoch=epoch, seq=seq, period_error_ms=math.nan,
                                        state=self.watchdog.state.value, queue_depth=self.schedule.depth(now), ticks=0,
                                        safe_stops=1))
        return True


def _check_adapter(adapter: RobotAdapter, client: PolicyClient) -> None:
    """Refuse, before anything moves, an adapter the loop could not stop (no callable safe_stop: found
    only at the end of a run, the robot left moving) or that describes another robot than the client's
    handshake."""
    name = type(adapter).__name__
    for method in ("observe", "act", "safe_stop", "capture_time", "resume"):  # the last two are optional
        found = getattr(adapter, method, None)
        if (found is None and method in ("observe", "act", "safe_stop")) or (found is not None and not callable(found)):
            raise TypeError(f"adapter: {name}.{method} is {'missing' if found is None else 'not callable'}; a robot is "
                            f"observe(), act(action) and safe_stop(), optionally capture_time() and resume() "
                            f"(polcache_client.RobotAdapter)")
    spec = getattr(adapter, "obs_spec", None)
    if spec is not None and _shapes(spec, f"adapter: {name}.obs_spec") != _shapes(client.obs_spec, "client.obs_spec"):
        raise ValueError(f"adapter: {name}.obs_spec {spec} is not the client's {client.obs_spec}; give the client the "
                         f"adapter's obs_spec")
    action_dim = getattr(adapter, "action_dim", None)
    if action_dim is not None and action_dim != client.action_dim:
        raise ValueError(f"adapter: {name}.action_dim {action_dim} is not the client's {client.action_dim}; give the "
                         f"client the adapter's action_dim")


def _shapes(spec: dict, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of an obs_spec, dtypes as numpy's ("float32", np.float32 and "<f4" alike)."""
    try:
        return {key: (tuple(int(d) for d in shape), np.dtype(dtype)) for key, (shape, dtype) in spec.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{where}: expected key -> (shape, dtype), e.g. {{'state': ((7,), 'float32')}}, got "
                         f"{spec!r}") from None

