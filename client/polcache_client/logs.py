"""Log lines that cannot flood: a robot sending the same bad message at 50 Hz gets one line
per second per problem, with a count of the ones suppressed, not 50 lines and a slow loop (and,
where asked, ever fewer while the problem goes on)."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 1.0, max_keys: int = 256,
                 longest_s: float | None = None):
        """`longest_s`: a problem that goes on without a pause is said ever less often, its interval
        doubling up to this (a server overloaded all night said it 35 times a minute, 50,000 lines by
        the morning); once it pauses, every interval_s again."""
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.longest_s = longest_s
        self._every: dict[str, float] = {}  # per problem: its interval now (interval_s, doubled while it goes on)
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._held: dict[str, tuple[int, str, float]] = {}  # per problem: its newest suppressed line (see flush)
        self._seen: dict[str, float] = {}  # per problem: when it last happened, said or not (a pause ends a burst)

    def warning(self, key: str, message: str) -> None:
        self._emit(logging.WARNING, key, message)

    def info(self, key: str, message: str) -> None:
        self._emit(logging.INFO, key, message)

    def _emit(self, level: int, key: str, message: str) -> None:
        now = time.monotonic()
        previous, self._seen[key] = self._seen.get(key, float("-inf")), now
        paused = now - previous >= 2 * self.interval_s
        if paused:  # back after a pause: said at once, and every interval_s again
            self._every.pop(key, None)
        every = self._every.get(key, self.interval_s)
        if now - self._last.get(key, float("-inf")) < every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self._held[key] = (level, message, now)
            return
        if len(self._last) >= self.max_keys and key not in self._last:
            self.flush(everything=True)  # the counts held are said, not dropped with the table
            for table in (self._last, self._suppressed, self._held, self._every, self._seen):
                table.clear()
            self._seen[key] = now
        suppressed = self._suppressed.pop(key, 0)
        self._held.pop(key, None)
        # the suppressed ones followed the last line within its interval: where that was long ago (a
        # robot that reconnects under a fixed id a minute later), the count is not of recent ones
        ago = now - self._last.get(key, now)
        self._last[key] = now
        going_on = bool(suppressed) and ago < 2 * every and not paused
        self._every[key] = min(2 * every, self.longest_s) if going_on and self.longest_s else self.interval_s
        suffix = ("" if not suppressed else f" ({suppressed} similar suppressed)" if ago < 2 * self.interval_s
                  else f" ({suppressed} similar suppressed in the last {ago:.0f} s)" if going_on
                  else f" ({suppressed} similar suppressed after the last such line, {ago:.0f} s ago)")
        self.logger.log(level, "%s%s", message, suffix)

    def flush(self, everything: bool = False) -> None:
        """Say the newest suppressed line of each problem whose interval has passed since its last
        line, or that has paused (2 interval_s without it); with `everything`, of every problem (a
        loop or server ending). Without it the last of a burst waited for the next such line, minutes
        later or never: a robot safe-stopped as its server went away, seconds after a routine stop,
        logged the stop only once reconnected. Cheap where nothing is held: call it often (a control
        loop's tick, a server's housekeeping)."""
        if not self._held:
            return
        now = time.monotonic()
        for key, (level, message, when) in list(self._held.items()):
            every = self._every.get(key, self.interval_s)
            going_on = now - self._seen.get(key, when) < 2 * self.interval_s
            if not (everything or not going_on or now - self._last.get(key, float("-inf")) >= every):
                continue
            del self._held[key]
            others = self._suppressed.pop(key, 1) - 1
            self._last[key] = now
            if going_on and self.longest_s:  # said here rather than at its next occurrence: ever less often too
                self._every[key] = min(2 * every, self.longest_s)
            self.logger.log(level, "%s (logged %.1f s after it happened, held back by the rate limit%s)", message,
                            now - when, f"; {others} similar before it suppressed" if others else "")
