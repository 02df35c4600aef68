"""The one place where a denoiser step runs its blocks in order.

Each step follows a row of a precomputed plan: for every block, COMPUTE its delta (and
store it), REUSE the stored delta, or FORECAST it from the last stored ones. Uncached
inference is the all-COMPUTE plan (`ops=None`). No hooks and no global step counters:
the plan is plain data that a torch loop, ONNX Runtime or TensorRT can all follow.
"""

from __future__ import annotations

from typing import Sequence

import torch

from polcache.policy.blocks import Block

COMPUTE, REUSE, FORECAST = 0, 1, 2
OP_NAMES = {COMPUTE: "compute", REUSE: "reuse", FORECAST: "forecast"}


class DeltaStore:
    """The per-chunk memory of a cached run: the last computed delta of every block, and the
    one before it with both step indices, which first-order forecasting extrapolates from."""

    def __init__(self, n_blocks: int):
        self.last: list[torch.Tensor | None] = [None] * n_blocks
        self.last_step = [0] * n_blocks
        self.prev: list[torch.Tensor | None] = [None] * n_blocks
        self.prev_step = [0] * n_blocks

    def put(self, i: int, k: int, delta: torch.Tensor) -> None:
        self.prev[i], self.prev_step[i] = self.last[i], self.last_step[i]
        self.last[i], self.last_step[i] = delta, k

    def reuse(self, i: int, k: int) -> torch.Tensor:
        d = self.last[i]
        if d is None:
            raise RuntimeError(f"plan reuses block {i} at step {k} before it was ever computed")
        return d

    def forecast(self, i: int, k: int) -> torch.Tensor:
        """Finite-difference (TaylorSeer-style, first order) extrapolation along the step index."""
        last, prev = self.last[i], self.prev[i]
        if prev is None:
            return self.reuse(i, k)
        slope = (last - prev) / float(self.last_step[i] - self.prev_step[i])
        return last + slope * float(k - self.last_step[i])


class ChunkContext:
    """Everything a denoising step needs that is fixed for the whole chunk: per cross-attention
    block, the memory keys/values at every step (time token per step + obs tokens per chunk)."""

    def __init__(self, memory_kv: list[tuple[torch.Tensor, torch.Tensor] | None]):
        self.memory_kv = memory_kv  # per block: (K_all, V_all) of shape (steps, B, h, S, d) or None

    def kv_at(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        kv = self.memory_kv[i]
        return None if kv is None else (kv[0][k], kv[1][k])


def run_blocks(
    blocks: Sequence[Block],
    h: torch.Tensor,
    k: int,
    ctx: ChunkContext,
    ops: Sequence[int] | None = None,
    store: DeltaStore | None = None,
) -> torch.Tensor:
    """Advance the residual stream `h` through all blocks at denoising step `k`."""
    if ops is None:
        for i, blk in enumerate(blocks):
            d = blk(h, ctx.kv_at(i, k))
            if store is not None:
                store.put(i, k, d)
            h = h + d
        return h
    for i, blk in enumerate(blocks):
        op = ops[i]
        if op == COMPUTE:
            d = blk(h, ctx.kv_at(i, k))
            store.put(i, k, d)
        elif op == REUSE:
            d = store.reuse(i, k)
        else:
            d = store.forecast(i, k)
        h = h + d
    return h
