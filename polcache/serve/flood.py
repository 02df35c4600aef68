"""One peer flooding the server must not starve the others.

Every message costs the server thread tens of microseconds to read and check, so a peer sending
as fast as it can (a robot loop without its sleep, a script gone wrong) used to take the whole
thread: three 50 Hz robots beside it got a fresh action on a quarter of their ticks. The guard
counts each peer's messages over one-second windows. A peer that sent more than its allowance
in a window in which other peers were heard too is muted for the next window: its messages are
read and dropped unread, at a fraction of the cost, and it is told once per window. A peer alone
on the server is never muted (a benchmark's ping-pong is no flood), and one that slows down is
heard again after the next window.
"""

from __future__ import annotations

from typing import Callable

# Messages per second a robot may send: its observations at its declared rate, four times over
# (retries, a reconnect's burst), plus heartbeats (4 per second) and resets, with room to spare.
RATE_FACTOR = 4
RATE_SLACK = 20
UNKNOWN_ALLOWANCE = 100  # a peer without a session: handshakes, and observations until no_session arrives
DROP_PAUSE_S = 1e-4  # after each message of a muted peer (see PolicyServer._drop)


def allowance(hz: float | None) -> float:
    """The messages per second a peer may send: `hz` its session's control rate, None without one."""
    return UNKNOWN_ALLOWANCE if hz is None else RATE_FACTOR * hz + RATE_SLACK


class FloodGuard:
    """`counts` and `muted` are read on the server's per-message path directly (a method call there
    would cost more than the check)."""

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}  # messages per peer in the current window
        self.muted: frozenset[bytes] = frozenset()
        self.told: set[bytes] = set()  # muted peers told so in the current window

    def new_window(self, allowed: Callable[[bytes], float]) -> dict[bytes, int]:
        """Close the window: mute each peer over `allowed(peer)` if others were heard as well.
        Returns the newly muted peers with their counts."""
        counts, self.counts = self.counts, {}
        self.told.clear()
        over = {peer: n for peer, n in counts.items() if n > allowed(peer)} if len(counts) > 1 else {}
        newly = {peer: n for peer, n in over.items() if peer not in self.muted}
        self.muted = frozenset(over)
        return newly
