"""The control loop on a synthetic clock against a scripted server with a chosen latency."""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import signal

import numpy as np
import pytest

from polcache_client.loop import ControlLoop
from polcache_client.protocol import ActionChunk
from polcache_client.schedule import ActionSchedule
from polcache_client.signals import Terminated
from polcache_client.watchdog import Watchdog
from fakes import FakeClock, StepRobot

HZ = 50.0
N_ACTIONS = 8


class ScriptedClient:
    """Stands in for PolicyClient: answers each observation `latency_s` after capture with
    actions valued (captured tick + i + 1000 * epoch), unless `silent`."""

    obs_spec, action_dim = StepRobot.obs_spec, StepRobot.action_dim  # the robot's handshake

    def __init__(self, clock: FakeClock, latency_s: float):
        self.clock = clock
        self.hz = HZ
        self.latency_s = latency_s
        self.epoch, self.seq = 0, -1
        self.silent = False
        self.in_flight: list[ActionChunk] = []
        self.reported: list[tuple[int, int, list]] = []  # (epoch, seq, executed) per observation

    def send_observation(self, arrays, t_capture, executed=None) -> bool:
        self.seq += 1
        self.reported.append((self.epoch, self.seq, list(executed or [])))
        base = arrays["state"][0] + 1000 * self.epoch
        values = (base + np.arange(N_ACTIONS, dtype=np.float32))[:, None].repeat(2, axis=1)
        self.in_flight.append(ActionChunk(epoch=self.epoch, seq=self.seq, obs_seqs=[self.seq], t_capture=t_capture,
                                          t_actions=t_capture + np.arange(N_ACTIONS) / HZ, actions=values,
                                          timing={"inference": 1.0}))
        return True

    def poll(self) -> list[ActionChunk]:
        arrived = [c for c in self.in_flight if c.t_capture + self.latency_s <= self.clock.now()]
        self.in_flight = [c for c in self.in_flight if c not in arrived]
        return [] if self.silent else arrived

    def reset(self, instruction: str | None = None) -> int:
        self.epoch += 1
        self.seq = -1
        return self.epoch


def make_loop(latency_s: float, blend: str = "ensemble", hold_s: float = 0.1, robot_class=None):
    clock = FakeClock(t=0.0)
    robot = (robot_class or StepRobot)(HZ, clock)
    client = ScriptedClient(clock, latency_s)
    ticks, chunks = [], []
    loop = ControlLoop(robot, client, HZ, schedule=ActionSchedule(HZ, blend=blend), watchdog=Watchdog(hold_s),
                       clock=clock, on_tick=ticks.append, on_chunk=chunks.append)
    return loop, robot, client, clock, ticks, chunks


@pytest.mark.parametrize("latency_ticks", [0.5, 1.5, 3.2])
@pytest.mark.parametrize("blend", ["ensemble", "latest"])
def test_every_action_executes_at_its_due_tick(latency_ticks, blend):
    loop, robot, _, _, ticks, chunks = make_loop(latency_ticks / HZ, blend)
    loop.run(ticks=40)
    *ticks, end = ticks  # the 40 ticks, then the record of run()'s own safe stop
    assert (end.ticks, end.safe_stops) == (0, 1)
    first = int(np.ceil(latency_ticks))  # the first chunk is usable from this tick on
    assert [t for t, _ in robot.applied] == list(range(first, 40))
    assert all(value == tick for tick, value in robot.applied)  # latency compensated, no off-by-one
    assert [t.state for t in ticks[:first]] == ["waiting"] * first
    assert [t.waiting for t in ticks] == [True] * first + [False] * (40 - first)  # counted apart from misses
    assert not any(t.deadline_miss for t in ticks)
    assert chunks[0].dropped_actions == first  # actions due before the chunk arrived
    assert chunks[0].latency_ms == pytest.approx(first / HZ * 1e3)


def test_a_stop_soon_after_another_is_logged_once_the_limit_allows_not_at_the_next_stop(caplog, monkeypatch):
    """A robot safe-stopped as its server went away, seconds after a routine stop: the line was held
    back by the 5 s limit until the next stop, which came only once it had reconnected (32 s later)."""
    from polcache_client import logs

    loop, robot, client, clock, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    monkeypatch.setattr(logs.time, "monotonic", clock.now)  # the limit's clock: the loop's
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        for silent, ticks in ((False, 20), (True, 30), (False, 20), (True, 300)):  # the server stays silent: 6 s
            client.silent = silent
            loop.run(ticks=ticks, then_stop=False)
    assert len(robot.stops) == 2 and len(caplog.records) == 2
    second = caplog.records[1].getMessage()  # 1 s after the first, said at a tick once the 5 s had passed
    assert second == ("no fresh action for 0.09 s: the robot was safe-stopped (it acts again when fresh actions come) "
                      "(logged 4.0 s after it happened, held back by the rate limit)")


def test_a_line_held_back_when_the_loop_ends_is_said_as_it_ends(caplog):
    """A robot stopped by its watchdog, then by SIGTERM 2 s later: its log had one safe stop of the two
    its summary counted (the held line waited for a tick that never came)."""
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        for silent, ticks in ((False, 20), (True, 30), (False, 20), (True, 30)):
            client.silent = silent
            loop.run(ticks=ticks, then_stop=False)
    assert len(robot.stops) == 2 and len(caplog.records) == 2
    assert re.search(r"safe-stopped .*\(logged \d+\.\d s after it happened, held back by the rate limit\)$",
                     caplog.records[1].getMessage())


def test_silent_server_holds_then_stops_once_then_resumes(caplog):
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    loop.run(ticks=20, then_stop=False)
    client.silent = True
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        loop.run(ticks=30, then_stop=False)  # the chunk of tick 18 covers ticks 20-25, then 4 ticks of holding, then stop
    # said when it happens (it was only counted, in the run's summary)
    assert [r.getMessage() for r in caplog.records] == [
        "no fresh action for 0.09 s: the robot was safe-stopped (it acts again when fresh actions come)"]
    states = [t.state for t in ticks[20:]]
    assert states == ["fresh"] * 6 + ["holding"] * 4 + ["stopped"] * 20
    assert robot.stops == [30]  # exactly one safe stop
    assert sum(t.safe_stops for t in ticks) == 1 and all(t.deadline_miss for t in ticks[26:50])
    client.silent = False
    loop.run(ticks=5, then_stop=False)
    assert [t.state for t in ticks[-4:]] == ["fresh"] * 4
    # on chunks of the epoch the stop started (1000 + tick): none planned from the moving robot's frames
    assert all(value == 1000 + tick for tick, value in robot.applied[-4:])


