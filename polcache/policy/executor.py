"""The one place where a denoiser step runs its blocks in order.

Each step follows a row of a precomputed plan: for every block, COMPUTE its delta (and
store it), REUSE the stored delta, or FORECAST it from the last stored ones. Uncached
inference is the all-COMPUTE plan (`ops=None`). No hooks and no global step counters:
the plan is plain data that a torch loop, ONNX Runtime or TensorRT can all follow.

One op is decided at run time, once per step: GATE (dynamic residual-threshold caching,
TeaCache / first-block-cache style). The blocks before the first GATE of a row are
computed; the change of the last of them since the previous step is accumulated, and
all GATE blocks of the row are computed when the sum passes the plan's threshold
(which then restarts), else reused.

A plan of only COMPUTE and REUSE ops also runs fused (`fused_rows`, `run_fused`). All
deltas live in one (n_blocks, B*H*W) buffer; a computed block writes its delta straight into
its row, and the row together with the stored rows of the reused blocks after it is added to
the residual stream at once, with the next computed block's LayerNorm (residual_norm). On a
GPU, where a step is bound by the number of kernels it launches, this turns the residual adds
and LayerNorms of a step (and a copy per stored delta) into one kernel per computed block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from polcache.policy.blocks import Block
from polcache.policy.ops import COMPUTE, GATE, REUSE
from polcache.policy.residual_norm import AddNorm, add_norm_torch


def decided_at_run_time(plan: Sequence[Sequence[int]] | None) -> bool:
    """Whether some of `plan`'s ops are GATEs: chosen from the chunk's data as it runs."""
    return plan is not None and any(GATE in row for row in plan)


@dataclass(frozen=True)
class Plan:
    """A cache plan as data: `ops[k][i]` is block i's op at denoising step k.

    Behaves as the K rows that `DiffusionPolicy.sample` reads; `table()` gives the same as a
    (K, n_blocks) int8 array for exported denoisers. `threshold` arms GATE ops; `method` and
    `source` say what produced the plan (reported by eval and benchmarks)."""

    ops: tuple[tuple[int, ...], ...]
    method: str = "custom"
    source: str = ""
    threshold: float | None = None

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, k: int) -> tuple[int, ...]:
        return self.ops[k]

    def table(self) -> np.ndarray:
        return np.asarray(self.ops, dtype=np.int8).reshape(len(self.ops), -1)


class DeltaStore:
    """The per-chunk memory of a cached run: the last computed delta of every block, and the
    one before it with both step indices, which first-order forecasting extrapolates from;
    the GATE accumulator; and a count of block evaluations performed."""

    def __init__(self, n_blocks: int, threshold: float | None = None):
        self.last: list[torch.Tensor | None] = [None] * n_blocks
        self.last_step = [0] * n_blocks
        self.prev: list[torch.Tensor | None] = [None] * n_blocks
        self.prev_step = [0] * n_blocks
        self.slope: list[torch.Tensor | None] = [None] * n_blocks
        self.threshold = threshold
        self.accumulated = 0.0
        self.computed = 0

    def put(self, i: int, k: int, delta: torch.Tensor) -> None:
        self.prev[i], self.prev_step[i] = self.last[i], self.last_step[i]
        self.last[i], self.last_step[i] = delta, k
        self.slope[i] = None
        self.computed += 1

    def reuse(self, i: int, k: int) -> torch.Tensor:
        d = self.last[i]
        if d is None:
            raise RuntimeError(f"plan reuses block {i} at step {k} before it was ever computed")
        return d

    def forecast(self, i: int, k: int) -> torch.Tensor:
        """Finite-difference (TaylorSeer-style, first order) extrapolation along the step index;
        the slope is computed once per update and shared by the steps it serves."""
        last, prev = self.last[i], self.prev[i]
        if prev is None:
            return self.reuse(i, k)
        slope = self.slope[i]
        if slope is None:
            slope = self.slope[i] = (last - prev) / float(self.last_step[i] - self.prev_step[i])
        return torch.add(last, slope, alpha=float(k - self.last_step[i]))

    def gate(self, k: int, probe: int, ops: Sequence[int]) -> tuple[int, ...]:
        """Resolve the GATE ops of step k's row from the relative L1 change of block `probe`
        (computed at this step and the previous one) accumulated since the last full step."""
        if self.threshold is None:
            raise RuntimeError("plan has GATE ops but no threshold")
        if probe < 0 or self.last_step[probe] != k or self.prev[probe] is None:
            raise RuntimeError(f"GATE at step {k} needs the block before it computed at this step and the previous one")
        cur, prev = self.last[probe], self.prev[probe]
        self.accumulated += float((cur - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        decided = REUSE
        if self.accumulated >= self.threshold:
            self.accumulated, decided = 0.0, COMPUTE
        return tuple(decided if op == GATE else op for op in ops)


def make_store(plan: Sequence[Sequence[int]] | None, n_blocks: int, kind: type[DeltaStore] = DeltaStore) -> DeltaStore:
    """The store a plan runs with (a Plan carries its GATE threshold; plain rows have none)."""
    return kind(n_blocks, plan.threshold if isinstance(plan, Plan) else None)


class ChunkContext:
    """Everything a denoising step needs that is fixed for the whole chunk: per cross-attention
    block, the memory keys/values at every step (time token per step + obs tokens per chunk),
    and the constant part of the action embedding (position embedding + input bias)."""

    def __init__(self, memory_kv: list[tuple[torch.Tensor, torch.Tensor] | None],
                 embed_bias: torch.Tensor | None = None):
        self.memory_kv = memory_kv  # per block: (K_all, V_all) of shape (steps, B, h, S, d) or None
        self.embed_bias = embed_bias  # (1, H, W)

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
        if op == GATE:  # decided once per step: the rest of the row becomes COMPUTE or REUSE
            ops = store.gate(k, i - 1, ops)
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


@lru_cache(maxsize=64)
def fused_rows(plan: Plan) -> tuple[tuple[int, ...], ...] | None:
    """Per step, the blocks the plan computes (every other block reuses its stored delta), or None
    when it has FORECAST or GATE ops (those need the per-block DeltaStore) or reuses a block before
    computing it."""
    table = plan.table()
    if not np.isin(table, (COMPUTE, REUSE)).all():
        return None
    if ((table == REUSE) & (np.cumsum(table == COMPUTE, axis=0) == 0)).any():
        return None  # reuse before the first computation: the DeltaStore names the error
    return tuple(tuple(int(i) for i in np.flatnonzero(r == COMPUTE)) for r in table)


class StackedDeltas:
    """The deltas of a fused run: row i holds block i's latest delta, flattened."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.buf: torch.Tensor | None = None
        self.ones: torch.Tensor | None = None

    def ready(self, h: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = h.new_zeros((self.n_blocks, h.numel()))
            self.ones = h.new_ones((1, self.n_blocks))


def run_fused(blocks: Sequence[Block], h: torch.Tensor, k: int, ctx: ChunkContext, computed: Sequence[int],
              deltas: StackedDeltas, final_norm: torch.nn.LayerNorm, add_norm: AddNorm = add_norm_torch) -> torch.Tensor:
    """Advance `h` through all blocks at step k computing only the blocks `computed` (a row of
    `fused_rows`) and return the stream normalised by `final_norm`. Before each computed block the
    delta rows since the previous one (its fresh delta and the stored ones of the reused blocks
    after it) are added and the block's LayerNorm applied, in one `add_norm` call (one Triton
    kernel on a GPU: polcache.policy.residual_norm); the block writes its delta into its row."""
    deltas.ready(h)
    added = 0  # rows below this one are in h
    for i in computed:
        h, y = add_norm(h, deltas, added, i, blocks[i].norm)
        blocks[i].branch(y, ctx.kv_at(i, k), out=deltas.buf[i].view_as(h))
        added = i
    return add_norm(h, deltas, added, len(blocks), final_norm)[1]
