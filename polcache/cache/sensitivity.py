"""How strongly an error in one block's delta at one denoising step reaches the action chunk.

The paper's ACS counts every step alike, but a trained policy's sampler forgives early
errors (high noise, clipped x0 estimates, a contracting denoiser) and passes late ones
straight to the output: on our default-size DP-T with DDPM-100, a perturbation of the model
output at step 99 moves the actions hundreds of times more than one at step 50. This module
measures that gain per block and step with one reverse-mode pass per observation:

    sensitivity[i, k] = E_v || d(v . x_out) / d delta_{i,k} ||^2,   v ~ N(0, I),

which is the squared Frobenius norm of the Jacobian from block i's delta at step k to the
final (normalised) action chunk (Hutchinson's estimator; averaged over observations).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from polcache.policy.executor import DeltaStore
from polcache.cache.protocol import CacheTarget
from polcache.policy.samplers import Sampler


class _GraphStore(DeltaStore):
    """Keeps every computed delta as a node of the autograd graph, to differentiate against."""

    def __init__(self, n_blocks: int):
        super().__init__(n_blocks)
        self.deltas: list[torch.Tensor] = []
        self.index: list[tuple[int, int]] = []

    def put(self, i: int, k: int, delta: torch.Tensor) -> None:
        self.deltas.append(delta)
        self.index.append((i, k))


def delta_sensitivity(policy: CacheTarget, sampler: Sampler, features: torch.Tensor,
                      generator: torch.Generator, on_sample: Callable[[], None] | None = None) -> np.ndarray:
    """(n_blocks, K) mean over the N rows of `features` (N, To, F) of the squared gradient norm
    of a random projection of the action chunk with respect to each block's delta at each step.

    Observations run one at a time: the graph of a whole chunk at batch 1 is what bounds memory."""
    n, K = len(policy.cache_blocks), sampler.num_steps
    out = np.zeros((n, K))
    for row in range(features.shape[0]):
        x, noise = policy.initial_noise(1, sampler, generator, features.device)
        v = torch.randn(x.shape, generator=generator, device=features.device)
        store = _GraphStore(n)
        with torch.enable_grad():
            x.requires_grad_(True)  # makes every delta a graph node without touching the weights
            actions = policy.denoise(features[row:row + 1], sampler, x, noise, None, store)
            grads = torch.autograd.grad((v * actions).sum(), store.deltas, allow_unused=True)
        for (i, k), g in zip(store.index, grads):
            if g is not None:  # None: the delta cannot reach the output (e.g. fully clipped)
                out[i, k] += float(g.double().pow(2).sum())
        if on_sample is not None:
            on_sample()
    return out / max(1, features.shape[0])
