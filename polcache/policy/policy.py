"""DiffusionPolicy: normalise -> encode observations -> sample an action chunk -> unnormalise.

The sampling loop is the straight line every action takes: per-chunk precomputation
(`prepare_chunk`), then K denoiser steps, each following one row of an optional cache
plan, each followed by the sampler's coefficient update.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from polcache.config import EMBEDDING_KEY as EMBEDDING
from polcache.config import SAMPLER_KINDS, PolicyConfig, check_sampler_fits, past_tokens, to_dict
from polcache.data.normalize import Normalizer
from polcache.policy.blocks import Block
from polcache.policy.denoiser import DiffusionTransformer
from polcache.policy.encoders import ObsEncoder
from polcache.policy.executor import COMPUTE, DeltaStore, Plan, StackedDeltas, fused_rows, make_store
from polcache.policy.pinned import PackageWeights
from polcache.policy.residual_norm import AddNorm, add_norm_torch
from polcache.policy.samplers import Sampler, TrainingNoise, make_sampler
from polcache.policy.spec import ArraySpec, PolicySpec


class DiffusionPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, obs_spec: dict[str, ArraySpec], obs_keys: Sequence[str], action_dim: int,
                 normalizer: Normalizer, task: str = "", encoder: nn.Module | None = None):
        """`encoder` turns an observation window into the denoiser's memory tokens (default: DP-T's
        one feature vector per observation step); it names `feature_dim`, `memory_tokens` and
        whether that memory is `causal_memory` (action token i sees memory tokens up to i)."""
        super().__init__()
        self.cfg = cfg
        self.obs_keys = list(obs_keys)
        self.action_dim = action_dim
        self.normalizer = normalizer
        self.spec = PolicySpec(
            obs={k: obs_spec[k] for k in self.obs_keys}, action_dim=action_dim, n_obs_steps=cfg.n_obs_steps,
            horizon=cfg.horizon, n_action_steps=cfg.n_action_steps, task=task, obs_stride=cfg.obs_stride,
            frame_mode=cfg.frame_mode, obs_normalizer=self._obs_normalizer(obs_spec))
        # Loss weight per action token: past tokens 0..K-2 (oldest first) count only as far as
        # policy.past_loss says; the current and future ones always do.
        weight = torch.ones(cfg.horizon)
        weight[: cfg.n_obs_steps - 1 - past_tokens(cfg)] = 0.0
        self.register_buffer("token_weight", weight, persistent=False)
        self.encoder = encoder if encoder is not None else ObsEncoder(obs_spec, self.obs_keys, cfg)
        self.denoiser = DiffusionTransformer(action_dim, self.encoder.feature_dim, cfg, self.encoder.memory_tokens,
                                             self.encoder.causal_memory)
        self.training_noise = TrainingNoise(cfg.sampler, cfg.objective)
        self._samplers: dict[tuple[str, int, torch.device], Sampler] = {}

    def _obs_normalizer(self, obs_spec: dict) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        """PolicySpec.obs_normalizer: the normaliser's scale and offset of each float observation
        it normalises (state; a PTP head's embedding), so every backend refuses the same faults."""
        out = {}
        for key in self.obs_keys:
            if key in self.normalizer and np.dtype(obs_spec[key].dtype).kind == "f":
                stats = self.normalizer.stats(key)
                out[key] = (tuple(stats["scale"].tolist()), tuple(stats["offset"].tolist()))
        return out

    # ---- what the cache layer sees (polcache.cache.protocol.CacheTarget) ---------------------
    @property
    def cache_blocks(self) -> list[Block]:
        return self.denoiser.block_list

    def identity(self) -> dict:
        """What besides the weights decides the outputs, for the model hash."""
        config = to_dict(self.cfg)
        if config["family"] == "dp-t":  # DP-T hashes from before families (and the VLA section) stay valid
            del config["family"], config["vla"]
        return {"config": config, "obs_keys": self.obs_keys, "action_dim": self.action_dim, "family": self.cfg.family}

    def external_weights(self) -> dict[str, PackageWeights]:
        """Pretrained weights the policy runs but does not store (name -> pinned package):
        checkpoints record them and loading refuses an installed package that differs."""
        return {}

    @property
    def host_step(self) -> str | None:
        """Why part of the policy runs on the host, outside a captured CUDA graph or an exported
        ONNX graph (None: nothing does)."""
        return None

    # ---- observations ---------------------------------------------------------------------
    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw observation history (B, To, ...) -> (B, To, F) features. Windows of a store from
        `polcache ptp embed` ({"embedding": (B, To, F)}) are already frame features. A head
        fine-tuned on such a store (`polcache ptp finetune`) sees them standardised per dimension
        (the checkpoint's normaliser then has an "embedding" key): a frozen encoder's feature
        scales are whatever its short training left them."""
        feats = obs["embedding"].float() if EMBEDDING in obs else self.frame_features(obs)
        if EMBEDDING in self.normalizer:  # per frame and per chunk: a dict lookup, no list built
            feats = self.normalizer.normalize(EMBEDDING, feats)
        return feats

    def frame_features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's own output for raw observations (B, To, ...) -> (B, To, F), before any
        standardisation: what `polcache ptp embed` stores."""
        obs = dict(obs)
        if "state" in obs:
            obs["state"] = self.normalizer.normalize("state", obs["state"].float())
        return self.encoder(obs)

    # ---- training ---------------------------------------------------------------------------
    def compute_loss(self, batch: dict, generator: torch.Generator | None = None, state_noise: float = 0.0) -> torch.Tensor:
        """Denoising loss; `state_noise` adds Gaussian noise of that std to the normalised state
        (an augmentation against drifting off the demonstrations' states)."""
        obs = dict(batch["obs"])
        if "state" in obs and state_noise > 0:
            state = self.normalizer.normalize("state", obs["state"].float())
            noise = torch.randn(state.shape, generator=generator, device=state.device) * state_noise
            obs["state"] = self.normalizer.unnormalize("state", state + noise)
        feats = self.encode(obs)
        x0 = self.normalizer.normalize("action", batch["action"])
        xt, t, target = self.training_noise.corrupt(x0, generator)
        err = (self.denoiser(xt, t, feats) - target).pow(2).mean(dim=-1)  # (B, H)
        return (err * self.token_weight).sum() / (self.token_weight.sum() * err.shape[0])

    def forward(self, batch: dict, state_noise: float = 0.0) -> torch.Tensor:
        """The training loss; being forward() lets DistributedDataParallel wrap the policy."""
        return self.compute_loss(batch, state_noise=state_noise)

    # ---- inference ----------------------------------------------------------------------------
    def sampler(self, kind: str | None = None, steps: int | None = None) -> Sampler:
        """The sampler `kind` (default: the config's) at `steps`, refused where it does not read what the
        denoiser was trained to predict (policy.objective): every command builds its sampler here."""
        dev = next(self.parameters()).device  # a policy moved since keeps its samplers for the old device too
        key = (kind or self.cfg.sampler.kind, int(steps or self.cfg.sampler.inference_steps), dev)
        if key not in self._samplers:
            if key[0] in SAMPLER_KINDS:  # (an unknown kind is named by make_sampler)
                check_sampler_fits(key[0], self.cfg.objective, "--sampler")
            self._samplers[key] = make_sampler(self.cfg.sampler, key[0], steps or None, "--steps").to(dev)
        return self._samplers[key]

    @torch.no_grad()
    def sample(
        self,
        features: torch.Tensor,
        sampler: Sampler,
        plan: Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
        store: DeltaStore | None = None,
    ) -> torch.Tensor:
        """Denoise one chunk in normalised action space: (B, To, F) features -> (B, H, Da).

        `plan[k]` gives each block's op at step k (None: compute everything). A `store`
        may be passed to observe the computed deltas (calibration) or count block evaluations;
        by default a plan runs with `make_store(plan)`."""
        x, noise = self.initial_noise(features.shape[0], sampler, generator, features.device)
        return self.denoise(features, sampler, x, noise, plan, store)

    def initial_noise(self, batch: int, sampler: Sampler, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The starting sample (B, H, Da) and, for stochastic samplers, every step's noise (K, B, H, Da)."""
        shape = (batch, self.cfg.horizon, self.action_dim)
        x = torch.randn(shape, generator=generator, device=device)
        noise = (torch.randn((sampler.num_steps, *shape), generator=generator, device=device)
                 if sampler.needs_noise else None)
        return x, noise

    def denoise(self, features: torch.Tensor, sampler: Sampler, x: torch.Tensor, noise: torch.Tensor | None,
                plan: Sequence[Sequence[int]] | None = None, store: DeltaStore | None = None,
                add_norm: AddNorm | None = None) -> torch.Tensor:
        """The denoising loop of `sample` from a given start and noise; not wrapped in no_grad, so
        calibration can differentiate the actions with respect to the blocks' deltas. A `Plan` of
        COMPUTE/REUSE ops runs fused (see executor.fused_rows) unless a `store` observes it.
        Free of host synchronisation for every plan without GATE ops, so a whole chunk can be
        captured as one CUDA graph. With `add_norm` (residual_norm's fused kernel) uncached steps run
        the fused path too, as the all-COMPUTE plan."""
        with torch.no_grad():  # the observation memory and K/V take no gradient
            ctx = self.denoiser.prepare_chunk(features, sampler.timesteps)
        n = len(self.denoiser.blocks)
        if plan is None and store is None and add_norm is not None:
            plan = Plan(((COMPUTE,) * n,) * sampler.num_steps, method="uncached")
        fused = fused_rows(plan) if isinstance(plan, Plan) and store is None else None
        if fused is not None:
            deltas = StackedDeltas(n)
            for k in range(sampler.num_steps):
                out = self.denoiser.step_fused(x, k, ctx, fused[k], deltas, add_norm or add_norm_torch)
                x = sampler.update(k, x, out, None if noise is None else noise[k])
            return x
        if plan is not None and store is None:
            store = make_store(plan, n)
        for k in range(sampler.num_steps):
            out = self.denoiser.step(x, k, ctx, None if plan is None else plan[k], store)
            x = sampler.update(k, x, out, None if noise is None else noise[k])
        return x

    @torch.no_grad()
    def predict_action(
        self,
        obs: dict[str, torch.Tensor],
        sampler: Sampler | None = None,
        plan: Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw observation history -> {"action": (B, n_action_steps, Da) to execute now,
        "action_pred": (B, H, Da) the whole predicted sequence}, unnormalised."""
        sampler = sampler or self.sampler()
        return self.to_actions(self.sample(self.encode(obs), sampler, plan, generator))

    def to_actions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """A normalised sample (B, H, Da) -> the unnormalised actions `predict_action` returns."""
        pred = self.normalizer.unnormalize("action", x.float())
        start = self.cfg.n_obs_steps - 1
        return {"action": pred[:, start:start + self.cfg.n_action_steps], "action_pred": pred}
