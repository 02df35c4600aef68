"""Adaptive Caching Scheduler (ACS): the best update steps for one block, by exact dynamic programming.

Update steps c_0 = 0 < c_1 < ... < c_{S-1} split the K denoising steps into S contiguous
segments; every step of a segment is served by the delta computed at its first step. The
schedule maximises the similarity kept, sum over segments of sum_{t in segment} sim[start, t].
"""

from __future__ import annotations

import numpy as np

from polcache.cache.errors import CacheError

_TIE_TOL = 1e-9  # relative: scores this close count as equal, and the earliest steps win


def _check(similarity: np.ndarray, budget: int) -> np.ndarray:
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise CacheError(f"similarity must be a non-empty square K x K matrix, got shape {tuple(sim.shape)}")
    if not np.isfinite(sim).all():
        raise CacheError("similarity matrix contains NaN or inf")
    K = sim.shape[0]
    if isinstance(budget, bool) or int(budget) != budget or not 1 <= budget <= K:
        raise CacheError(f"budget must be an integer number of update steps in 1..{K}, got {budget!r}")
    return sim


def segment_scores(similarity: np.ndarray) -> np.ndarray:
    """phi[i, e] = sum_{t=i..e} sim[i, t] for e >= i: what a segment [i, e] keeps (-inf below the diagonal)."""
    sim = np.asarray(similarity, dtype=np.float64)
    phi = np.cumsum(np.triu(sim), axis=1)
    phi[np.tril_indices_from(phi, -1)] = -np.inf
    return phi


def acs_score(similarity: np.ndarray, steps: list[int]) -> float:
    """The objective of a set of update steps (sorted, starting at 0): total similarity kept."""
    phi = segment_scores(similarity)
    ends = list(steps[1:]) + [phi.shape[0]]
    return float(sum(phi[s, e - 1] for s, e in zip(steps, ends)))


def _solve(sim: np.ndarray, budget: int) -> list[int]:
    K = sim.shape[0]
    phi = segment_scores(sim)
    # best[m][i]: best score of steps i..K-1 cut into m segments, the first starting at i.
    best = np.full((budget + 1, K + 1), -np.inf)
    best[1, :K] = phi[:, K - 1]
    nxt = np.full((K, K + 1), -np.inf)  # nxt[i, j] = phi[i, j-1] for the next segment starting at j > i
    nxt[:, 1:] = phi
    nxt[np.tril_indices(K, 0, K + 1)] = -np.inf
    for m in range(2, budget + 1):
        best[m, :K] = (nxt + best[m - 1][None, :]).max(axis=1)
    steps, i = [0], 0
    for m in range(budget, 1, -1):  # forward: the earliest next start that is still optimal
        cand = nxt[i] + best[m - 1]
        target = best[m, i]
        j = int(np.flatnonzero(cand >= target - _TIE_TOL * (1.0 + abs(target)))[0])
        steps.append(j)
        i = j
    return steps


def solve_acs(similarity: np.ndarray, budget: int, force_last: bool = False) -> list[int]:
    """Sorted update steps (starting with 0) of the exact ACS optimum with `budget` segments.

    O(budget * K^2). Among equal optima, the lexicographically earliest steps win. With
    `force_last` the final step K-1 is recomputed on top of the budget (as in the authors' code,
    where S=10 of K=100 gives 11 updates) and the S segments are optimised over steps 0..K-2."""
    sim = _check(similarity, budget)
    K = sim.shape[0]
    budget = int(budget)
    if not force_last or K == 1:
        return _solve(sim, budget)
    if budget >= K - 1:
        return list(range(K))
    return _solve(sim[: K - 1, : K - 1], budget) + [K - 1]
