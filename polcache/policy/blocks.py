"""The block: one named residual branch `x = x + f(norm(x))` of a decoder layer.

Blocks are the unit that caching, calibration, export and VLA action experts talk about.
A block only computes its delta f(norm(x)); the caller adds it to the residual stream,
so a cached executor can substitute a stored or forecast delta without touching the
model. Names follow `layers.<i>.<kind>` with kind in {sa, ca, ffn}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SA, CA, FFN = "sa", "ca", "ffn"


def project(linear: nn.Linear, y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A block's output projection, written straight into `out` when the executor gives one (the
    row of its delta store): one GEMM with the bias, no copy afterwards."""
    if out is None:
        return linear(y)
    torch.addmm(linear.bias, y.reshape(-1, y.shape[-1]), linear.weight.t(), out=out.view(-1, linear.out_features))
    return out


class Block(nn.Module):
    """Base class: `forward(x, memory_kv, out=None)` returns f(norm(x)), written into `out` if given.
    Subclasses define `branch(y, memory_kv, out)` = f(y) on the normalised input, so an executor
    that normalises itself (the residual add fused with the next LayerNorm) can skip `norm`."""

    kind: str

    def __init__(self, name: str, layer: int, width: int):
        super().__init__()
        self.name = name
        self.layer = layer
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        return self.branch(self.norm(x), memory_kv, out)

    def branch(self, y: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class _Attention(Block):
    def __init__(self, name: str, layer: int, width: int, n_heads: int, p_drop_attn: float):
        super().__init__(name, layer, width)
        self.n_heads = n_heads
        self.head_dim = width // n_heads
        self.p_drop_attn = p_drop_attn
        self.out = nn.Linear(width, width)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, h, T, d)
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:  # (B, h, T, d) -> (B, T, W)
        B, _, T, _ = t.shape
        return t.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    @property
    def _dropout(self) -> float:
        return self.p_drop_attn if self.training else 0.0


class SelfAttentionBlock(_Attention):
    """Causal self-attention over action tokens."""

    kind = SA

    def __init__(self, name: str, layer: int, width: int, n_heads: int, p_drop_attn: float):
        super().__init__(name, layer, width, n_heads, p_drop_attn)
        self.qkv = nn.Linear(width, 3 * width)

    def branch(self, y, memory_kv=None, out=None):
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), is_causal=True,
                                           dropout_p=self._dropout)
        return project(self.out, self._merge(a), out)


class CrossAttentionBlock(_Attention):
    """Cross-attention from action tokens to the conditioning memory [time token, obs tokens].

    Keys and values of the memory are computed by `memory_kv()` once per chunk (obs tokens)
    or once per model (time tokens), never inside the denoising loop. The memory mask is kept
    as an additive float bias whose rows are 16-element aligned: SDPA's memory-efficient CUDA
    kernel takes it as it is, where a boolean mask costs four conversion and padding kernels
    per call (a third of a cached step's launches on an H100)."""

    kind = CA

    def __init__(self, name: str, layer: int, width: int, n_heads: int, p_drop_attn: float):
        super().__init__(name, layer, width, n_heads, p_drop_attn)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.register_buffer("bias", torch.zeros(0, 0), persistent=False)

    def set_mask(self, mask: torch.Tensor) -> None:
        """mask: (T, S) bool, True where an action token may attend to a memory token."""
        T, S = mask.shape
        padded = torch.zeros(T, -(-S // 16) * 16)
        padded[:, :S].masked_fill_(~mask, float("-inf"))
        self.bias = padded

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, W) memory -> keys, values (B, h, S, d). Token-wise, so it can be split by token."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def branch(self, y, memory_kv=None, out=None):
        k, v = memory_kv
        q = self._heads(self.q(y))
        bias = self.bias[:, :k.shape[-2]]  # a view: rows stay aligned
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self._dropout)
        return project(self.out, self._merge(a), out)


class FeedForwardBlock(Block):
    kind = FFN

    def __init__(self, name: str, layer: int, width: int, mult: int, p_drop: float = 0.0):
        super().__init__(name, layer, width)
        self.fc1 = nn.Linear(width, mult * width)
        self.fc2 = nn.Linear(mult * width, width)
        self.drop = nn.Dropout(p_drop)

    def branch(self, y, memory_kv=None, out=None):
        a = F.gelu(self.fc1(y))
        return self.drop(self.fc2(a)) if out is None else project(self.fc2, a, out)


def decoder_blocks(n_layers: int, width: int, n_heads: int, ffn_mult: int, p_drop_attn: float) -> list[Block]:
    """The pre-norm decoder of DP-T as a flat, ordered list of named blocks."""
    blocks: list[Block] = []
    for i in range(n_layers):
        blocks.append(SelfAttentionBlock(f"layers.{i}.sa", i, width, n_heads, p_drop_attn))
        blocks.append(CrossAttentionBlock(f"layers.{i}.ca", i, width, n_heads, p_drop_attn))
        blocks.append(FeedForwardBlock(f"layers.{i}.ffn", i, width, ffn_mult))
    return blocks
