"""Which action is due now, given the chunks received so far.

Every action carries the time it is due (on the robot's clock). A tick executes the action due
within half a period of its step's time (polcache_client.loop.ControlLoop.tick); actions due
before the step under way when their chunk arrives are dropped (latency compensation), never
executed late. Overlapping chunks are blended with
exponential weights by recency (temporal ensembling) or the newest wins. Chunks from another
epoch, or older than the newest accepted one, are ignored, so the first chunk of an episode
and chunks after a reset or reconnect never mix with old ones.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from polcache_client.protocol import ActionChunk

BLEND_MODES = ("ensemble", "latest")


@dataclass(frozen=True)
class _Planned:
    seq: int
    t_actions: np.ndarray
    actions: np.ndarray


class ActionSchedule:
    """`decay` weights the k-th newest overlapping chunk by exp(-decay * k): positive favours new
    chunks (reactive), negative favours old ones (ACT's smoother choice), zero averages."""

    def __init__(self, hz: float, blend: str = "ensemble", decay: float = 0.5, max_chunks: int = 16):
        """`hz`: the control rate (an action is due within half a period of its time). `max_chunks`:
        overlapping chunks kept for blending."""
        if not 0 < hz < math.inf:
            raise ValueError(f"hz must be a positive control rate, got {hz}")
        if not math.isfinite(decay):
            raise ValueError(f"decay must be a finite number, got {decay}")
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        self.hz = hz
        self.half_period = 0.5 / hz
        self.blend = blend
        self.decay = decay
        self._chunks: deque[_Planned] = deque(maxlen=1 if blend == "latest" else max_chunks)
        self.epoch = 0
        self._last_seq = -1

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self._last_seq = -1
        self._chunks.clear()

    def add(self, chunk: ActionChunk, now: float) -> int | None:
        """Accept a chunk; returns how many of its actions were already past due and dropped,
        or None if the chunk is stale (other epoch, or not newer than the last accepted)."""
        if chunk.epoch != self.epoch or chunk.seq <= self._last_seq:
            return None
        self._last_seq = chunk.seq
        keep = chunk.t_actions >= now - self.half_period
        if keep.any():
            self._chunks.append(_Planned(chunk.seq, chunk.t_actions[keep], chunk.actions[keep]))
        return int((~keep).sum())

    def action_at(self, now: float) -> np.ndarray | None:
        """The (blended) action due at `now`, or None when no chunk covers it."""
        while self._chunks and self._chunks[0].t_actions[-1] < now - self.half_period:
            self._chunks.popleft()
        due = []
        for planned in reversed(self._chunks):  # newest first
            i = int(np.searchsorted(planned.t_actions, now - self.half_period, side="left"))
            if i < len(planned.t_actions) and planned.t_actions[i] < now + self.half_period:
                due.append(planned.actions[i])
        if not due:
            return None
        exponents = -self.decay * np.arange(len(due))
        weights = np.exp(exponents - exponents.max())  # relative to the largest: no overflow for any decay
        return (np.tensordot(weights, np.stack(due), axes=1) / weights.sum()).astype(np.float32)

    def depth(self, now: float) -> int:
        """Actions left in the newest chunk from now on: how long the robot can go without a new one."""
        if not self._chunks:
            return 0
        return int((self._chunks[-1].t_actions >= now - self.half_period).sum())
