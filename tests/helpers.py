"""Shared test fixtures: tiny policies built without a dataset."""

from __future__ import annotations

import numpy as np

from polcache.config import PolicyConfig, SamplerConfig
from polcache.data import Normalizer
from polcache.policy import ArraySpec, DiffusionPolicy


def tiny_policy(n_layers: int = 2, width: int = 32, obs_dim: int = 5, action_dim: int = 3, seed: int = 0,
                image: bool = False, **kw) -> DiffusionPolicy:
    import torch

    torch.manual_seed(seed)
    cfg = PolicyConfig(n_layers=n_layers, width=width, n_heads=4, state_hidden=16,
                       sampler=SamplerConfig(kind="ddim", inference_steps=8), **kw)
    rng = np.random.default_rng(seed)
    spec = {"state": ArraySpec((obs_dim,), "float32")}
    keys = ["state"]
    if image:
        spec["image_cam"] = ArraySpec((24, 24, 3), "uint8")
        keys.append("image_cam")
    norm = Normalizer.fit({"state": rng.normal(size=(50, obs_dim)), "action": rng.uniform(-2, 2, (50, action_dim))})
    return DiffusionPolicy(cfg, spec, keys, action_dim, norm, task="test").eval()
