"""Log lines that cannot flood: a robot sending the same bad message at 50 Hz gets one line
per second per problem, with a count of the ones suppressed, not 50 lines and a slow loop."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 1.0, max_keys: int = 256):
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        self._emit(logging.WARNING, key, message)

    def info(self, key: str, message: str) -> None:
        self._emit(logging.INFO, key, message)

    def _emit(self, level: int, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= self.max_keys and key not in self._last:
            self._last.clear()
            self._suppressed.clear()
        suppressed = self._suppressed.pop(key, 0)
        # the suppressed ones followed the last line within interval_s: where that was long ago (a
        # robot that reconnects under a fixed id a minute later), the count is not of recent ones
        ago = now - self._last.get(key, now)
        self._last[key] = now
        suffix = "" if not suppressed else (f" ({suppressed} similar suppressed)" if ago < 2 * self.interval_s else
                                            f" ({suppressed} similar suppressed after the last such line, {ago:.0f} s "
                                            f"ago)")
        self.logger.log(level, "%s%s", message, suffix)