class BrakingRobot(StepRobot):
    """Its safe stop engages the brakes; `resume()` releases them (or refuses, with `refuse`)."""

    def __init__(self, hz, clock, refuse=False):
        super().__init__(hz, clock)
        self.calls, self.refuse = [], refuse

    def act(self, action):
        self.calls.append("act")
        super().act(action)

    def safe_stop(self):
        self.calls.append("stop")
        super().safe_stop()

    def resume(self):
        self.calls.append("resume")
        if self.refuse:
            raise RuntimeError("drive fault: cannot release the brakes")


def test_resume_is_called_once_before_the_first_action_after_each_stop():
    """The loop went back to act() after a safe stop without a word to the adapter: a robot whose stop
    engaged its brakes had no place to release them."""
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.04, robot_class=BrakingRobot)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=15, then_stop=False)  # the watchdog's stop
    client.silent = False
    loop.run(ticks=10)  # acting again, then run()'s own stop
    loop.run(ticks=10, then_stop=False)  # and again
    runs = [call for call, _ in itertools.groupby(robot.calls)]  # acts in a row as one
    assert runs == ["act", "stop", "resume", "act", "stop", "resume", "act"]  # no resume before the first act


def test_a_resume_that_raises_ends_the_run_with_the_robot_stopped_again():
    """A resume() that failed part-way (drives enabled, brakes not released) left the robot half woken,
    never told to stop: it is stopped again on the way out, and never acted on."""
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.04, robot_class=BrakingRobot)
    robot.refuse = True
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=15, then_stop=False)
    client.silent = False
    with pytest.raises(RuntimeError, match="drive fault"):
        loop.run(ticks=10)
    assert robot.calls[-3:] == ["stop", "resume", "stop"]


class AcknowledgingRobot(BrakingRobot):
    """Stays stopped after a safe stop until an operator acknowledges it: resume() returns False till then."""

    acknowledged = False

    def resume(self):
        self.calls.append("resume")
        return self.acknowledged


@pytest.mark.parametrize("refusal", [False, np.False_, 0], ids=["False", "numpy-False", "zero"])
def test_a_resume_that_returns_false_holds_the_robot_stopped_until_it_returns_true(refusal):
    """A latched stop (an operator must acknowledge it) had no way to keep the robot still: resume() could
    only let it act or end the run. A refusal is any false value but None (`return drives_ok.all()` gives
    numpy's False, which woke the robot)."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.04, robot_class=AcknowledgingRobot)
    robot.acknowledged = refusal
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=15, then_stop=False)  # the watchdog's stop
    client.silent = False
    first_held = len(ticks)
    loop.run(ticks=10, then_stop=False)  # fresh actions, not acknowledged: asked every tick, never acted on
    held = ticks[first_held:]
    assert robot.calls[-10:] == ["resume"] * 10
    assert all(t.state == "stopped" and t.waiting and not t.deadline_miss and not t.safe_stops for t in held)
    client.silent = True
    loop.run(ticks=15, then_stop=False)  # the server goes silent while held: the robot is not told to stop again
    assert robot.calls.count("stop") == 1 and sum(t.safe_stops for t in ticks) == 1
    client.silent = False
    robot.acknowledged = True
    loop.run(ticks=10)
    runs = [call for call, _ in itertools.groupby(robot.calls)]
    assert runs == ["act", "stop", "resume", "act", "stop"]  # acts once acknowledged; run()'s own stop at the end


def test_a_held_action_does_not_wake_a_stopped_robot():
    """A robot held stopped (resume() False) was asked again while the watchdog held the last fresh action of a
    policy gone quiet, and an acknowledgement then released it onto that stale command."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.1, robot_class=AcknowledgingRobot)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=20, then_stop=False)  # the last chunk's actions, the hold, the watchdog's stop
    assert robot.calls[-1] == "stop"
    client.silent = False
    loop.run(ticks=5, then_stop=False)  # fresh actions, held by the adapter
    assert robot.calls[-1] == "resume"
    client.silent = True
    while loop.tick().state != "stopped" or loop.watchdog.state.value != "holding":  # the chunks' plans run out
        pass
    robot.acknowledged = True  # the operator acknowledges while the watchdog holds the quiet policy's last action
    calls = len(robot.calls)
    loop.run(ticks=10, then_stop=False)
    assert robot.calls[calls:] == []  # neither asked nor acting on the held action; not stopped again either
    client.silent = False
    loop.run(ticks=5, then_stop=False)
    assert robot.calls[calls:calls + 2] == ["resume", "act"]  # a fresh action wakes it


def test_resetting_an_episode_does_not_put_off_the_stop_of_a_robot_left_moving():
    """The hold counted from the reset: a reset 180 ms into a hold gave it 200 ms more, and episodes reset back to
    back while the server was dead never stopped the robot."""
    loop, robot, client, clock, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.1)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    last_fresh = clock.now()
    for _ in range(6):  # short episodes back to back, the server silent
        loop.reset_episode()
        loop.run(ticks=2, then_stop=False)
    assert len(robot.stops) == 1 and robot.stops[0] <= round(last_fresh * HZ) + 0.1 * HZ + 1


def test_a_reconnect_leaves_no_action_of_the_old_connection_to_hold():
    """The schedule forgot the old connection's chunks, but the watchdog still held its last action in the new
    epoch."""
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.1)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=1, then_stop=False)  # holding the last action
    client.epoch, client.seq = client.epoch + 1, -1  # reconnected: a new epoch
    applied = len(robot.applied)
    loop.run(ticks=10, then_stop=False)
    assert robot.applied[applied:] == [] and len(robot.stops) == 1  # waited, then stopped; nothing of epoch 0 applied


def test_what_was_planned_before_a_stop_is_not_executed_after_it():
    """run() again after a stop executed the actions of chunks for observations captured before it (planned for a
    robot still moving), without a word."""
    loop, robot, _, _, ticks, chunks = make_loop(latency_s=1.5 / HZ)
    loop.run(ticks=10)  # stopped after tick 9, chunks for observations 8 and 9 still in flight
    loop.run(ticks=5)
    after = [t.state for t in ticks[11:]]
    assert after[:2] == ["stopped", "stopped"] and after[2:5] == ["fresh"] * 3  # the first chunk sent after the stop
    assert [c.stale_chunks for c in chunks if c.seq in (8, 9)] == [1, 1]


class InterruptedWaking(BrakingRobot):
    """Its resume() takes a while (drives enabling) and gets Ctrl-C meanwhile."""

    def resume(self):
        self.calls.append("resume")
        os.kill(os.getpid(), signal.SIGINT)
        self.calls.append("awake")


def test_ctrl_c_while_the_robot_wakes_waits_for_it_and_then_stops_it():
    """A Ctrl-C during resume() left the robot half woken (drives on, brakes off) and never stopped."""
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.04, robot_class=InterruptedWaking)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=10, then_stop=False)
    client.silent = False
    with pytest.raises(KeyboardInterrupt):
        loop.run(ticks=10)
    assert robot.calls[-3:] == ["resume", "awake", "stop"]


