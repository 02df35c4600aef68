"""Real-time chunking (RTC; Black, Galliker & Levine 2025) for flow samplers.

A robot keeps executing the current chunk while the next one is computed, so the first `delay`
actions of the next chunk execute from the old one anyway, and where the two chunks disagree
after that the robot jerks at the seam. RTC generates the next chunk as an inpainting problem:
at every flow step the clean-action estimate x0_hat = x - t * v is pulled toward the actions
already committed, with weight 1 for the `delay` actions that will execute before the chunk
arrives and an exponentially decaying weight over the rest of the overlap (0 beyond it), by a
guidance term J^T W (Y - x0_hat) (J = d x0_hat / d x, one vector-Jacobian product per step,
through whatever the cache plan computes; reused block deltas are constants) scaled by
min(max_guidance, t / ((1 - t) r^2)), r^2 = t^2 / (t^2 + (1 - t)^2) (t = 1 noise, 0 data).
The committed actions need not come from this policy, and no retraining is needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from polcache.policy.executor import DeltaStore, make_store
from polcache.policy.samplers import FLOW_TIME_SCALE, Sampler

MAX_GUIDANCE = 5.0  # beta of the paper: caps the guidance weight near pure noise


def overlap_weights(overlap: int, delay: int) -> np.ndarray:
    """Weights of the first `overlap` actions of a new chunk (those the committed actions cover):
    1 for the first `delay` (they execute before the chunk can arrive), then c (e^c - 1) / (e - 1)
    with c falling linearly from ~1 to ~0 over the rest (the paper's soft mask)."""
    w = np.zeros(max(overlap, 0), dtype=np.float32)
    frozen = min(max(delay, 0), len(w))
    w[:frozen] = 1.0
    span = len(w) - frozen
    if span > 0:
        c = (span - np.arange(span)) / (span + 1.0)
        w[frozen:] = c * np.expm1(c) / (math.e - 1.0)
    return w


class _ConstantStore(DeltaStore):
    """Stores computed deltas detached: a later step that reuses one takes it as a constant, so each
    step's vector-Jacobian product stays inside that step."""

    def put(self, i: int, k: int, delta: torch.Tensor) -> None:
        super().put(i, k, delta.detach())


def guidance_weight(t: float, max_guidance: float) -> float:
    """min(beta, t / ((1 - t) r^2)): unbounded at pure noise (t = 1), hence the cap."""
    if t >= 1.0:
        return max_guidance
    r2 = t * t / (t * t + (1.0 - t) ** 2)
    return min(max_guidance, t / ((1.0 - t) * r2)) if t > 0 else 0.0


def require_flow(sampler: Sampler) -> None:
    """RTC steers a flow sampler's clean-action estimate; the others are refused."""
    if sampler.kind != "flow":
        raise ValueError(f"real-time chunking guides flow samplers; this one is {sampler.kind}")


def guided_denoise(policy, features: torch.Tensor, sampler: Sampler, x: torch.Tensor,
                   plan: Sequence[Sequence[int]] | None, target: torch.Tensor, weights: torch.Tensor,
                   max_guidance: float = MAX_GUIDANCE) -> torch.Tensor:
    """`policy.denoise` with RTC guidance: x (B, H, Da) from noise; `target` (B, H, Da) the committed
    actions in normalised units and `weights` (B, H, 1) their per-token weight (0: free). Free of host
    synchronisation, so a CUDA graph can capture it whole (polcache.policy.graph.GuidedChunkGraph)."""
    require_flow(sampler)
    with torch.no_grad():
        ctx = policy.denoiser.prepare_chunk(features, sampler.timesteps)
    n = len(policy.cache_blocks)
    store = None if plan is None else make_store(plan, n, _ConstantStore)
    for k, t in enumerate(step / FLOW_TIME_SCALE for step in sampler.timestep_values):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = policy.denoiser.step(xg, k, ctx, None if plan is None else plan[k], store)
            x0 = xg - t * v
            error = (weights * (target - x0)).detach()
            (g,) = torch.autograd.grad((error * x0).sum(), xg)
        # v points from data to noise; the guidance moves x0_hat toward the target (data side)
        with torch.no_grad():  # as in unguided chunks: a compiled update is not recompiled for grad mode
            x = sampler.update(k, x, v.detach() - guidance_weight(t, max_guidance) * g, None)
    return x
