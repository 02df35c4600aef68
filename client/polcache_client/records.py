"""What the robot side measures, one record per tick and one per received chunk.

The control loop's own safe stop (`ControlLoop.stop`: at the end of `run()`, on Ctrl-C, SIGTERM or
an exception) is a tick record too, with `ticks` 0 and `safe_stops` 1: summing `safe_stops` counts
the watchdog's stops and the loop's, summing `ticks` counts the ticks.

Records are frozen msgspec Structs handed to callbacks (one is built every tick and request: a
request's 16 fields take 0.2 us as a Struct, 2.8 as a frozen dataclass), so the client stays
free of any metrics backend; `polcache.metrics` turns them into summaries, counters, files and
Prometheus text.
Fields named in `counters` accumulate, fields named in `summaries` are distributions; the rest
(time, epoch, sequence number, labels) identify the record.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class TickRecord(msgspec.Struct, frozen=True):
    kind: ClassVar[str] = "tick"
    counters: ClassVar[tuple[str, ...]] = ("ticks", "missed_ticks", "waiting", "deadline_miss", "safe_stops",
                                         "obs_dropped")
    summaries: ClassVar[tuple[str, ...]] = ("period_error_ms", "queue_depth")

    t: float
    epoch: int
    seq: int
    period_error_ms: float  # how late the tick started (NaN on the loop's stop: no tick started)
    state: str  # watchdog state: waiting, fresh, holding, stopped
    queue_depth: int  # actions left in the newest chunk
    ticks: int = 1  # 0 on the record of the loop's own safe stop, which is no tick
    missed_ticks: int = 0  # steps skipped because the loop itself ran late (never executed)
    waiting: bool = False  # no action yet this episode: its first chunk has not come (or came too late); or the
    # adapter's resume() held the stopped robot (returned False)
    deadline_miss: bool = False  # no fresh action was due (holding or stopped)
    safe_stops: int = 0  # the watchdog's stop on this tick, or the loop's own stop (ticks 0)
    obs_dropped: int = 0  # observation not sent (not connected, socket full, or invalid)


class ChunkRecord(msgspec.Struct, frozen=True):
    kind: ClassVar[str] = "chunk"
    counters: ClassVar[tuple[str, ...]] = ("chunks", "dropped_actions", "stale_chunks")
    summaries: ClassVar[tuple[str, ...]] = ("latency_ms", "inference_ms", "server_ms")

    t: float
    epoch: int
    seq: int
    latency_ms: float  # observation capture to the tick that received the chunk
    inference_ms: float  # as reported by the server
    server_ms: float  # sum of the server's stages
    chunks: int = 1
    dropped_actions: int = 0  # already past due on arrival
    stale_chunks: int = 0  # from another epoch or older than the newest accepted