class FlakyStop(StepRobot):
    """Its first safe_stop fails (a lost acknowledgement on the robot's bus)."""

    def safe_stop(self):
        super().safe_stop()
        if len(self.stops) == 1:
            raise TimeoutError("no acknowledgement from the drives")


def test_a_safe_stop_that_raised_is_tried_again_on_the_way_out():
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.04, robot_class=FlakyStop)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    with pytest.raises(TimeoutError):
        loop.run(ticks=10)  # the watchdog's stop raises; run()'s way out tries once more
    assert len(robot.stops) == 2 and loop.stop() is False


class StallingRobot(StepRobot):
    """observe() takes `stall_s` of the clock at tick `stall_at` (a camera that hung, a paused process);
    records the period the clock is in at every act and stop."""

    def __init__(self, clock: FakeClock, stall_at: int, stall_s: float):
        super().__init__(HZ, clock)
        self.clock, self.stall_at, self.stall_s = clock, stall_at, stall_s
        self.events: list[tuple[str, float, float]] = []  # (act|stop, the clock's period, action value)

    def observe(self):
        obs = super().observe()
        if self.tick == self.stall_at:
            self.clock.advance(self.stall_s)
        return obs

    def act(self, action):
        super().act(action)
        self.events.append(("act", self.clock.now() * HZ, float(action[0])))

    def safe_stop(self):
        super().safe_stop()
        self.events.append(("stop", self.clock.now() * HZ, float("nan")))


@pytest.mark.parametrize("stall_periods", [0.7, 1.1, 3.0, 25.0])
def test_a_stalled_tick_executes_each_step_once_in_order_and_never_a_period_late(stall_periods):
    """A tick that stalled between reading the clock and acting executed the action due at its start,
    up to seconds late (a 0.5 s stall: one act of an action due 0.5 s before). Then it acted on what
    was due when it acted, which the next tick, on time, picked again: one step twice, the one
    before it never (with delta actions, the robot's path off by a step). Now a tick under a period
    late acts for its own step, late; one a period late or more for the step due when it acts, the
    ones before it skipped (counted as missed); the tick after it, its step not due yet, acts on
    nothing; past the hold, the watchdog stops the robot once."""
    clock, ticks = FakeClock(t=0.0), []
    robot = StallingRobot(clock, stall_at=20, stall_s=stall_periods / HZ)
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, watchdog=Watchdog(0.1), clock=clock,
                       on_tick=ticks.append)
    loop.run(ticks=40, then_stop=False)  # the watchdog's stops only
    steps = []  # the values acted, the watchdog's holds (the last one again) left out
    for kind, period, value in robot.events:
        if kind == "act" and (not steps or value != steps[-1]):
            assert -0.5 <= period - value % 1000 < 1, (period, value)  # never early, never a period late
            steps.append(value)
    assert steps == sorted(set(steps))  # each step once, in order
    if stall_periods <= 0.1 * HZ:  # within the watchdog's hold: the episode goes on
        skipped = math.floor(stall_periods + 0.5) if stall_periods >= 1 else 0  # the steps never executed
        assert steps == [v for v in range(1, int(steps[-1]) + 1) if not 20 <= v < 20 + skipped]
        assert sum(t.missed_ticks for t in ticks) == skipped
    if stall_periods > 0.1 * HZ + 1:  # longer than the hold: the first thing after the stall is the one stop
        assert next(e for e in robot.events if e[1] > 20.5)[0] == "stop" and len(robot.stops) == 1


class LateWakingClock(FakeClock):
    """Wakes `late_s` late once, at the deadline `at` (a preempted process, a page fault)."""

    def __init__(self, at: float, late_s: float):
        super().__init__(t=0.0)
        self.at, self.late_s = at, late_s

    def sleep_until(self, t: float) -> None:
        super().sleep_until(t)
        if abs(t - self.at) < 1e-9:
            self.t += self.late_s


class SlowObserveRobot(StepRobot):
    """observe() takes `observe_s` every tick (a slow camera read); records (period, value) per act."""

    def __init__(self, clock: FakeClock, observe_s: float):
        super().__init__(HZ, clock)
        self.clock, self.observe_s = clock, observe_s
        self.acts: list[tuple[float, float]] = []

    def observe(self):
        self.clock.advance(self.observe_s)
        return super().observe()

    def act(self, action):
        super().act(action)
        self.acts.append((self.clock.now() * HZ, float(action[0])))


def test_a_tick_that_woke_late_acts_for_its_own_step_and_the_next_tick_for_the_next():
    """A tick woken 0.7 periods late acted for the next step (nearest its time); the next tick, on
    time, acted for that step again, and the step in between was never executed."""
    clock = LateWakingClock(at=20 / HZ, late_s=0.7 / HZ)
    robot = SlowObserveRobot(clock, 0.0)
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock)
    loop.run(ticks=30, then_stop=False)
    assert [value for _, value in robot.acts] == list(range(1, 30))
    assert [round(period, 3) for period, value in robot.acts if value == 20] == [20.7]  # late, not skipped


def test_a_chunk_received_after_the_process_was_paused_is_judged_at_the_time_it_arrived(caplog):
    """A robot process stopped 2 s (SIGSTOP, a debugger) mid-sleep: the chunk taken on its first tick
    back, all of whose actions were long past due, was counted as 1 dropped action of 8, against
    the deadline from before the pause, and no line said why the robot then stopped."""
    clock = LateWakingClock(at=20 / HZ, late_s=2.0)
    robot = SlowObserveRobot(clock, 0.0)
    chunks = []
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock, on_chunk=chunks.append)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        loop.run(ticks=22, then_stop=False)
    (back,) = [c for c in chunks if c.seq == 19]  # sent before the pause, taken on the first tick after it
    assert back.dropped_actions == N_ACTIONS and back.latency_ms == pytest.approx(2000 + 1e3 / HZ)
    assert "chunk for observation 19 arrived 2020 ms after its capture, with all 8 actions past due" in caplog.text
    assert max(value for _, value in robot.acts) == 19  # nothing from before the pause executed after it


@pytest.mark.parametrize("observe_periods", [0.6, 1.3])
def test_a_steadily_slow_observe_keeps_the_rate_it_can_and_each_step_once(observe_periods):
    """Under an observe() that always takes 0.6 periods, every step is executed, at the full rate
    (a tick over half a period late used to push the grid a step on: half the rate); under one
    longer than a period, the loop ticks as fast as it can, skipping steps, never repeating one."""
    clock = FakeClock(t=0.0)
    robot = SlowObserveRobot(clock, observe_periods / HZ)
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, watchdog=Watchdog(1.0), clock=clock)
    loop.run(seconds=60 / HZ, then_stop=False)
    values = [value for _, value in robot.acts]
    assert values == sorted(set(values))  # each step once, in order
    assert all(-0.5 <= period - value < 1 for period, value in robot.acts)  # never early, never a period late
    if observe_periods < 1:
        assert values == list(range(1, len(values) + 1)) and len(values) >= 58
    else:  # as many ticks as a 1.3-period tick allows, not half of them
        assert len(values) >= 60 / observe_periods - 3


