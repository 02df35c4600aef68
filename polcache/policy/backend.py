"""The torch backend: a checkpoint behind the backend-agnostic `PolicyBackend` interface."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from polcache.policy.checkpoint import load_policy
from polcache.policy.device import resolve_device
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.spec import PolicySpec


class TorchBackend:
    """Runs a DiffusionPolicy with a chosen sampler, step count and (optional) cache plan."""

    def __init__(self, policy: DiffusionPolicy, sampler: str | None = None, steps: int | None = None,
                 plan: Sequence[Sequence[int]] | None = None, device: str | torch.device = "cpu"):
        self.policy = policy.to(device).eval()
        self.device = torch.device(device)
        self.sampler = policy.sampler(sampler, steps)
        if plan is not None and len(plan) != self.sampler.num_steps:
            raise ValueError(f"cache plan has {len(plan)} steps but the sampler runs {self.sampler.num_steps}")
        self.plan = plan
        self.spec: PolicySpec = policy.spec

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None) -> np.ndarray:
        batch = {k: torch.as_tensor(np.asarray(obs[k])).to(self.device) for k in self.spec.obs}
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        out = self.policy.predict_action(batch, self.sampler, self.plan, gen)
        return out["action"].float().cpu().numpy()

    def reset(self) -> None:
        """DP-T keeps no state between chunks."""

    def describe(self) -> dict:
        cache = None
        if self.plan is not None:
            from polcache.cache import plan_summary

            cache = plan_summary(self.plan)
        return {"backend": "torch", "device": str(self.device), "sampler": self.sampler.kind,
                "steps": self.sampler.num_steps, "cache": cache}


def load_backend(checkpoint: str, cache: str | None = None, sampler: str | None = None, steps: int | None = None,
                 device: str = "cpu") -> TorchBackend:
    """Load a checkpoint as a backend on `device` (cpu, cuda, cuda:N, auto); `cache` names a schedule
    file or a baseline spec (see polcache.cache)."""
    device = resolve_device(device)
    policy, _, _ = load_policy(checkpoint, device)
    plan = None
    if cache:
        from polcache.cache import resolve_plan  # lazily: caching is optional for plain inference

        sampler_obj = policy.sampler(sampler, steps)
        plan = resolve_plan(cache, policy, sampler_obj)
    return TorchBackend(policy, sampler, steps, plan, device)
