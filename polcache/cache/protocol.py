"""What the cache layer needs of a policy, whatever its family.

Calibration, `solve_acs`, Bubbling Union, schedules, plans, heatmaps and model hashes speak only
to this protocol, never to a model class: a DP-T denoiser and a VLA's flow-matching action expert
(polcache.policy.vla) both satisfy it, and so would any other family whose step function walks
named residual blocks following a plan row.

- `cache_blocks`: the blocks in execution order, each with a `name`, a `layer` index and a `kind`
  (sa | ca | ffn: self-attention, cross-attention to the per-chunk memory, feed-forward).
  Bubbling Union's rule is stated on these kinds: when an attention block of layer l is
  recomputed at a step, every FFN block at layer >= l is recomputed at that step too.
- `encode(obs)`: the per-chunk context (features or prefix tokens) computed once per chunk.
- `initial_noise` / `denoise`: the step function applied K times from a start and noise,
  each step following one plan row (COMPUTE/REUSE/FORECAST/GATE per block), with an optional
  `DeltaStore` that observes every computed delta (calibration) or counts evaluations.
- `sampler(kind, steps)`: the coefficient loop the steps run under.
- `identity()`: what besides the weights decides the outputs (config, keys, action size), for
  the model hash that ties a schedule to one model.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch

from polcache.policy.executor import DeltaStore
from polcache.policy.samplers import Sampler


class CacheBlock(Protocol):
    name: str
    layer: int
    kind: str


@runtime_checkable
class CacheTarget(Protocol):
    @property
    def cache_blocks(self) -> Sequence[CacheBlock]: ...

    def identity(self) -> dict[str, Any]: ...

    def sampler(self, kind: str | None = None, steps: int | None = None) -> Sampler: ...

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def initial_noise(self, batch: int, sampler: Sampler, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def denoise(self, features: torch.Tensor, sampler: Sampler, x: torch.Tensor, noise: torch.Tensor | None,
                plan: Sequence[Sequence[int]] | None = None, store: DeltaStore | None = None) -> torch.Tensor: ...

    def sample(self, features: torch.Tensor, sampler: Sampler, plan: Sequence[Sequence[int]] | None = None,
               generator: torch.Generator | None = None, store: DeltaStore | None = None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...