def test_chunks_that_arrive_with_every_action_past_due_are_logged(caplog):
    """A round trip longer than a chunk lasts (bad Wi-Fi) left the robot waiting, then stopped, with
    nothing in either log saying why; one rate-limited line now names the latency and the horizon."""
    import logging

    loop, robot, _, _, ticks, chunks = make_loop(latency_s=10 / HZ)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        loop.run(ticks=40)
    assert not robot.applied and all(c.dropped_actions == N_ACTIONS for c in chunks)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("chunk for observation 0 arrived 220 ms after its capture, with all 8 actions past due: its "
                        "last action waits only 150 ms after capture (its due time plus half a period); check the "
                        "network and the server's load")
    # and, as the run ended, the newest of those the rate limit held back, with how many
    assert len(lines) == 2 and lines[1].startswith("chunk for observation 29 arrived 200 ms after its capture") and \
        lines[1].endswith("; 28 similar before it suppressed)")


def test_reset_never_executes_chunks_from_the_previous_episode():
    loop, robot, client, _, _, _ = make_loop(latency_s=2.5 / HZ)
    loop.run(ticks=10)
    assert client.in_flight  # chunks of epoch 0 still on their way
    n_before, last_tick = len(robot.applied), robot.tick
    loop.reset_episode()  # a fresh grid: its first tick a period after the last (the reset took no time here)
    loop.run(ticks=10)
    after = robot.applied[n_before:]
    assert after and all(value >= 1000 for _, value in after)  # only epoch-1 chunks
    assert after[0][0] == last_tick + 4  # waits for its own first chunk (2.5 periods after that tick)


def test_reconnect_epoch_change_discards_old_chunks():
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ)
    loop.run(ticks=5, then_stop=False)  # no stop (which starts a new epoch itself)
    client.epoch += 1  # what PolicyClient does when it reconnects
    client.seq = -1
    loop.run(ticks=5, then_stop=False)
    assert robot.applied[-1][1] >= 1000
    assert loop.schedule.epoch == 1


def test_period_error_and_missed_ticks_are_reported():
    loop, _, _, clock, ticks, _ = make_loop(latency_s=0.5 / HZ)
    clock.lateness = 0.0004
    loop.run(ticks=3)
    assert [t.period_error_ms for t in ticks[:3]] == pytest.approx([0.4] * 3)
    assert ticks[3].ticks == 0 and math.isnan(ticks[3].period_error_ms)  # run()'s stop: no tick, no period error
    clock.advance(0.07)  # the next tick was due at 0.06; now it is 0.1104
    assert loop.tick().missed_ticks == 2


def test_adapter_failure_stops_the_robot_safely():
    loop, robot, _, _, _, _ = make_loop(latency_s=0.5 / HZ)

    def broken(action):
        raise RuntimeError("motor driver fault")

    loop.run(ticks=3)
    robot.act = broken
    with pytest.raises(RuntimeError, match="motor driver"):
        loop.run(ticks=3)
    assert robot.stops


def test_each_executed_action_is_reported_once_with_the_tick_it_was_applied_at():
    loop, robot, client, _, _, _ = make_loop(latency_s=1.5 / HZ)
    loop.run(ticks=12)
    applied = dict(robot.applied)  # tick -> value; in epoch 0 the tick is the observation's seq
    assert len(applied) == 10  # ticks 2..11 acted
    for epoch, seq, done in client.reported:
        want = [(seq - 1, applied[seq - 1])] if seq - 1 in applied else []
        assert [(s, float(np.asarray(a).ravel()[0])) for s, a in done] == want, seq
    loop.reset_episode()
    loop.run(ticks=3)
    # epoch 2 (run()'s stop started epoch 1, the reset 2): nothing leaks across episodes
    assert client.reported[12][:2] == (2, 0) and client.reported[12][2] == []


