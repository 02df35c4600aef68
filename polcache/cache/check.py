"""How far a cache plan's chunks are from uncached ones, on held-out observations with the same
noise. The mean error hides what a robot meets: its worst action, and a chunk made rougher (a
reused residual is a step function across the steps it covers), which the NMSE barely sees."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from polcache.cache.protocol import CacheTarget
from polcache.policy.executor import make_store
from polcache.policy.samplers import Sampler

ROUGH_JERK_RATIO = 1.1  # chunks this much jerkier than uncached, on average, are worth a larger budget


def sample_counted(policy: CacheTarget, feats: torch.Tensor, sampler: Sampler, plan: Sequence | None,
                   seed: int) -> tuple[torch.Tensor, int]:
    """Normalised actions of one chunk under `plan` (None: uncached) and the block evaluations it took."""
    n = len(policy.cache_blocks)
    store = make_store(plan, n) if plan is not None else None
    x = policy.sample(feats, sampler, plan, torch.Generator(device=feats.device).manual_seed(seed), store)
    return x, (store.computed if store is not None else sampler.num_steps * n)


def chunk_jerk(x: torch.Tensor) -> float:
    """Mean norm of the third difference along a chunk's horizon (normalised actions, (1, H, A));
    NaN for a chunk of fewer than 4 actions, which has none."""
    d3 = x[:, 3:] - 3 * x[:, 2:-1] + 3 * x[:, 1:-2] - x[:, :-3]
    return float(d3.norm(dim=-1).mean()) if d3.shape[1] else float("nan")


@torch.no_grad()
def plan_deviation(policy: CacheTarget, feats_list: Sequence[torch.Tensor], sampler: Sampler, plan: Sequence | None,
                   refs: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """Against uncached with the same noise (observation i sampled with seed i), over `feats_list`
    (one observation's features each): the mean normalised MSE, the worst action's deviation (max
    |cached - uncached|, normalised units), the mean ratio of the chunks' jerk (cached / uncached;
    None where no uncached chunk has any: fewer than 4 actions, or constant ones) and the mean
    block evaluations. `refs`: the uncached chunks, where already sampled."""
    if refs is None:
        refs = [sample_counted(policy, f, sampler, None, i)[0] for i, f in enumerate(feats_list)]
    nmse, worst, jerk, evals = [], [], [], []
    for i, (f, ref) in enumerate(zip(feats_list, refs)):
        x, e = sample_counted(policy, f, sampler, plan, i)
        nmse.append(float(((x - ref) ** 2).sum() / (ref ** 2).sum()))
        worst.append(float((x - ref).abs().max()))
        if chunk_jerk(ref) > 0:  # NaN (too short) and 0 (constant) give no ratio
            jerk.append(chunk_jerk(x) / chunk_jerk(ref))
        evals.append(e)
    return {"nmse": float(np.mean(nmse)), "max_dev": max(worst), "jerk_ratio": float(np.mean(jerk)) if jerk else None,
            "evals": float(np.mean(evals))}
