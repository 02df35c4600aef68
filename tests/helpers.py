"""Shared test fixtures: tiny policies built without a dataset."""

from __future__ import annotations

import numpy as np

from polcache.config import PolicyConfig, SamplerConfig
from polcache.data import Normalizer
from polcache.policy import ArraySpec, DiffusionPolicy


def tiny_policy(n_layers: int = 2, width: int = 32, obs_dim: int = 5, action_dim: int = 3, seed: int = 0,
                image: bool = False, normalizer: Normalizer | None = None, **kw) -> DiffusionPolicy:
    """`normalizer`: the statistics of the data it stands for (default: fitted on random numbers)."""
    import torch

    torch.manual_seed(seed)
    kind = "flow" if kw.get("objective") == "flow" else "ddim"  # a sampler that reads the denoiser's output
    cfg = PolicyConfig(n_layers=n_layers, width=width, n_heads=4, state_hidden=16,
                       sampler=SamplerConfig(kind=kind, inference_steps=8), **kw)
    rng = np.random.default_rng(seed)
    spec = {"state": ArraySpec((obs_dim,), "float32")}
    keys = ["state"]
    if image:
        spec["image_cam"] = ArraySpec((24, 24, 3), "uint8")
        keys.append("image_cam")
    norm = normalizer or Normalizer.fit({"state": rng.normal(size=(50, obs_dim)),
                                         "action": rng.uniform(-2, 2, (50, action_dim))})
    return DiffusionPolicy(cfg, spec, keys, action_dim, norm, task="test").eval()


def tiny_vla(n_layers: int = 2, width: int = 32, obs_dim: int = 5, action_dim: int = 3, seed: int = 0,
             image: bool = False, n_obs_steps: int = 2, instruction_bytes: int = 16, text_encoder: str = "bytes",
             unit_text_features: bool = False):
    """A small VLA (policy.family vla): flow matching, 4 Euler steps, optional camera."""
    import torch

    from polcache.config import VLAConfig
    from polcache.policy.families import build_policy

    torch.manual_seed(seed)
    cfg = PolicyConfig(family="vla", n_layers=n_layers, width=width, n_heads=4, n_obs_steps=n_obs_steps,
                       objective="flow", sampler=SamplerConfig(kind="flow", inference_steps=4, clip_sample=False),
                       vla=VLAConfig(width=16, layers=1, heads=2, image_grid=2, instruction_bytes=instruction_bytes,
                                     bytes_per_token=4, text_encoder=text_encoder,
                                     unit_text_features=unit_text_features))
    cfg.image.channels = 8
    rng = np.random.default_rng(seed)
    spec = {"state": ArraySpec((obs_dim,), "float32"), "instruction": ArraySpec((instruction_bytes,), "uint8")}
    keys = ["state", "instruction"]
    if image:
        spec["image_cam"] = ArraySpec((24, 24, 3), "uint8")
        keys.insert(1, "image_cam")
    norm = Normalizer.fit({"state": rng.normal(size=(50, obs_dim)), "action": rng.uniform(-2, 2, (50, action_dim))})
    return build_policy(cfg, spec, keys, action_dim, norm, task="test").eval()


def vla_observations(policy, texts, seed: int = 0) -> dict:
    """A batch of observation windows for `tiny_vla`, one per instruction text."""
    import torch

    from polcache.policy.language import encode_instruction

    gen = torch.Generator().manual_seed(seed)
    B, To = len(texts), policy.spec.n_obs_steps
    obs = {}
    for key, spec in policy.spec.obs.items():
        if key == "instruction":
            rows = np.stack([encode_instruction(t, spec.shape[0]) for t in texts])
            obs[key] = torch.from_numpy(np.repeat(rows[:, None], To, axis=1))
        elif key == "state":
            obs[key] = torch.randn((B, To, *spec.shape), generator=gen)
        else:
            obs[key] = torch.randint(0, 256, (B, To, *spec.shape), generator=gen, dtype=torch.uint8)
    return obs
