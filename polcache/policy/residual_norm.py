"""The residual add that ends a run of blocks, fused with the LayerNorm and the first projection
of the block that comes next.

A fused plan row (executor.fused_rows) adds to the residual stream, before each computed block,
the deltas of the blocks since the previous one (its fresh delta and the stored deltas of the
reused blocks after it); the computed block then normalises the stream and applies its first
projection (`Block.entry`: QKV, the cross-attention query or fc1), and after the last block the
output LayerNorm and head do the same. On a GPU at batch 1 each of those is one tiny kernel and a
step is bound by how many it launches (24 residual adds and 25 LayerNorms of a 137-kernel
uncached DP-T step on an H100). Three ways to run the same arithmetic, chosen per backend:

    add_norm_torch         torch ops (CPU, eager, and the reference the kernels are tested against)
    add_norm_triton        add + LayerNorm in one Triton kernel, the projection by cuBLAS
    add_norm_linear_triton add + LayerNorm + projection in one Triton kernel (fp32 dot products)

Each takes (h, deltas, start, stop, norm, linear) and returns (h + delta rows start..stop-1,
linear(norm(that))); rows come from the executor's `StackedDeltas`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from polcache.policy.executor import StackedDeltas

AddNorm = Callable[[torch.Tensor, "StackedDeltas", int, int, nn.LayerNorm, nn.Linear],
                   tuple[torch.Tensor, torch.Tensor]]
MODES = ("off", "norm", "norm+linear")


def _add_rows(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int) -> torch.Tensor:
    n = stop - start
    if n == 1:
        return h + deltas.buf[start].view_as(h)
    if n > 1:  # one GEMM: ones @ rows
        return torch.addmm(h.reshape(1, -1), deltas.ones[:, :n], deltas.buf[start:stop]).view_as(h)
    return h


def add_norm_torch(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int, norm: nn.LayerNorm,
                   linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start..stop-1 added to h (one add, or one GEMM for several), then norm, then linear."""
    h = _add_rows(h, deltas, start, stop)
    return h, linear(norm(h))


def _kernel(mode: str):
    """The Triton kernel of a mode, imported on first use (only where Triton is)."""
    from polcache.policy import residual_norm_kernels

    return residual_norm_kernels.KERNELS[mode]


def _launch_args(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int):
    n = stop - start
    h = h.contiguous()
    rows = deltas.buf[start:stop] if n else deltas.buf[:1]
    return h, rows, n, (torch.empty_like(h) if n else h)


def _tiles(M: int, width: int) -> tuple[int, int]:
    import triton

    return min(triton.next_power_of_2(M), 64) if M >= 16 else 16, triton.next_power_of_2(width)


def add_norm_triton(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int, norm: nn.LayerNorm,
                    linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm_torch` with the add and the LayerNorm in one Triton kernel (fp32 accumulation)."""
    h, rows, n, h_out = _launch_args(h, deltas, start, stop)
    width = h.shape[-1]
    M = h.numel() // width
    BM, BK = _tiles(M, width)
    y = torch.empty_like(h)
    _kernel("norm")[(-(-M // BM),)](h, rows, rows.stride(0), n, norm.weight, norm.bias, h_out, y, M, width,
                                     norm.eps, BM=BM, BK=BK)
    return h_out, linear(y)


def add_norm_linear_triton(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int, norm: nn.LayerNorm,
                           linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm_torch` as one Triton kernel: add, LayerNorm and the projection (fp32 arithmetic,
    IEEE dot products, whatever the stream's dtype)."""
    h, rows, n, h_out = _launch_args(h, deltas, start, stop)
    width, N = h.shape[-1], linear.out_features
    M = h.numel() // width
    BM, BK = _tiles(M, width)
    BN = 32
    z = torch.empty((*h.shape[:-1], N), dtype=h.dtype, device=h.device)
    grid = (-(-N // BN), -(-M // BM))
    _kernel("norm+linear")[grid](h, rows, rows.stride(0), n, norm.weight, norm.bias, linear.weight, linear.bias,
                                  h_out, z, M, width, N, norm.eps, BM=BM, BK=BK, BN=BN)
    return h_out, z


def fused_add_norm(mode: str) -> AddNorm | None:
    """The AddNorm of a mode in MODES (None for "off": the executor's plain path)."""
    if mode not in MODES:
        raise ValueError(f"fused add+norm mode must be one of {', '.join(MODES)}, got {mode!r}")
    return {"off": None, "norm": add_norm_triton, "norm+linear": add_norm_linear_triton}[mode]


def triton_blocker(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return "the fused add+norm kernel needs a CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None
