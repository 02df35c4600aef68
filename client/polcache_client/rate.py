"""Fixed-rate pacing on a monotonic clock.

`time.sleep` alone overshoots by tens to hundreds of microseconds and drifts when every
period is measured from the last wake-up; that is how control loops silently run slower
than their nominal rate. `Rate` keeps an absolute grid of deadlines, sleeps until shortly
before each one and spins the rest, reports how late every tick woke, and skips (and
counts) grid points it could not make instead of bursting to catch up.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds; tests substitute a synthetic clock."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """Sleep until `spin_s` before the deadline, then spin: sub-millisecond wake-ups at the cost
    of a little CPU per tick."""

    def __init__(self, spin_s: float = 0.0005):
        self.spin_s = spin_s

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        remaining = t - time.monotonic() - self.spin_s
        if remaining > 0:
            time.sleep(remaining)
        while time.monotonic() < t:
            pass


def use_realtime_priority(priority: int = 50) -> None:
    """Schedule the calling thread (and threads it starts later) with SCHED_FIFO, so ordinary
    processes (a policy server on the same cores, logging, a desktop) cannot delay a tick. On
    a shared machine this is what keeps p99 period error under a millisecond; it needs root,
    CAP_SYS_NICE or an rtprio limit (/etc/security/limits.conf)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, OSError) as exc:
        raise PermissionError(f"cannot switch to real-time scheduling (SCHED_FIFO priority {priority}): {exc}; "
                              "run with CAP_SYS_NICE or raise the rtprio limit") from None


@dataclass(frozen=True)
class Tick:
    t: float  # when the tick actually started
    deadline: float  # when it was due
    missed: int  # grid points skipped since the previous tick because the loop ran late

    @property
    def error(self) -> float:
        """Period error: how late this tick started, in seconds."""
        return self.t - self.deadline


class Rate:
    def __init__(self, hz: float, clock: Clock | None = None):
        if not (hz > 0 and math.isfinite(hz)):
            raise ValueError(f"rate must be a positive number of Hz, got {hz}")
        self.period = 1.0 / hz
        self.clock = clock or MonotonicClock()
        self._next = -math.inf  # the grid's next deadline
        self._fresh = True  # the next call starts a new grid

    def reset(self) -> None:
        """Start a fresh grid at the next call, after a pause the loop did not own (an episode's
        reset): nothing in the pause counts as missed, yet no tick comes sooner than a period
        after the last one (a short pause started the grid early: a 50 Hz loop read ~50.3 Hz)."""
        self._fresh = True

    def sleep(self) -> Tick:
        now = self.clock.now()
        if self._fresh:
            deadline, missed, self._fresh = max(now, self._next), 0, False
        else:
            missed = max(0, math.floor((now - self._next) / self.period))
            deadline = self._next + missed * self.period
        self.clock.sleep_until(deadline)
        self._next = deadline + self.period
        return Tick(t=self.clock.now(), deadline=deadline, missed=missed)
