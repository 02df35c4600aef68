"""One robot's session on the torch backend: a ring buffer of per-frame embeddings.

A long-context policy sees K frames, but between two chunks only the newest few are new. The
encoder is per frame (polcache.policy.encoders), so each frame's embedding is computed once,
kept under its control step, and reused by every later window that contains it; frames older
than the window's oldest are dropped. Frames are encoded one at a time, so a window's features are
bit for bit those of re-encoding each of its K frames on its own (encoding the K frames as one
batch rounds differently on CPU BLAS, by ~1e-7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from polcache.errors import ObservationError
from polcache.policy.spec import CommittedActions

if TYPE_CHECKING:
    from polcache.policy.backend import TorchBackend


class EmbeddingRing:
    """Per-frame encoder outputs keyed by control step, none older than the last window's oldest
    frame (a window's frames only move forward: polcache.serve.history)."""

    def __init__(self):
        self._by_step: dict[int, torch.Tensor] = {}
        self._newest: int | None = None
        self.encoded = 0  # frames encoded so far (for benchmarks and tests)

    def clear(self) -> None:
        self._by_step.clear()
        self._newest = None

    def features(self, policy, obs: dict[str, torch.Tensor], steps: Sequence[int]) -> torch.Tensor:
        """obs[key]: (1, K, ...) window whose frame i was observed at steps[i] -> (1, K, F). A step
        already held is not encoded again, so windows must move forward: steps that go back (a new
        episode counted from 0 without reset()) are refused rather than answered with old frames."""
        if list(steps) != sorted(steps) or (self._newest is not None and steps[-1] < self._newest):
            raise ObservationError(f"seqs {list(steps)}: frame steps must ascend and never go back (newest so far "
                                   f"{self._newest}); call reset() before a new episode")
        self._newest = steps[-1]
        new = sorted({s for s in steps if s not in self._by_step})
        if new:
            first = {s: i for i, s in reversed(list(enumerate(steps)))}  # a frame's first index in the window
            with torch.no_grad():
                for s in new:
                    i = first[s]
                    self._by_step[s] = policy.encode({k: v[:, i:i + 1] for k, v in obs.items()})[0, 0]
            self.encoded += len(new)
            oldest = min(steps)  # later windows never reach back further (after a gap: beyond the span)
            for s in [s for s in self._by_step if s < oldest]:
                del self._by_step[s]
        return torch.stack([self._by_step[s] for s in steps])[None]


class TorchSession:
    """`PolicySession` of TorchBackend: encodes each frame once, then samples (and self-verifies)
    through the backend's own paths."""

    def __init__(self, backend: "TorchBackend"):
        self.backend = backend
        self.ring = EmbeddingRing()

    def predict(self, obs: dict[str, np.ndarray], seqs: Sequence[int], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """One chunk from the window `obs` whose frame i was observed at control step `seqs[i]`. Each
        step's frame is encoded once: a step already held keeps the frame first given for it (new
        observations need new steps; a new episode needs reset())."""
        return self.backend.predict_features(self.features(obs, seqs), seed, past_actions, committed)

    def features(self, obs: dict[str, np.ndarray], seqs: Sequence[int]) -> torch.Tensor:
        """This robot's encoded window (1, K, F), kept frames reused: its row of a chunk that
        several robots' sessions sample together (TorchBackend.predict_sessions)."""
        b = self.backend
        batch = b._batch(obs)
        size = next(iter(batch.values())).shape[0]
        if size != 1:
            raise ObservationError(f"a session predicts for one robot: batch 1, got {size}")
        if len(seqs) != b.spec.n_obs_steps:
            raise ObservationError(f"seqs: one control step per frame ({b.spec.n_obs_steps}), got {len(seqs)}")
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seqs):
            raise ObservationError(f"seqs: expected integer control steps, got {list(seqs)!r}")  # 2.7 is no step
        return self.ring.features(b.policy, batch, [int(s) for s in seqs])

    def reset(self) -> None:
        self.ring.clear()
