"""The VLA family: a vision-language prefix and a flow-matching action expert (pi0 / SmolVLA
style, sized for CPUs).

Prefix: per observation frame a state token and image_grid^2 tokens per camera (a GroupNorm CNN
pooled to a grid), plus the instruction's tokens (its UTF-8 bytes, `bytes_per_token` of them per
token, default 1: a byte-level tokenizer with embeddings trained from scratch, so held-out wording
shares its subwords with the training instructions), through a small pre-norm
transformer encoder. The prefix depends only on the observation, so it runs once per chunk.

Action expert: the DP-T decoder over the action tokens, cross-attending to the prefix output
(every action token sees every prefix token; cross-attention rather than pi0's joint attention,
so the prefix keys/values of each cross-attention block are computed once per chunk by
`prepare_chunk` and reused at every flow step). Trained by flow matching, sampled with Euler
steps. Its blocks are the same named SA/CA/FFN blocks, so calibration, BAC, Bubbling Union,
schedules, CUDA graphs and export treat it exactly like DP-T.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polcache.config import INSTRUCTION_KEY, PolicyConfig
from polcache.data.normalize import Normalizer
from polcache.policy.encoders import ConvTrunk
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.spec import ArraySpec


class ImageTokens(nn.Module):
    """(N, H, W, 3) uint8 -> (N, grid^2, width) tokens: the CNN's feature map average-pooled over a
    grid of equal cells (a fixed pool, not an adaptive one: ONNX cannot export an adaptive pool
    over a dynamic batch; a remainder of the map beyond grid * cell is left out)."""

    def __init__(self, image_size: int, cfg: PolicyConfig):
        super().__init__()
        self.trunk = ConvTrunk(image_size, cfg.image)
        with torch.no_grad():
            side = self.trunk.net(torch.zeros(1, 3, self.trunk.crop, self.trunk.crop)).shape[-1]
        grid = cfg.vla.image_grid
        if side < grid:
            raise ValueError(f"policy.vla.image_grid {grid} exceeds the {side}x{side} feature map of "
                             f"{image_size}px images")
        self.cell, self.grid = side // grid, grid
        self.proj = nn.Linear(self.trunk.channels, cfg.vla.width)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        n = self.cell * self.grid
        pooled = F.avg_pool2d(self.trunk.feature_map(img)[..., :n, :n], self.cell)
        return self.proj(pooled.flatten(2).transpose(1, 2))


class PrefixEncoder(nn.Module):
    """Observation window -> (B, P, width) prefix tokens (the expert's memory)."""

    def __init__(self, obs_spec: dict[str, ArraySpec], obs_keys: Sequence[str], cfg: PolicyConfig):
        super().__init__()
        v = cfg.vla
        self.obs_keys = [k for k in obs_keys if k != INSTRUCTION_KEY]
        self.bytes_per_token = v.bytes_per_token
        if obs_spec[INSTRUCTION_KEY].shape != (v.instruction_bytes,):
            raise ValueError(f"observation 'instruction' has shape {obs_spec[INSTRUCTION_KEY].shape}, "
                             f"policy.vla.instruction_bytes is {v.instruction_bytes}")
        self.tokenizers = nn.ModuleDict()
        tokens_per_frame = 0
        for key in self.obs_keys:
            if key == "state":
                self.tokenizers[key] = nn.Linear(obs_spec[key].shape[0], v.width)
                tokens_per_frame += 1
            else:
                self.tokenizers[key] = ImageTokens(obs_spec[key].shape[0], cfg)
                tokens_per_frame += v.image_grid ** 2
        self.byte_emb = nn.Embedding(256, v.width)
        self.text_proj = nn.Linear(v.bytes_per_token * v.width, v.width)
        text_tokens = v.instruction_bytes // v.bytes_per_token
        self.memory_tokens = cfg.n_obs_steps * tokens_per_frame + text_tokens
        self.pos_emb = nn.Parameter(torch.randn(1, self.memory_tokens, v.width) * 0.02)
        layer = nn.TransformerEncoderLayer(v.width, v.heads, 4 * v.width, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, v.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(v.width)
        self.feature_dim = v.width
        self.causal_memory = False  # every action token sees the whole prefix
        self.per_frame = False  # frames attend to each other: the prefix is recomputed per chunk

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs[key]: (B, To, ...) with `state` normalised; obs["instruction"]: (B, To, bytes) uint8
        (the newest frame's instruction is the one followed)."""
        tokens = []
        for key in self.obs_keys:
            x = obs[key]
            B, To = x.shape[:2]
            t = self.tokenizers[key](x.reshape(B * To, *x.shape[2:]))
            tokens.append(t.reshape(B, -1, t.shape[-1]))  # (B, To * tokens per frame, width)
        text = self.byte_emb(obs[INSTRUCTION_KEY][:, -1].long())  # (B, bytes, width)
        B = text.shape[0]
        tokens.append(self.text_proj(text.reshape(B, -1, self.bytes_per_token * text.shape[-1])))
        return self.norm(self.transformer(torch.cat(tokens, dim=1) + self.pos_emb))


class VisionLanguageAction(DiffusionPolicy):
    """A DiffusionPolicy whose conditioning is the vision-language prefix (see the module docstring)."""

    def __init__(self, cfg: PolicyConfig, obs_spec: dict[str, ArraySpec], obs_keys: Sequence[str], action_dim: int,
                 normalizer: Normalizer, task: str = ""):
        super().__init__(cfg, obs_spec, obs_keys, action_dim, normalizer, task,
                         encoder=PrefixEncoder(obs_spec, obs_keys, cfg))