def test_held_actions_are_reported_as_executed_and_waiting_or_stopped_ticks_report_nothing():
    """A held action is applied again, so a self-verifying policy compares its predicted past with
    it; while waiting or after a safe stop the robot applies nothing, and nothing is reported."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    loop.run(ticks=20, then_stop=False)
    client.silent = True
    loop.run(ticks=31)  # fresh to tick 25, holding 26-29, stopped from 30 (see the test above); 50 reports 49
    reported = {(epoch, seq): float(np.asarray(a).ravel()[0])
                for epoch, _, done in client.reported for seq, a in done}
    states = {(t.epoch, t.seq): t.state for t in ticks if t.ticks}  # not run()'s stop after tick 19
    assert [seq for (epoch, seq), state in states.items() if state == "holding"] == [26, 27, 28, 29]
    assert [reported[0, s] for s in range(24, 30)] == [24, 25, 25, 25, 25, 25]  # what the robot applied
    assert dict(robot.applied)[29] == 25
    assert not any(key in reported for key, state in states.items() if state in ("waiting", "stopped"))
    assert states[0, 30] == "stopped" and {epoch for epoch, _ in states} == {0, 1}  # the stop started epoch 1


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout_s": -1}, "expected 0 < heartbeat_s < timeout_s"),
    ({"timeout_s": 0.1}, "expected 0 < heartbeat_s < timeout_s"),  # the default heartbeat 0.25 s
    ({"heartbeat_s": 0}, "expected 0 < heartbeat_s < timeout_s"),
    ({"obs_spec": {"state": (39, "float32")}}, r"obs_spec\['state'\]: expected \(shape tuple of ints, dtype name\)"),
    ({"address": "notaurl"}, "cannot connect to 'notaurl'"),
    ({"address": "tcp://127.0.0.1:99999"}, "port 99999 is not in 1..65535"),  # ZeroMQ would dial port 34463
    ({"name": "arm \udcff"}, r"name is not valid UTF-8 \(at character 4\)"),
    ({"name": "arm\n2"}, "name must be printable text"),
    ({"name": "(unnamed)"}, "names in parentheses are the server's own labels"),
], ids=["timeout-negative", "timeout-below-heartbeat", "heartbeat-zero", "obs-spec", "address", "port",
        "name-surrogate", "name-newline", "name-label"])
def test_client_arguments_are_checked_before_anything_is_sent(kwargs, match):
    from polcache_client import ConnectError, PolicyClient

    args = {"address": "tcp://127.0.0.1:9", "obs_spec": {"state": ((39,), "float32")}} | kwargs
    address, obs_spec = args.pop("address"), args.pop("obs_spec")
    with pytest.raises((ValueError, ConnectError), match=match):
        PolicyClient(address, obs_spec, 4, hz=20, **args)


def test_a_closed_client_says_so():
    import numpy as np

    from polcache_client import ConnectError, PolicyClient

    client = PolicyClient("tcp://127.0.0.1:9", {"state": ((2,), "float32")}, 2, hz=20)
    client.close()
    for call in (client.poll, lambda: client.connect(timeout_s=0.1),
                 lambda: client.send_observation({"state": np.zeros(2, np.float32)}, 0.0)):
        with pytest.raises(ConnectError, match="was closed: create a new PolicyClient"):
            call()


def test_no_answer_from_a_host_name_that_does_not_resolve_says_so():
    """ZeroMQ fails to resolve a mistyped host in silence: the robot was told no server runs there."""
    from polcache_client import ConnectError, PolicyClient

    client = PolicyClient("tcp://no-such-host.invalid:5601", {"state": ((2,), "float32")}, 2, hz=20)
    with pytest.raises(ConnectError, match=r"no answer .* within 0.2 s: the host name 'no-such-host.invalid' does "
                                           r"not resolve \("):
        client.connect(timeout_s=0.2)
    client.close()
    client = PolicyClient("tcp://127.0.0.1:9", {"state": ((2,), "float32")}, 2, hz=20)
    with pytest.raises(ConnectError, match=r"within 0.2 s \(none running there\?.* one still loading and warming up "
                                           r"its policy .* longer than 0.2 s"):  # a host that resolves
        client.connect(timeout_s=0.2)
    client.close()


class Arm:
    obs_spec = {"state": ((2,), "float32")}
    action_dim = 2

    def observe(self):
        return {"state": np.zeros(2, np.float32)}

    def act(self, action):
        pass

    def safe_stop(self):
        pass


def test_the_loop_the_client_and_the_schedule_must_tick_at_the_same_rate():
    from polcache_client import PolicyClient

    client = PolicyClient("tcp://127.0.0.1:9", Arm.obs_spec, 2, hz=20)
    try:
        with pytest.raises(ValueError, match="the loop ticks at 50 Hz but the client told the server 20 Hz"):
            ControlLoop(Arm(), client, 50)
        # a schedule of another rate judged actions due within half of its own period, not the loop's
        with pytest.raises(ValueError, match="schedule: built for 10 Hz but the loop ticks at 20 Hz"):
            ControlLoop(Arm(), client, 20, schedule=ActionSchedule(10, blend="latest"))
        assert ControlLoop(Arm(), client, 20, schedule=ActionSchedule(20, blend="latest")).schedule.hz == 20
    finally:
        client.close()


@pytest.mark.parametrize("hz", [0, -5, float("nan"), 1e9, "50", True])
def test_a_client_refuses_a_rate_the_server_would(hz):
    """It was refused only at connect(), by the server."""
    from polcache_client import PolicyClient

    with pytest.raises(ValueError, match=r"hz: expected a control rate in \[0.01, 10000\] Hz, got"):
        PolicyClient("tcp://127.0.0.1:9", Arm.obs_spec, 2, hz=hz)


class NoStop(Arm):
    safe_stop = None


class StopValue(Arm):
    safe_stop = 5


class NotResuming(Arm):
    resume = True


class SevenJoints(Arm):
    action_dim = 7


class WiderState(Arm):
    obs_spec = {"state": ([3], "float32")}


@pytest.mark.parametrize("adapter, said", [
    (NoStop(), r"adapter: NoStop.safe_stop is missing; a robot is observe\(\), act\(action\) and safe_stop\(\)"),
    (StopValue(), "adapter: StopValue.safe_stop is not callable"),
    (NotResuming(), "adapter: NotResuming.resume is not callable"),
    (SevenJoints(), "adapter: SevenJoints.action_dim 7 is not the client's 2"),
    (WiderState(), r"adapter: WiderState.obs_spec \{'state': \(\[3\], 'float32'\)\} is not the client's")])
def test_an_adapter_the_loop_could_not_stop_or_of_another_robot_is_refused_before_anything_moves(adapter, said):
    """One without safe_stop ran and moved the robot, failing only at the end with the robot left
    moving (an outside probe)."""
    from polcache_client import PolicyClient

    client = PolicyClient("tcp://127.0.0.1:9", Arm.obs_spec, 2, hz=20)
    try:
        with pytest.raises((TypeError, ValueError), match=said):
            ControlLoop(adapter, client, 20)
        for spec in ({"state": ([2], "float32")}, {"state": ((2,), np.float32)}, {"state": ((2,), "<f4")}):
            ControlLoop(type("SameSpec", (Arm,), {"obs_spec": spec})(), client, 20)  # the same, written otherwise
        with pytest.raises(ValueError, match=r"adapter: Flat.obs_spec: expected key -> \(shape, dtype\)"):
            ControlLoop(type("Flat", (Arm,), {"obs_spec": {"state": (2, "float32")}})(), client, 20)
    finally:
        client.close()


@pytest.mark.parametrize("hold_s", [-1, float("nan"), float("inf")])
def test_a_watchdog_hold_must_be_a_finite_time(hold_s):
    with pytest.raises(ValueError, match="hold_s: expected a finite number of seconds >= 0"):
        Watchdog(hold_s)


def test_run_ends_with_the_robot_stopped_once_and_never_twice_in_a_row():
    """run() returned with the robot still executing its last command; and Ctrl-C after the watchdog's
    stop called safe_stop a second time."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    loop.run(ticks=10)
    assert robot.stops == [9] and loop.watchdog.state.value == "stopped"
    loop.run(ticks=5)  # fresh actions resume acting after the stop, and the end stops again
    assert [t.state for t in ticks if t.ticks][-4:] == ["fresh"] * 4 and robot.stops == [9, 14]
    loop.run(ticks=5, then_stop=False)  # moving again, then the server goes silent
    client.silent = True
    loop.run(ticks=20)  # the watchdog stops the robot: the end of run() does not stop it again
    assert robot.stops[:2] == [9, 14] and len(robot.stops) == 3
    assert sum(t.safe_stops for t in ticks if t.ticks) == 1 and sum(t.safe_stops for t in ticks) == 3
    stops = list(robot.stops)

    def interrupted(*action):
        raise KeyboardInterrupt

    observe, robot.observe = robot.observe, interrupted
    with pytest.raises(KeyboardInterrupt):
        loop.run(ticks=5)  # the watchdog's stop was the last thing the robot was told: not again
    assert robot.stops == stops
    robot.observe, robot.act, client.silent = observe, interrupted, False
    with pytest.raises(KeyboardInterrupt):
        loop.run(ticks=5)  # acting again, then Ctrl-C: one stop
    assert robot.stops == [*stops, robot.tick]


