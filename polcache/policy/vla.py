"""The VLA family: a vision-language prefix and a flow-matching action expert (pi0 / SmolVLA
style, sized for CPUs).

Prefix: per observation frame a state token and image_grid^2 tokens per camera (a GroupNorm CNN
pooled to a grid), plus the instruction's tokens (its UTF-8 bytes, `bytes_per_token` of them per
token, default 1: a byte-level tokenizer with embeddings trained from scratch, so held-out wording
shares its subwords with the training instructions), through a small pre-norm
transformer encoder. The prefix depends only on the observation, so it runs once per chunk.
With `text_encoder: minilm` the instruction is instead one token: the frozen pretrained MiniLM's
sentence embedding (polcache.policy.sentence, cached per distinct instruction) through a trained
linear projection; with `minilm-tokens`, one token per WordPiece token of the instruction (the
same model's states before pooling, instruction_bytes // 3 + 2 of them, zero after the text's
end: room for any instruction of three or more bytes per token; a longer one is cut), each
through the projection; with `minilm-tokens+bytes`, those tokens followed by the byte tokens (their
own embeddings and projection). `unit_text_features` multiplies the frozen unit-norm vectors by sqrt(dim)
first, so their features enter at the scale of the state and byte tokens rather than ~20x below.

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

from polcache.config import BYTE_TEXT_ENCODERS, INSTRUCTION_KEY, PolicyConfig
from polcache.data.normalize import Normalizer
from polcache.errors import ConfigError
from polcache.policy.encoders import ConvTrunk
from polcache.policy.language import decode_instruction
from polcache.policy.pinned import PackageWeights
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.sentence import minilm
from polcache.policy.spec import ArraySpec


class ImageTokens(nn.Module):
    """(N, H, W, 3) uint8 -> (N, grid^2, width) tokens: the CNN's feature map average-pooled over a
    grid of equal cells (a fixed pool, not an adaptive one: ONNX cannot export an adaptive pool
    over a dynamic batch; a remainder of the map beyond grid * cell is left out)."""

    def __init__(self, key: str, image_shape: tuple[int, ...], cfg: PolicyConfig):
        super().__init__()
        self.trunk = ConvTrunk(key, image_shape, cfg.image)
        with torch.no_grad():
            side = self.trunk.net(torch.zeros(1, 3, self.trunk.crop, self.trunk.crop)).shape[-1]
        grid = cfg.vla.image_grid
        if side < grid:
            raise ConfigError(f"policy.vla.image_grid {grid} exceeds the {side}x{side} feature map of obs {key!r}'s "
                              f"{image_shape[0]}x{image_shape[1]} images")
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
            have = obs_spec[INSTRUCTION_KEY].shape
            raise ConfigError(f"policy.vla.instruction_bytes is {v.instruction_bytes} but the observation 'instruction' "
                              f"holds {have[0] if len(have) == 1 else have} bytes (as recorded with --instructions): "
                              f"set policy.vla.instruction_bytes to match")
        self.tokenizers = nn.ModuleDict()
        tokens_per_frame = 0
        for key in self.obs_keys:
            if key == "state":
                self.tokenizers[key] = nn.Linear(obs_spec[key].shape[0], v.width)
                tokens_per_frame += 1
            else:
                self.tokenizers[key] = ImageTokens(key, obs_spec[key].shape, cfg)
                tokens_per_frame += v.image_grid ** 2
        self.text_encoder = v.text_encoder
        self.sentence = None if v.text_encoder == "bytes" else minilm()  # frozen, not a submodule: never saved
        self.n_text_tokens = 0  # the frozen encoder's tokens
        if self.sentence is not None:
            self.text_proj = nn.Linear(self.sentence.dim, v.width)
            self.n_text_tokens = 1 if v.text_encoder == "minilm" else v.instruction_bytes // 3 + 2
        self.n_byte_tokens = v.instruction_bytes // v.bytes_per_token if v.text_encoder in BYTE_TEXT_ENCODERS else 0
        if self.n_byte_tokens:
            self.byte_emb = nn.Embedding(256, v.width)
            # bytes alone keep the name text_proj, so checkpoints from before the frozen encoders load
            byte_proj = nn.Linear(v.bytes_per_token * v.width, v.width)
            if self.sentence is None:
                self.text_proj = byte_proj
            else:
                self.byte_proj = byte_proj
        text_tokens = self.n_text_tokens + self.n_byte_tokens
        self.text_scale = self.sentence.dim ** 0.5 if self.sentence is not None and v.unit_text_features else 1.0
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
        tokens.append(self.text_tokens(obs[INSTRUCTION_KEY][:, -1]))
        return self.norm(self.transformer(torch.cat(tokens, dim=1) + self.pos_emb))

    def text_tokens(self, instruction: torch.Tensor) -> torch.Tensor:
        """(B, bytes) uint8 -> (B, text tokens, width): the frozen encoder's tokens, then the byte tokens."""
        if self.sentence is None:
            return self.byte_tokens(instruction, self.text_proj)
        frozen = self.frozen_tokens(instruction)
        return frozen if not self.n_byte_tokens else torch.cat([frozen, self.byte_tokens(instruction, self.byte_proj)], 1)

    def byte_tokens(self, instruction: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """(B, bytes) -> (B, bytes // bytes_per_token, width): embedded bytes, bytes_per_token per token."""
        text = self.byte_emb(instruction.long())  # (B, bytes, width)
        return proj(text.reshape(text.shape[0], -1, self.bytes_per_token * text.shape[-1]))

    def frozen_tokens(self, instruction: torch.Tensor) -> torch.Tensor:
        """(B, bytes) -> (B, n_text_tokens, width): the frozen MiniLM's vectors, projected."""
        # Each distinct instruction of the batch is decoded and looked up once (a batch of one
        # robot, or a training batch, holds few); the embeddings are CPU tensors of the shared encoder.
        distinct, row = torch.unique(instruction, dim=0, return_inverse=True)
        texts = [decode_instruction(r) for r in distinct.cpu().numpy()]
        if self.text_encoder == "minilm":
            emb = self.sentence.embed(texts).unsqueeze(1)  # (N, 1, dim)
        else:
            emb = self.sentence.embed_tokens(texts, self.n_text_tokens)  # (N, tokens, dim)
        if self.text_scale != 1.0:  # on the distinct instructions, before they are spread over the batch
            emb = emb * self.text_scale
        return self.text_proj(emb.to(self.text_proj.weight.device)[row])

    @property
    def host_step(self) -> str | None:
        """Why part of this encoder runs on the host, outside captured or exported graphs (None: none does)."""
        if self.sentence is None:
            return None
        return (f"policy.vla.text_encoder={self.text_encoder} looks each instruction's frozen MiniLM embedding up on "
                "the host (its tokenizer and cache are Python)")

    def external_weights(self) -> dict[str, PackageWeights]:
        """The pretrained weights this encoder runs but does not store."""
        return {} if self.sentence is None else {"text_encoder": self.sentence.pin}


class VisionLanguageAction(DiffusionPolicy):
    """A DiffusionPolicy whose conditioning is the vision-language prefix (see the module docstring)."""

    def __init__(self, cfg: PolicyConfig, obs_spec: dict[str, ArraySpec], obs_keys: Sequence[str], action_dim: int,
                 normalizer: Normalizer, task: str = ""):
        super().__init__(cfg, obs_spec, obs_keys, action_dim, normalizer, task,
                         encoder=PrefixEncoder(obs_spec, obs_keys, cfg))

    def identity(self) -> dict:
        identity = super().identity()
        vla = identity["config"]["vla"]
        if not vla["unit_text_features"]:  # hashes from before this option stay valid
            del vla["unit_text_features"]
        if vla["text_encoder"] == "bytes":  # hashes of VLAs from before text encoders existed stay valid
            del vla["text_encoder"]
        else:  # the frozen weights decide the outputs too, and are not in the state dict
            identity["external_weights"] = {k: p.to_dict() for k, p in self.external_weights().items()}
        return identity

    def external_weights(self) -> dict[str, PackageWeights]:
        return self.encoder.external_weights()

    @property
    def host_step(self) -> str | None:
        return self.encoder.host_step
