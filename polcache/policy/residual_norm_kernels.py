"""The Triton kernels of polcache.policy.residual_norm (imported only where Triton is installed).

One program normalises a tile of token rows (h plus the delta rows of the blocks since the last
computed one, accumulated in fp32); `add_norm_kernel` stores the normalised rows, and
`add_norm_linear_kernel` multiplies them by a column tile of the next projection's weight
(IEEE fp32 dot products, so fp32 models keep fp32 results).
"""

import triton
import triton.language as tl


@triton.jit
def _add_norm_tile(h_ptr, rows_ptr, row_stride, n_rows, nw_ptr, nb_ptr, h_out_ptr, store_below, rm, M, width, eps,
                   BK: tl.constexpr):
    """Token rows `rm` of h plus the delta rows, stored to h_out for rows below `store_below` (with no
    delta rows h_out is h: the same values written back), and their LayerNorm."""
    rk = tl.arange(0, BK)
    kmask = rk < width
    m2 = (rm < M)[:, None] & kmask[None, :]
    offs = rm[:, None] * width + rk[None, :]
    x = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    for i in range(n_rows):
        x += tl.load(rows_ptr + i * row_stride + offs, mask=m2, other=0.0).to(tl.float32)
    tl.store(h_out_ptr + offs, x.to(h_out_ptr.dtype.element_ty), mask=(rm < store_below)[:, None] & kmask[None, :])
    mean = tl.sum(x, axis=1) / width
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / width + eps)
    g = tl.load(nw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
    b = tl.load(nb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
    return tl.where(m2, xc * rstd[:, None] * g[None, :] + b[None, :], 0.0)


@triton.jit
def add_norm_kernel(h_ptr, rows_ptr, row_stride, n_rows, nw_ptr, nb_ptr, h_out_ptr, y_ptr, M, width, eps,
                    BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    y = _add_norm_tile(h_ptr, rows_ptr, row_stride, n_rows, nw_ptr, nb_ptr, h_out_ptr, M, rm, M, width, eps,
                       BK)
    rk = tl.arange(0, BK)
    tl.store(y_ptr + rm[:, None] * width + rk[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rk < width)[None, :])


@triton.jit
def add_norm_linear_kernel(h_ptr, rows_ptr, row_stride, n_rows, nw_ptr, nb_ptr, w_ptr, b_ptr, h_out_ptr, z_ptr,
                           M, width, N, eps, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Program (n, m): output columns n*BN.. of token rows m*BM..; every program normalises its
    rows (cheap at these widths), the first column tile also stores the new stream."""
    pid_n = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    y = _add_norm_tile(h_ptr, rows_ptr, row_stride, n_rows, nw_ptr, nb_ptr, h_out_ptr,
                       tl.where(pid_n == 0, M, 0), rm, M, width, eps, BK)
    rk = tl.arange(0, BK)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    w = tl.load(w_ptr + rn[None, :] * width + rk[:, None], mask=(rk < width)[:, None] & nmask[None, :],
                other=0.0).to(tl.float32)  # (BK, BN) tile of W^T
    z = tl.dot(y, w, input_precision="ieee") + tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + rm[:, None] * N + rn[None, :], z.to(z_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & nmask[None, :])


KERNELS = {"norm": add_norm_kernel, "norm+linear": add_norm_linear_kernel}