def test_the_loops_own_safe_stop_is_recorded_as_the_watchdogs_are():
    """stop() made no tick record: a run that ended with the loop's own safe stop showed none in the
    metrics (the dashboard's safe stops), while the watchdog's stops were counted. Its record is no
    tick, and a stop not made (the watchdog's came last, or nothing moved) records nothing."""
    from polcache.metrics import Metrics

    metrics = Metrics()
    loop, robot, client, clock, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    loop.on_tick = lambda record: (ticks.append(record), metrics.record(record))
    loop.run(ticks=10)
    *run, end = ticks
    assert robot.stops == [9] and [t.ticks for t in run] == [1] * 10 and not any(t.safe_stops for t in run)
    assert (end.ticks, end.safe_stops, end.state, end.t, end.epoch, end.seq) == (0, 1, "stopped", clock.now(), 0, 9)
    assert math.isnan(end.period_error_ms) and end.queue_depth == 0  # what was planned before the stop is gone
    assert not (end.waiting or end.deadline_miss or end.missed_ticks or end.obs_dropped)
    assert loop.safe_stops == 1 and loop.stop() is False and len(ticks) == 11  # nothing moved since: no record
    loop.run(ticks=5, then_stop=False)  # moving again
    client.silent = True
    loop.run(ticks=20)  # acts, holds, then the watchdog stops it on a tick; run() adds no stop of its own
    assert len(robot.stops) == 2 and ticks[-1].ticks == 1 and loop.safe_stops == 1
    client.silent = False
    act = robot.act

    def interrupted(action):
        act(action)
        raise KeyboardInterrupt

    robot.act = interrupted
    with pytest.raises(KeyboardInterrupt):
        loop.run(ticks=5)  # acting again, then Ctrl-C: the loop's stop, recorded
    assert len(robot.stops) == 3 and loop.safe_stops == 2 and ticks[-1].ticks == 0
    assert sum(t.safe_stops for t in ticks) == len(robot.stops)  # every stop the robot was told, counted once
    snap = metrics.snapshot()["tick"]
    assert snap["safe_stops"] == 3 and snap["ticks"] == sum(t.ticks for t in ticks) == len(ticks) - 2
    assert snap["period_error_ms"]["n"] == snap["ticks"]  # the stops' NaN is no period error
    robot.act = act
    assert [loop.tick().state for _ in range(3)] == ["stopped", "fresh", "fresh"]  # nothing planned before the stop
    assert loop.stop() is True and loop.stop() is False  # called directly: the same


def test_sigterm_safe_stops_the_robot_where_the_program_has_no_handler_of_its_own():
    """A process manager's stop (systemd, docker: SIGTERM) ended the process with the robot still
    executing its last command: safe_stop was never called."""
    import os
    import signal

    from polcache_client.signals import Terminated

    loop, robot, _, _, _, _ = make_loop(latency_s=0.5 / HZ)
    act = robot.act

    def stopped_by_the_process_manager(action):
        act(action)
        if len(robot.applied) in (3, 6):
            os.kill(os.getpid(), signal.SIGTERM)

    robot.act = stopped_by_the_process_manager
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated):
            loop.run(ticks=20)
        assert robot.stops == [robot.applied[-1][0]] and len(robot.applied) == 3
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
        told = []
        signal.signal(signal.SIGTERM, lambda signum, frame: told.append(signum))  # the program's own: left alone
        loop.run(ticks=20)
        assert told == [signal.SIGTERM] and len(robot.applied) > 3
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("during_the_stop", [False, True])
def test_a_hangup_safe_stops_the_robot_as_sigterm_does(during_the_stop):
    """Closing the terminal or SSH session that ran the robot (SIGHUP, whose default ends the process)
    left it executing its last command; one during the safe stop waits for it. Under nohup
    (SIGHUP ignored) nothing changes."""
    from polcache_client.signals import Terminated

    if during_the_stop:
        loop, robot, _, _ = signalled_loop((signal.SIGHUP,))
    else:
        loop, robot, _, _, _, _ = make_loop(latency_s=0.5 / HZ)
        act = robot.act
        robot.act = lambda action: (act(action), len(robot.applied) == 3 and os.kill(os.getpid(), signal.SIGHUP))
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated):
            loop.run(ticks=20)
        assert len(robot.stops) == 1 and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        if during_the_stop:
            assert robot.braked == 1  # the stop ran to its end before the hangup was raised
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        loop.run(ticks=5)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_adapter_acts_on_a_copy_so_converting_in_place_changes_nothing_held_or_reported():
    """A held action was the same array each tick: an adapter scaling it in place halved it tick after
    tick, and the halved values were reported as executed."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.09)
    act, got = robot.act, []

    def to_motor_units(action):
        action *= 0.5  # in place, as a driver converting units might
        got.append(float(action[0]))
        act(action)

    robot.act = to_motor_units
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    loop.run(ticks=15, then_stop=False)  # the last chunk's actions, then the last one held, then the stop
    acted = [t.state for t in ticks if t.state in ("fresh", "holding")]
    held = [value for state, value in zip(acted, got) if state == "holding"]
    assert len(held) >= 2 and held == [got[acted.index("holding") - 1]] * len(held)  # held, not decaying
    executed = [a for _, _, done in client.reported for _, a in done]
    assert all(float(a[0]) == 2 * value for a, value in zip(executed, got))  # reported as decided


def test_ticks_skipped_by_a_slow_tick_are_logged_with_what_took_the_time(caplog):
    """observe() taking 30 ms at 50 Hz dropped the loop to 32 Hz and nothing was logged."""
    import logging

    clock, ticks = FakeClock(t=0.0), []
    robot = StallingRobot(clock, stall_at=5, stall_s=2.5 / HZ)
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock, on_tick=ticks.append)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        loop.run(ticks=10)
    assert sum(t.missed_ticks for t in ticks) == 2  # the stalled tick acted for step 7: 5 and 6 skipped
    assert [r.getMessage() for r in caplog.records] == [
        "control loop late: 2 tick(s) skipped; the last tick's work (observe, send, act or safe_stop, callbacks) took "
        "50.0 ms of the 20.0 ms period: make it shorter or lower the rate"]


class SignalledStopRobot(StepRobot):
    """Its safe stop takes two steps (say, zero velocity, then the brakes) and receives `signals`
    between them, as from someone pressing Ctrl-C again while the program stops."""

    def __init__(self, clock: FakeClock, signals: tuple[int, ...]):
        super().__init__(HZ, clock)
        self.signals, self.braked = signals, 0

    def safe_stop(self) -> None:
        self.stops.append(self.tick)
        for sig in self.signals:
            os.kill(os.getpid(), sig)
        self.braked += 1


def signalled_loop(signals: tuple[int, ...], hold_s: float = 0.1):
    loop, _, client, clock, ticks, chunks = make_loop(0.5 / HZ, hold_s=hold_s)
    robot = loop.adapter = SignalledStopRobot(clock, signals)
    return loop, robot, client, ticks


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_an_interrupt_during_the_safe_stop_waits_for_it(sig, raised):
    loop, robot, _, ticks = signalled_loop((sig,))
    with pytest.raises(raised):  # raised once the stop returned, and recorded
        loop.run(ticks=5)
    assert (robot.stops, robot.braked) == ([4], 1)
    assert (ticks[-1].ticks, ticks[-1].safe_stops, loop.safe_stops) == (0, 1, 1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_during_a_stop_made_while_handling_an_exception_is_not_lost():
    """A program that catches an error and stops the robot before carrying on: a SIGTERM during that stop was
    dropped (the exception being handled read as one on its way out), and the arm went on moving."""
    loop, robot, _, _ = signalled_loop((signal.SIGTERM,))
    loop.run(ticks=5, then_stop=False)
    with pytest.raises(Terminated):
        try:
            raise ValueError("scene reset failed")
        except ValueError:
            loop.stop()  # the program would carry on after it
    assert (robot.stops, robot.braked) == ([4], 1)


class FailingSignalledStopRobot(SignalledStopRobot):
    """Its safe stop gets Ctrl-C, then fails (no acknowledgement on the robot's bus)."""

    def safe_stop(self) -> None:
        super().safe_stop()
        raise RuntimeError("CAN bus: no ack")


def test_ctrl_c_during_a_safe_stop_that_raises_is_not_lost():
    """The operator saw "stopping the robot safely first", the stop failed, and run() raised only the
    adapter's error: a program retrying after hardware errors went on running the robot."""
    loop, _, client, ticks = signalled_loop(())
    robot = loop.adapter = FailingSignalledStopRobot(client.clock, (signal.SIGINT,))
    with pytest.raises(KeyboardInterrupt) as raised:
        loop.run(ticks=5)
    assert isinstance(raised.value.__context__, RuntimeError) and "no ack" in str(raised.value.__context__)
    assert robot.stops  # tried; the error is the interrupt's context, on the traceback


def test_a_programs_own_sigterm_handler_gets_a_sigterm_held_during_the_safe_stop():
    """It was raised as Terminated, bypassing the handler the program had set."""
    loop, robot, _, _ = signalled_loop((signal.SIGTERM,))
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        loop.run(ticks=5)  # no Terminated: the program's handler decides
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM] and robot.braked == 1


