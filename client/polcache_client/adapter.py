"""The robot, as the control loop sees it: three calls, no framework.

Anything with these members is a robot (see docs/protocol.md for a worked example):
`obs_spec` and `action_dim` go into the handshake, `observe` and `act` run inside every
control tick and must return quickly, and `safe_stop` is called when the watchdog gives up on
the policy and when the loop that moved the robot ends (never twice in a row).

Optional: `capture_time()`, the time (on the loop's clock: `time.monotonic()` unless the loop
was given another) at which the data `observe()` just returned was captured, for sensors that
lag (a camera's exposure and transfer: its frame is older than the call that fetched it). The
chunk's action 0 then belongs to that instant, so actions are timed from when the robot was
seen, not from when the loop asked. Without it, the loop stamps the observation when it calls
`observe()`. Where sensors differ, return the oldest one's time.

Optional: `resume()`, called before the first action after a `safe_stop` (fresh actions came
again; a held one never wakes a stopped robot): where a stop engaged brakes or disabled the drives,
this re-enables them. Returning a false value other than None (False, numpy's False, 0) keeps the
robot stopped for this tick, and it is asked again at the next tick with a fresh action: a stop that
an operator must acknowledge first (a button, a pendant) waits there. Raising from it ends
`ControlLoop.run` with that exception, the robot safe-stopped again (it may be half woken). Without
it, actions simply resume. It is not called before an episode's very first action (unless a
`request_stop()` came first).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from polcache_client.protocol import ObsSpec


class RobotAdapter(Protocol):
    """Your robot: any object with these members (no base class needed). `observe`, `act` and
    `safe_stop` run on the control loop's thread; the loop calls `safe_stop` on a watchdog stop,
    at the end of `ControlLoop.run` and on any exception out of it (Ctrl-C and SIGTERM included),
    but not again when a stop was the last thing the robot was told."""

    obs_spec: ObsSpec  # key -> (shape, dtype) of one control step
    action_dim: int

    def observe(self) -> dict[str, np.ndarray]:
        """The latest observation, matching obs_spec. Must not block waiting for new data."""
        ...

    def act(self, action: np.ndarray) -> None:
        """Command one action (float32, shape (action_dim,)) for the current step: the adapter's own
        copy, which it may convert in place."""
        ...

    def safe_stop(self) -> None:
        """Bring the robot to a safe rest; called when no valid action arrived for too long, and when
        the loop ends or fails."""
        ...
