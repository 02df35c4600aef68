"""What to do on a tick with no fresh action: hold the last one briefly, then stop safely.

A late chunk for one tick should not jerk the robot to a halt, but a dead server must not
leave it replaying a stale command either. The watchdog holds the last action for `hold_s`,
then asks for a safe stop exactly once, and resumes as soon as fresh actions return.
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import NamedTuple

import numpy as np

log = logging.getLogger("polcache_client")
LONG_HOLD_S = 1.0  # a hold beyond this is said: most likely milliseconds given as seconds


class State(str, Enum):
    WAITING = "waiting"  # no action yet this episode (a robot still moving from the last is stopped after hold_s)
    FRESH = "fresh"
    HOLDING = "holding"
    STOPPED = "stopped"


class Decision(NamedTuple):
    state: State
    action: np.ndarray | None  # apply this, if not None
    stop: bool  # call the adapter's safe_stop now (only on entering STOPPED)


class Watchdog:
    """Decides each tick whether to act, hold or stop: see the module's docstring."""

    def __init__(self, hold_s: float = 0.2):
        """`hold_s`: how long the last action is held without fresh ones before the safe stop
        (0: stop at the first tick without one)."""
        if not 0 <= hold_s < math.inf:
            raise ValueError(f"hold_s: expected a finite number of seconds >= 0, got {hold_s}")
        if hold_s > LONG_HOLD_S:
            log.warning("hold_s %g s: a robot whose policy goes quiet keeps executing its last action that long "
                        "before the safe stop (seconds, not milliseconds)", hold_s)
        self.hold_s = hold_s
        self.reset()

    def reset(self, moving_since: float | None = None) -> None:
        """Wait for a new episode's first action. `moving_since`: the robot was still moving at this
        time (episodes run back to back, not stopped between them): without an action by `hold_s`
        after it, it is stopped as a held one would be (a server silent from the reset on left it
        executing its last command until the loop ended)."""
        self.state = State.WAITING
        self._last_action: np.ndarray | None = None
        self._last_fresh = float("-inf") if moving_since is None else moving_since

    @property
    def last_fresh(self) -> float:
        """When the last fresh action came (-inf: none since a reset at rest): a hold counts from it."""
        return self._last_fresh

    def stop(self) -> None:
        """The robot was stopped from outside (the loop's end, an exception): nothing to hold."""
        self.state, self._last_action = State.STOPPED, None

    def step(self, now: float, action: np.ndarray | None) -> Decision:
        if action is not None:
            self.state, self._last_action, self._last_fresh = State.FRESH, action, now
            return Decision(self.state, action, False)
        resting = self._last_fresh == float("-inf")  # waiting since a reset at rest
        if self.state is State.STOPPED or (self.state is State.WAITING and
                                           (resting or now - self._last_fresh <= self.hold_s)):
            return Decision(self.state, None, False)  # at rest, or a moving robot's hold since the reset
        if now - self._last_fresh <= self.hold_s:
            self.state = State.HOLDING
            return Decision(self.state, self._last_action, False)
        self.state = State.STOPPED
        return Decision(self.state, None, True)
