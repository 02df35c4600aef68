"""Plans that need no calibration, and forecasting as a plan transform.

All of them run in the same executor as BAC, on the same plan format: only the op table
(and, for the threshold cache, the GATE threshold) differs.
"""

from __future__ import annotations

from polcache.cache.errors import CacheError
from polcache.policy.executor import Plan
from polcache.policy.ops import COMPUTE, FORECAST, GATE, REUSE


def no_cache_plan(steps: int, n_blocks: int) -> Plan:
    """Every block at every step: the uncached computation, as a plan."""
    return Plan(((COMPUTE,) * n_blocks,) * steps, method="none")


def uniform_plan(steps: int, n_blocks: int, interval: int) -> Plan:
    """Every block recomputed at steps 0, N, 2N, ... and reused in between (FORA, DeepCache)."""
    if not 1 <= interval <= steps:  # beyond K, every step after the first reuses: the same as N = K, said plainly
        raise CacheError(f"uniform interval must be in 1..{steps} (the sampler's steps K), got {interval}")
    rows = tuple((COMPUTE if k % interval == 0 else REUSE,) * n_blocks for k in range(steps))
    return Plan(rows, method="uniform")


def threshold_plan(steps: int, n_blocks: int, threshold: float) -> Plan:
    """Dynamic residual-threshold cache (TeaCache / first-block cache): the first block is
    computed at every step; its delta's relative L1 change from the previous step is
    accumulated, and every other block is recomputed once the sum reaches `threshold`
    (reused otherwise). The first and last steps compute everything."""
    if not threshold >= 0:  # inf: only the probe block between the first and last steps (the spec takes finite T)
        raise CacheError(f"threshold must be a non-negative number, got {threshold}")
    full = (COMPUTE,) * n_blocks
    gated = (COMPUTE,) + (GATE,) * (n_blocks - 1)
    rows = tuple(full if k in (0, steps - 1) else gated for k in range(steps))
    return Plan(rows, method="threshold", threshold=float(threshold))


def with_forecast(plan: Plan) -> Plan:
    """The same plan, extrapolating skipped deltas (first-order finite difference over the last
    two updates, TaylorSeer-style) instead of reusing the last one."""
    if plan.threshold is not None:
        raise CacheError("+forecast applies to static plans, not to the threshold cache")
    rows = tuple(tuple(FORECAST if op == REUSE else op for op in row) for row in plan.ops)
    return Plan(rows, method=plan.method + "+forecast", source=plan.source)
