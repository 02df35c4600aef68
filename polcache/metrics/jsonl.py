"""The metrics file the dashboard reads: one JSON object per line, written on a background
thread so a slow disk never delays a control tick, and rotated by size so it never fills one.

Lines look like {"kind": "tick", "t": ..., "period_error_ms": ..., ...}; see the record
classes in polcache_client.records and polcache.serve.records for the fields of each kind.
`labels` (e.g. the robot's name) are added to every line that lacks them, so a reader of
several files can tell robots apart. A record reaches the writer's thread as it is and becomes a
line there: the caller (a server's reply path, a control tick) pays one queue put.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import msgspec

from polcache.metrics.registry import builtin_scalar, record_fields

log = logging.getLogger("polcache.metrics")


class JsonlWriter:
    """Keeps `path` under `max_bytes` by renaming it to path.1 (path.1 to path.2, ...) and keeps
    `backups` old files; drops (and counts) records when more than `queue_size` wait."""

    def __init__(self, path: str | Path, max_bytes: int = 10 * 2**20, backups: int = 3, queue_size: int = 10_000,
                 labels: dict[str, Any] | None = None):
        self.path = Path(path)
        self.labels = dict(labels or {})
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)  # records, dicts (write), None: stop
        self._encoder = msgspec.json.Encoder(enc_hook=builtin_scalar)
        self._file = open(self.path, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="polcache-metrics-writer", daemon=True)
        self._thread.start()

    def write(self, item: dict[str, Any] | Any) -> None:
        """One line: a dict as it is, or a record (its kind and fields, the labels it lacks)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    __call__ = write  # a Metrics sink

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                line = self._encoder.encode(item if isinstance(item, dict) else self.labels | record_fields(item)).decode()
            except (TypeError, ValueError) as exc:  # a field JSON cannot hold: that line is lost, not the writer
                self.dropped += 1
                log.warning("metrics line not written: %s", exc)
                continue
            if self._file.tell() + len(line) + 1 > self.max_bytes:
                self._rotate()
            self._file.write(line + "\n")
            if self._queue.empty():
                self._file.flush()
        self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
