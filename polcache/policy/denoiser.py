"""DP-T: the transformer denoiser of Chi et al. (2023), as an ordered list of named blocks.

Memory = [diffusion-step token, one token per observation step], passed through a
token-wise conditioning MLP; action tokens attend causally to each other and to memory
tokens up to their own time index. The VLA's action expert is the same transformer over a
different memory: the prefix tokens, all of them visible to every action token. Because the conditioning is token-wise, the time
token's memory depends only on the step and the observation tokens' memory only on the
chunk: `prepare_chunk` computes both (and every cross-attention block's keys and values)
once per chunk, so a denoising step only embeds x, runs the blocks and applies the head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from polcache.config import PolicyConfig
from polcache.policy.blocks import CA, Block, CrossAttentionBlock, decoder_blocks
from polcache.policy.executor import ChunkContext, DeltaStore, StackedDeltas, run_blocks, run_fused
from polcache.policy.residual_norm import AddNorm, add_norm_torch


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) timesteps -> (N, dim), as in DDPM / diffusion_policy's SinusoidalPosEmb."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class DiffusionTransformer(nn.Module):
    def __init__(self, action_dim: int, obs_feature_dim: int, cfg: PolicyConfig, memory_tokens: int | None = None,
                 causal_memory: bool = True):
        """`memory_tokens` conditioning tokens (default: one per observation step); with
        `causal_memory` action token i sees only memory tokens 0..i (DP-T), otherwise all."""
        super().__init__()
        W, H = cfg.width, cfg.horizon
        To = cfg.n_obs_steps if memory_tokens is None else memory_tokens
        self.width, self.horizon, self.memory_tokens = W, H, To
        self.input_emb = nn.Linear(action_dim, W)
        self.pos_emb = nn.Parameter(torch.zeros(1, H, W))
        self.obs_emb = nn.Linear(obs_feature_dim, W)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + To, W))
        self.drop = nn.Dropout(cfg.p_drop_emb)
        self.cond_mlp = nn.Sequential(nn.Linear(W, 4 * W), nn.Mish(), nn.Linear(4 * W, W))
        self.blocks = nn.ModuleList(decoder_blocks(cfg.n_layers, W, cfg.n_heads, cfg.ffn_mult, cfg.p_drop_attn))
        self.ln_f = nn.LayerNorm(W)
        self.head = nn.Linear(W, action_dim)
        self._time_kv: dict[tuple, list] = {}
        # action token i sees the time token and observation tokens 0..i (diffusion_policy's memory mask)
        t_idx = torch.arange(H)[:, None]
        s_idx = torch.arange(1 + To)[None, :]
        mask = t_idx >= (s_idx - 1) if causal_memory else torch.ones(H, 1 + To, dtype=torch.bool)
        for blk in self.blocks:
            if isinstance(blk, CrossAttentionBlock):
                blk.set_mask(mask)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @property
    def block_list(self) -> list[Block]:
        return list(self.blocks)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    # ---- conditioning memory -------------------------------------------------------------
    def time_memory(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, W) memory of the time token (independent of the observation)."""
        emb = sinusoidal_embedding(timesteps, self.width).to(self.cond_pos_emb.dtype)
        return self.cond_mlp(emb + self.cond_pos_emb[0, 0])

    def obs_memory(self, obs_features: torch.Tensor) -> torch.Tensor:
        """(B, To, F) observation features -> (B, To, W) memory of the observation tokens."""
        return self.cond_mlp(self.drop(self.obs_emb(obs_features) + self.cond_pos_emb[:, 1:]))

    def embed_actions(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.input_emb(x) + self.pos_emb)

    def embed_step(self, x: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """`embed_actions` at inference as one kernel: x W^T + (position embedding + bias) kept
        per chunk (no dropout: steps are an inference path)."""
        x = x.to(self.pos_emb.dtype)
        return torch.baddbmm(ctx.embed_bias, x, self.input_emb.weight.t().expand(x.shape[0], -1, -1))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(h))

    # ---- training: the plain path --------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, obs_features: torch.Tensor) -> torch.Tensor:
        """x: (B, H, Da) noisy actions, timesteps: (B,), obs_features: (B, To, F) -> (B, H, Da)."""
        memory = torch.cat([self.time_memory(timesteps)[:, None], self.obs_memory(obs_features)], dim=1)
        h = self.embed_actions(x)
        for blk in self.blocks:
            h = h + blk(h, blk.memory_kv(memory) if blk.kind == CA else None)
        return self.output(h)

    # ---- inference: per-chunk precomputation + plan-driven steps --------------------------
    def prepare_chunk(self, obs_features: torch.Tensor, timesteps: torch.Tensor) -> ChunkContext:
        """Compute every cross-attention block's keys/values for all `timesteps` of one chunk.

        The time token's keys/values depend only on the weights and the sampler's timesteps,
        so outside training they are computed once per sampler and kept (`_time_kv`)."""
        obs_features = obs_features.to(self.pos_emb.dtype)  # a reduced-precision denoiser runs in its dtype
        B = obs_features.shape[0]
        K = timesteps.shape[0]
        time_kv = self.time_kv(timesteps)
        o_mem = self.obs_memory(obs_features)  # (B, To, W)
        kvs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for blk, t_kv in zip(self.blocks, time_kv):
            if t_kv is None:
                kvs.append(None)
                continue
            ok, ov = blk.memory_kv(o_mem)  # (B, h, To, d)

            def per_step(t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
                o = o.unsqueeze(0).expand(K, -1, -1, -1, -1)  # (K, B, h, To, d)
                return torch.cat([t.expand(K, B, -1, -1, -1), o], dim=3).contiguous()

            kvs.append((per_step(t_kv[0], ok), per_step(t_kv[1], ov)))
        return ChunkContext(kvs, self.pos_emb + self.input_emb.bias)

    def time_kv(self, timesteps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block: the time token's keys and values at every step, (K, 1, h, 1, d) each."""
        # Keyed by the tensor itself (samplers are kept per policy), never by its values: reading
        # them back to the host would block capturing a whole chunk as one CUDA graph.
        key = id(timesteps)
        cached = None if self.training or torch.is_grad_enabled() else self._time_kv.get(key)
        if cached is not None and cached[0] is timesteps:
            return cached[1]
        t_mem = self.time_memory(timesteps)[None]  # (1, K, W)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for blk in self.blocks:
            if blk.kind != CA:
                out.append(None)
                continue
            tk, tv = blk.memory_kv(t_mem)  # (1, h, K, d)
            out.append((tk.permute(2, 0, 1, 3).unsqueeze(3), tv.permute(2, 0, 1, 3).unsqueeze(3)))
        if not (self.training or torch.is_grad_enabled()):
            self._time_kv[key] = (timesteps, out)
        return out

    # Any change of mode or weights invalidates the kept time-token keys/values.
    def train(self, mode: bool = True) -> "DiffusionTransformer":
        self._time_kv.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # called also when a parent module loads
        self._time_kv.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def step(
        self,
        x: torch.Tensor,
        k: int,
        ctx: ChunkContext,
        ops: Sequence[int] | None = None,
        store: DeltaStore | None = None,
    ) -> torch.Tensor:
        """One denoiser evaluation at step index k of the chunk prepared in `ctx`. The sample x
        keeps its dtype (the sampler updates it in fp32) whatever the denoiser's precision."""
        h = run_blocks(self.blocks, self.embed_step(x, ctx), k, ctx, ops, store)
        return self.output(h).to(x.dtype)

    def step_fused(self, x: torch.Tensor, k: int, ctx: ChunkContext, computed: Sequence[int],
                   deltas: StackedDeltas, add_norm: AddNorm = add_norm_torch) -> torch.Tensor:
        """`step` computing only the blocks `computed` (a COMPUTE/REUSE plan's row, see
        executor.fused_rows); `add_norm` fuses each residual add with the next LayerNorm."""
        y = run_fused(self.blocks, self.embed_step(x, ctx), k, ctx, computed, deltas, self.ln_f, add_norm)
        return self.head(y).to(x.dtype)
