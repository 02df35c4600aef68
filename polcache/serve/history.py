"""Per-robot observation history, kept by the server so a policy conditioned on several
steps can never see a half-filled window.

The first observation of an epoch is repeated to fill the window, a gap in sequence numbers
repeats the newest earlier observation, and the window is cleared when the epoch changes,
so the policy always receives exactly `n_steps` observations. With a frame stride s the
window holds the steps newest-(n_steps-1)s, .., newest-s, newest (polcache.policy.spec's
frame_offsets, the same layout as the training windows, padding included).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

import numpy as np

from polcache.policy.spec import frame_offsets


class ObservationHistory:
    def __init__(self, n_steps: int, stride: int = 1, mode: str = "strided"):
        if n_steps < 1 or stride < 1:
            raise ValueError(f"history needs at least one step and a stride >= 1, got {n_steps}, {stride}")
        self.n_steps, self.offsets = n_steps, frame_offsets(n_steps, stride, mode)
        self._entries: deque[tuple[int, dict[str, np.ndarray]]] = deque(maxlen=1 - self.offsets[0])

    def clear(self) -> None:
        self._entries.clear()

    def drop_through(self, seq: int) -> None:
        """Forget the steps up to and including `seq`; newer ones stay."""
        while self._entries and self._entries[0][0] <= seq:
            self._entries.popleft()

    @property
    def newest_seq(self) -> int | None:
        return self._entries[-1][0] if self._entries else None

    def push(self, seq: int, arrays: dict[str, np.ndarray]) -> bool:
        """Add one step; False (and ignored) if it is not newer than the newest step held."""
        if self._entries and seq <= self._entries[-1][0]:
            return False
        self._entries.append((seq, arrays))
        return True

    def window(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """The sequence numbers used (oldest first) and each key stacked as (1, n_steps, ...)."""
        if not self._entries:
            raise ValueError("window of an empty history")
        entries = self._entries
        newest = len(entries) - 1
        if entries[-1][0] - entries[0][0] == newest:  # no gap (nearly always): step newest+off is at newest+off
            picks = [entries[max(newest + off, 0)] for off in self.offsets]
        else:  # per offset the newest step at or before it, the oldest held where none is
            seqs = [seq for seq, _ in entries]  # ascending (push refuses older steps)
            picks = [entries[max(bisect_right(seqs, seqs[-1] + off) - 1, 0)] for off in self.offsets]
        stacked = {}
        for key, newest_array in picks[-1][1].items():  # filled in place: a third of np.stack's cost, per message
            out = stacked[key] = np.empty((1, len(picks), *newest_array.shape), newest_array.dtype)
            for i, (_, arrays) in enumerate(picks):
                out[0, i] = arrays[key]
        return [seq for seq, _ in picks], stacked


class ExecutedLog:
    """The actions a robot reports having applied (protocol version 2), per control step of the
    current epoch, the newest `span` steps kept: what self-verifying policies compare their
    predicted past actions with, at exactly the past frames' steps."""

    def __init__(self, span: int):
        self.span = span
        self._by_seq: dict[int, np.ndarray] = {}

    def clear(self) -> None:
        self._by_seq.clear()

    def record(self, seqs: list[int], actions: np.ndarray) -> None:
        if not seqs:  # a robot that does not report, or a tick where it applied nothing (waiting, stopped)
            return
        for seq, action in zip(seqs, actions):
            self._by_seq[int(seq)] = np.asarray(action, np.float32)
        newest = max(self._by_seq)
        for seq in [s for s in self._by_seq if s <= newest - self.span]:
            del self._by_seq[seq]

    def at(self, seq: int, offsets: tuple[int, ...], action_dim: int) -> np.ndarray | None:
        """The actions applied at steps seq + offsets (oldest first), NaN rows where none was
        reported; None while nothing at all is known."""
        if not self._by_seq:
            return None
        rows = [self._by_seq.get(seq + off) for off in offsets]
        if not rows or all(r is None for r in rows):
            return None
        unknown = np.full(action_dim, np.nan, np.float32)
        return np.stack([unknown if r is None else r for r in rows])
