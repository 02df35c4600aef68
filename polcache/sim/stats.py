"""Small statistics used by every report: Wilson intervals, latency percentiles, the jerk of the
executed actions at chunk seams."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (well-behaved at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3), "n": len(ms)}


def seam_jerk(actions: np.ndarray, seams: list[int]) -> dict:
    """Mean norm of the third difference of the executed actions (a_t - 3a_{t-1} + 3a_{t-2} - a_{t-3})
    at the steps where a new chunk took over, and at all other steps."""
    if len(actions) < 4:
        return {"seam_jerk": float("nan"), "jerk": float("nan")}
    jerk = np.linalg.norm(actions[3:] - 3 * actions[2:-1] + 3 * actions[1:-2] - actions[:-3], axis=-1)
    at_seam = np.zeros(len(jerk), bool)
    # a chunk that arrived as the episode ended took over no executed step: no seam
    at_seam[[s - 3 for s in seams if 3 <= s < len(actions)]] = True
    return {"seam_jerk": float(jerk[at_seam].mean()) if at_seam.any() else float("nan"),
            "jerk": float(jerk[~at_seam].mean()) if (~at_seam).any() else float("nan")}


def finite_mean(values: list[float]) -> float | None:
    """The mean of the finite values (None without any): per-episode figures an episode may lack."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def jerk_summary(per_episode: list[dict]) -> dict[str, float | None]:
    """Seam and off-seam jerk over a run's episodes (see `seam_jerk`)."""
    return {key: finite_mean([e[key] for e in per_episode]) for key in ("seam_jerk", "jerk")}