def test_a_signal_the_program_ignores_stays_ignored_during_the_safe_stop():
    loop, robot, _, _ = signalled_loop((signal.SIGTERM,))
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loop.run(ticks=5)  # nothing raised after the stop
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert robot.braked == 1


def test_ctrl_c_twice_during_the_safe_stop_abandons_it():
    loop, robot, _, _ = signalled_loop((signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        loop.run(ticks=5)
    assert (robot.stops, robot.braked) == ([4], 0)  # a stop that hangs can be left


def test_ctrl_c_during_the_watchdogs_stop_waits_for_it_and_the_robot_is_not_stopped_twice():
    loop, robot, client, ticks = signalled_loop((signal.SIGINT,), hold_s=0.02)
    loop.run(ticks=10, then_stop=False)
    client.silent = True
    with pytest.raises(KeyboardInterrupt):  # the watchdog stops the robot, and the Ctrl-C comes after it
        loop.run(ticks=30)
    assert robot.braked == 1 and len(robot.stops) == 1  # run()'s own stop: not again after the watchdog's
    # the watchdog's stop is in its tick's record (the interrupt had been raised before the record was made)
    assert sum(t.safe_stops for t in ticks) == 1 and ticks[-1].ticks == 1 and ticks[-1].state == "stopped"


class LaggingCamera(StepRobot):
    """A robot whose observation shows it `lag_s` ago (a camera's exposure and transfer), and says so
    through `capture_time()` unless `tells` is False."""

    def __init__(self, hz: float, clock: FakeClock, lag_s: float, tells: bool = True):
        super().__init__(hz, clock)
        self.lag_s = lag_s
        if tells:
            self.capture_time = lambda: clock.now() - lag_s

    def observe(self) -> dict[str, np.ndarray]:
        now = self.now()
        self.t0 = now if self.t0 is None else self.t0
        self.tick = round((now - self.t0) * self.hz)
        return {"state": np.array([round((now - self.lag_s - self.t0) * self.hz), 0, 0], np.float32)}


@pytest.mark.parametrize("tells", [True, False])
def test_a_lagging_sensors_capture_time_times_the_actions_from_when_the_robot_was_seen(tells):
    clock = FakeClock(t=0.0)
    robot = LaggingCamera(HZ, clock, lag_s=2 / HZ, tells=tells)
    client = ScriptedClient(clock, latency_s=1.5 / HZ)
    chunks = []
    ControlLoop(robot, client, HZ, clock=clock, on_chunk=chunks.append).run(ticks=30)
    applied = robot.applied[5:]  # from a steady state on
    # each action is the one for the period it is applied in: the frame's two periods of lag are not
    # added to the actions' delay; a robot that does not tell executes every action two periods late
    assert {tick - value for tick, value in applied} == ({0} if tells else {2})
    if tells:  # the chunk's latency counts from the frame's capture
        assert chunks[-1].latency_ms == pytest.approx(3 / HZ * 1e3)  # the frame's lag, to the tick after the send


@pytest.mark.parametrize("capture, match", [
    (lambda now: now + 0.5, r"0\.500 s after observe\(\) returned: it must be on the loop's clock"),
    (lambda now: now - 3600.0, r"3600\.000 s before observe\(\) was called"),
    (lambda now: float("nan"), r"capture_time\(\) must return a finite number of seconds"),
    (lambda now: "now", r"got 'now'"),
    (lambda now: int(now), r"returned the integer 100: whole seconds, or nanoseconds \(time.monotonic_ns\(\)\)"),
    (lambda now: np.int64(now * 1e9), r"returned the integer 1000\d{8}: whole seconds, or nanoseconds"),
    # accepted, it failed at random (rounded up past observe()'s return) or timed actions milliseconds off
    (lambda now: np.float32(now), r"returned a float32, 100\.\d+: too coarse for seconds on a monotonic clock"),
])
def test_a_capture_time_on_another_clock_is_refused_and_the_robot_stopped(capture, match):
    clock = FakeClock(t=100.0)
    robot = StepRobot(HZ, clock)
    robot.capture_time = lambda: clock.now() if len(robot.applied) < 3 else capture(clock.now())  # acts, then errs
    with pytest.raises(ValueError, match=match):
        ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock).run(ticks=10)
    assert len(robot.applied) == 3 and len(robot.stops) == 1  # the robot it moved was safe-stopped on the way out


def test_a_pause_between_runs_is_no_missed_tick(caplog):
    """2 s of the program's own work between run()s was logged as 99 ticks skipped (the process paused or a
    loaded machine) and counted as missed ticks."""
    import logging

    clock, ticks = FakeClock(t=0.0), []
    robot = StepRobot(HZ, clock)
    loop = ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock, on_tick=ticks.append)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        loop.run(ticks=5, then_stop=False)
        clock.t += 2.0
        loop.run(ticks=5)
    assert sum(t.missed_ticks for t in ticks) == 0 and "skipped" not in caplog.text


