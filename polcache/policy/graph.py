"""Whole action chunks captured as one CUDA graph.

On a GPU a denoising step of DP-T at batch 1 is bound by kernel launches, not arithmetic:
eager torch pays the launch of every kernel of every step. Capturing the whole chunk
(observation encoding, per-chunk K/V, all K steps with their cache plan, sampler updates) once
per (plan, batch size) and replaying it removes all of that host work. What makes this
possible is that the chunk has no host synchronisation (see `DiffusionPolicy.denoise`) and a
static plan: GATE rows are decided from the data at run time, so threshold plans stay eager
(`graph_blocker` says why). Random numbers are drawn outside the graph and copied into its
static input buffers, so replays follow the caller's generator exactly as eager runs do.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from polcache.policy.executor import decided_at_run_time
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.residual_norm import AddNorm
from polcache.policy.rtc import guided_denoise
from polcache.policy.samplers import Sampler


def graph_blocker(device: torch.device, plan: Sequence[Sequence[int]] | None,
                  host_step: str | None = None) -> str | None:
    """Why a chunk cannot be captured on `device` with `plan` for a policy part of which runs on
    the host (`DiffusionPolicy.host_step`), or None when it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if host_step is not None:
        return host_step
    if decided_at_run_time(plan):
        return "the threshold cache decides which blocks to compute from the data at run time"
    return None


class _CapturedChunk:
    """A chunk computed from static input buffers, captured once as a CUDA graph.

    The time token's K/V are kept by the denoiser; they are held here so the graph's reads stay
    valid. The weights must not be replaced while the graph lives (it reads them by address)."""

    def _capture(self, policy: DiffusionPolicy, sampler: Sampler, run: Callable[[], torch.Tensor],
                 warmup: int) -> None:
        with torch.no_grad():
            self._time_kv = policy.denoiser.time_kv(sampler.timesteps)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # allocator and cuBLAS workspaces settle before capture
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()


class ChunkGraph(_CapturedChunk):
    """One captured chunk for a fixed policy, sampler, plan and batch size.

    `__call__(inputs, x, noise)` copies the inputs into the static buffers, replays the graph and
    returns the normalised sample (a static buffer: read or copy it before the next call).
    `inputs` are the raw observations, or `{"features": (B, To, F)}` for a chunk from encoded
    observations (self-verification encodes one observation and broadcasts it to N candidates)."""

    def __init__(self, policy: DiffusionPolicy, sampler: Sampler, plan: Sequence[Sequence[int]] | None,
                 inputs: dict[str, torch.Tensor], warmup: int = 2, add_norm: AddNorm | None = None):
        self.policy, self.sampler, self.plan, self.add_norm = policy, sampler, plan, add_norm
        self.obs = {k: v.detach().clone() for k, v in inputs.items()}
        first = next(iter(inputs.values()))
        self.x, self.noise = policy.initial_noise(first.shape[0], sampler, None, first.device)
        self.x.zero_()
        if self.noise is not None:
            self.noise.zero_()
        self._capture(policy, sampler, self._chunk, warmup)

    @torch.no_grad()
    def _chunk(self) -> torch.Tensor:
        feats = self.obs["features"] if "features" in self.obs else self.policy.encode(self.obs)
        return self.policy.denoise(feats, self.sampler, self.x, self.noise, self.plan, add_norm=self.add_norm)

    def __call__(self, inputs: dict[str, torch.Tensor], x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        for k, buf in self.obs.items():
            buf.copy_(inputs[k])
        self.x.copy_(x)
        if noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()
        return self.out


class GuidedChunkGraph(_CapturedChunk):
    """A real-time-chunking chunk (polcache.policy.rtc) captured whole for one robot: every flow
    step's forward pass, its vector-Jacobian product and the guided update. Eager, each step
    launches the kernels of a forward and a backward pass from Python; on a GPU at batch 1 that is
    what the chunk's time is. `__call__(features, x, target, weights)` as `guided_denoise` takes them."""

    def __init__(self, policy: DiffusionPolicy, sampler: Sampler, plan: Sequence[Sequence[int]] | None,
                 features: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, warmup: int = 2):
        self.features, self.target, self.weights = features.detach().clone(), target.clone(), weights.clone()
        self.x = torch.zeros_like(target)
        self._capture(policy, sampler, lambda: guided_denoise(policy, self.features, sampler, self.x, plan,
                                                              self.target, self.weights), warmup)

    def __call__(self, features: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        for buf, value in ((self.features, features), (self.x, x), (self.target, target), (self.weights, weights)):
            buf.copy_(value)
        self.graph.replay()
        return self.out
