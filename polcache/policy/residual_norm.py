"""The residual add that ends a run of blocks, fused with the LayerNorm that starts the next one.

A fused plan row (executor.fused_rows) adds to the residual stream, before each computed block,
the deltas of the blocks since the previous one (its fresh delta and the stored deltas of the
reused blocks after it), and the computed block then normalises the stream. On a GPU at batch 1
each of those is one tiny kernel and a step is bound by how many it launches: 24 residual adds
and 25 LayerNorms of a 139-kernel uncached step on an H100. `add_norm_triton` does both in one
Triton kernel per boundary; `add_norm_torch` is the same arithmetic in torch (what runs where
Triton or CUDA is missing, and the reference the kernel is tested against).

An AddNorm takes (h, deltas, start, stop, norm) and returns (h + sum of delta rows start..stop-1,
norm of that): rows come from the executor's `StackedDeltas`, `norm` is the next block's (or the
final) LayerNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from polcache.policy.executor import StackedDeltas

AddNorm = Callable[[torch.Tensor, "StackedDeltas", int, int, nn.LayerNorm], tuple[torch.Tensor, torch.Tensor]]


def add_norm_torch(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int,
                   norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start..stop-1 added to h (one add, or one GEMM `ones @ rows` for several), then `norm`."""
    n = stop - start
    if n == 1:
        h = h + deltas.buf[start].view_as(h)
    elif n > 1:
        h = torch.addmm(h.reshape(1, -1), deltas.ones[:, :n], deltas.buf[start:stop]).view_as(h)
    return h, norm(h)


_kernel = None


def _build_kernel():
    """The Triton kernel, built on first use (Triton is imported only where it is used)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_norm_kernel(h_ptr, rows_ptr, row_stride, n_rows, w_ptr, b_ptr, h_out_ptr, y_ptr, width, eps,
                        BLOCK: tl.constexpr, STORE_H: tl.constexpr):
        r = tl.program_id(0)  # one program per token (row of width `width`)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(h_ptr + r * width + cols, mask=mask, other=0.0).to(tl.float32)
        for i in range(n_rows):
            x += tl.load(rows_ptr + i * row_stride + r * width + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_H:
            tl.store(h_out_ptr + r * width + cols, x.to(h_out_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / width
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / width + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * width + cols, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)

    return add_norm_kernel


def add_norm_triton(h: torch.Tensor, deltas: "StackedDeltas", start: int, stop: int,
                    norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm_torch` as one Triton kernel (fp32 accumulation whatever the stream's dtype)."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    n = stop - start
    h = h.contiguous()
    width = h.shape[-1]
    rows = deltas.buf[start:stop] if n else deltas.buf[:1]
    h_out = torch.empty_like(h) if n else h
    y = torch.empty_like(h)
    _kernel[(h.numel() // width,)](h, rows, rows.stride(0), n, norm.weight, norm.bias, h_out, y, width, norm.eps,
                                   BLOCK=1 << (width - 1).bit_length(), STORE_H=n > 0)
    return h_out, y


def triton_blocker(device: torch.device) -> str | None:
    """Why the Triton add+norm cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return "the fused add+norm kernel needs a CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None