def test_an_observe_that_returns_no_dict_is_named():
    """observe() returning None ended run() with "AttributeError: 'NoneType' object has no attribute 'keys'"."""
    clock = FakeClock(t=0.0)
    robot = StepRobot(HZ, clock)
    robot.observe = lambda: None
    with pytest.raises(TypeError, match=r"observe\(\) must return a dict of arrays \(key -> numpy array\), got "
                                        r"NoneType"):
        ControlLoop(robot, ScriptedClient(clock, 0.5 / HZ), HZ, clock=clock).run(ticks=3)


def test_chunks_late_because_the_sensors_lag_say_so(caplog):
    clock = FakeClock(t=0.0)
    robot = LaggingCamera(HZ, clock, lag_s=9 / HZ)  # older than a chunk's 8 actions reach
    ControlLoop(robot, ScriptedClient(clock, latency_s=9.5 / HZ), HZ, clock=clock).run(ticks=12)
    assert "(of which 180 ms before observe() was called: the sensors' lag" in caplog.text
    assert "the sensors' lag alone is longer: use longer chunks, less lag, or check what capture_time()" in caplog.text


def test_a_capture_time_that_goes_back_is_held_at_the_last_one_and_said(caplog):
    """An adapter whose oldest sensor changes from tick to tick can return a capture time earlier
    than the last observation's: the server would log it as a wall clock stepped back."""
    clock = FakeClock(t=100.0)
    robot = StepRobot(HZ, clock)
    times = iter([100.0, 100.02, 99.99, 100.06])  # the third is older than the second
    robot.capture_time = lambda: next(times)
    client = ScriptedClient(clock, 0.5 / HZ)
    stamps = []
    send = client.send_observation
    client.send_observation = lambda arrays, t, executed=None: stamps.append(t) or send(arrays, t, executed)
    ControlLoop(robot, client, HZ, clock=clock).run(ticks=4)
    assert stamps == [100.0, 100.02, 100.02, 100.06]
    assert "capture_time() went back 30.0 ms from the last observation's: stamped with the last one's time" in caplog.text


def test_a_server_silent_from_an_episode_reset_on_still_gets_the_moving_robot_stopped():
    """Episodes back to back (run(then_stop=False), reset_episode): the watchdog waited for the new
    episode's first action as if the robot were at rest, so a server silent from the reset on left it
    executing its last command until run() ended."""
    loop, robot, client, _, ticks, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.1)
    loop.run(ticks=10, then_stop=False)
    assert robot.applied and not robot.stops  # moving
    loop.reset_episode()
    client.silent = True
    loop.run(ticks=20, then_stop=False)
    assert len(robot.stops) == 1 and robot.stops[0] <= 10 + 6  # within hold_s (5 ticks) of the reset
    assert [t.safe_stops for t in ticks].count(1) == 1


def test_a_robot_at_rest_at_a_reset_is_not_stopped_while_it_waits():
    loop, robot, client, _, _, _ = make_loop(latency_s=0.5 / HZ, hold_s=0.1)
    client.silent = True
    loop.reset_episode()
    loop.run(ticks=20, then_stop=False)
    assert not robot.stops and not robot.applied


class StopButtonRobot(StepRobot):
    """Its operator presses stop (ControlLoop.request_stop) during the observe() of period `press_at`."""

    loop: ControlLoop
    press_at = 20

    def observe(self):
        arrays = super().observe()
        if self.tick == self.press_at:
            self.loop.request_stop()
        return arrays


def test_a_requested_stop_acts_on_nothing_after_it_and_latches_until_cleared():
    loop, robot, _, _, ticks, _ = make_loop(1.5 / HZ, robot_class=StopButtonRobot)
    robot.loop = loop
    loop.run(ticks=100, then_stop=False)  # a caller ticking on: the requested stop still stops the robot
    assert loop.stop_requested and robot.stops == [20]
    assert [t for t, _ in robot.applied][-1] == 19  # nothing applied in the tick the stop was pressed in, nor after
    assert ticks[-2].state == "stopped" and (ticks[-1].ticks, ticks[-1].safe_stops) == (0, 1)
    seen = len(ticks)
    loop.run(ticks=100)  # latched: returns at once, the robot neither moved nor told to stop again
    assert len(ticks) == seen and robot.stops == [20] and robot.applied[-1][0] == 19
    robot.press_at = -1
    loop.clear_stop_request()
    loop.run(ticks=10)
    assert not loop.stop_requested and robot.applied[-1][0] > 19 and len(robot.stops) == 2
    # acted again on chunks of the epoch the stop started only (1000 + tick), for observations after it
    assert all(value == tick + 1000 * (tick > 20) for tick, value in robot.applied)


def test_a_stop_requested_before_the_first_action_holds_the_robot_as_a_stopped_one():
    """Pressed before the robot ever moved, the request stopped nothing, and once cleared the robot acted
    on chunks for observations sent before it, with no resume() first."""
    loop, robot, client, _, _, _ = make_loop(2.5 / HZ, robot_class=BrakingRobot)
    loop.run(ticks=2)  # observations 0 and 1 sent, their chunks still on the way
    loop.request_stop()
    loop.run(ticks=5)
    assert robot.calls == [] and client.epoch == 1  # nothing to stop; what was sent before it is of epoch 0
    loop.clear_stop_request()
    loop.run(ticks=10, then_stop=False)
    assert robot.calls[0] == "resume" and robot.applied and all(value >= 1000 for _, value in robot.applied)


def test_a_stop_requested_from_another_thread_ends_a_run_at_once():
    import threading
    import time

    from polcache_client.rate import MonotonicClock

    client = ScriptedClient(MonotonicClock(), 0.0)
    robot = StepRobot(HZ)
    loop = ControlLoop(robot, client, HZ, watchdog=Watchdog(0.1))
    threading.Timer(0.3, loop.request_stop).start()
    t0 = time.monotonic()
    loop.run(seconds=30)
    assert time.monotonic() - t0 < 1.0 and robot.applied and len(robot.stops) == 1


def test_a_run_off_the_main_thread_says_once_that_signals_do_not_stop_it(caplog):
    """Ctrl-C reaches the main thread only: a loop run from a worker thread kept commanding the robot,
    and nothing said where the stop must come from."""
    import threading

    loop, *_ = make_loop(0.5 / HZ)
    with caplog.at_level(logging.WARNING, logger="polcache_client"):
        for _ in range(2):
            worker = threading.Thread(target=loop.run, kwargs={"ticks": 3}, name="ros-executor")
            worker.start()
            worker.join()
    assert caplog.text.count("run() on thread 'ros-executor': Ctrl-C and SIGTERM reach the main thread only") == 1
    assert "then wait while this thread is_alive() (docs/protocol.md: not a join()" in caplog.text  # as the docs say
    assert "loop.request_stop()" in caplog.text
