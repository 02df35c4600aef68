"""Reduced-precision denoisers (bf16 / fp16) behind a parity gate.

Half precision halves the weight traffic and uses tensor cores, but a denoiser iterated K times
can drift: an fp16 engine of a VLA has been seen disagreeing with its fp32 original (cosine
-0.55) without any error. So a reduced-precision backend is built next to the fp32 policy and,
before it serves, both sample action chunks from the same probe observations with the same
noise; above the tolerance the backend refuses to start unless the caller raises it.

Probe observations are drawn from the training data's recorded ranges (the normaliser's
min/max per state dimension; random pixels for images), so the gate needs no dataset.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from polcache.config import INSTRUCTION_KEY
from polcache.errors import PrecisionError
from polcache.policy.parity import PROBES, chunk_deviation
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.samplers import Sampler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_precision(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PrecisionError(f"precision {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def reduced_copy(policy: DiffusionPolicy, dtype: torch.dtype) -> DiffusionPolicy:
    """A copy of `policy` whose denoiser runs in `dtype`; encoder, normaliser and sampler stay fp32."""
    low = copy.deepcopy(policy)
    low.denoiser.to(dtype)
    low.denoiser.train(False)  # drops any kept time-token K/V of the old dtype
    return low


def probe_observations(policy: DiffusionPolicy, n: int = PROBES, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """n observation histories inside the ranges the policy was trained on."""
    gen = torch.Generator().manual_seed(seed)
    obs = {}
    for key, spec in policy.spec.obs.items():
        shape = (n, policy.spec.n_obs_steps, *spec.shape)
        if key == "state":
            st = policy.normalizer.stats("state")
            u = torch.rand(shape, generator=gen)
            obs[key] = st["min"] + u * (st["max"] - st["min"])
        elif key == INSTRUCTION_KEY:  # random bytes are no text: the placeholder every warm-up gives
            obs[key] = torch.as_tensor(policy.spec.placeholder_observations(n)[key])
        else:
            obs[key] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return {k: v.to(device) for k, v in obs.items()}


@torch.no_grad()
def action_deviation(reference: DiffusionPolicy, candidate: DiffusionPolicy, sampler: Sampler,
                     plan: Sequence[Sequence[int]] | None, obs: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """polcache.policy.parity's deviation of the normalised action chunks of two policies
    sampling from the same observations and noise."""
    batch = next(iter(obs.values())).shape[0]
    device = next(iter(obs.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x, noise = reference.initial_noise(batch, sampler, gen, device)
    ref = reference.denoise(reference.encode(obs), sampler, x, noise, plan)
    low = candidate.denoise(candidate.encode(obs), sampler, x, noise, plan)
    return chunk_deviation(ref.float().cpu().numpy(), low.float().cpu().numpy())
