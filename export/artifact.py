"""What every backend of an exported artifact shares, whatever runs its graphs (ONNX Runtime,
TensorRT): the manifest and policy spec, observation and start-noise checks, the numpy action
decode, seeded noise, and `predict` on top of the runtime's own `sample`. Needs no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from polcache.errors import ExportError
from polcache.export.manifest import Manifest, read_manifest
from polcache.policy.ops import COMPUTE, REUSE
from polcache.policy.parity import PROBES, chunk_deviation
from polcache.policy.spec import CommittedActions, PolicySpec, StatelessSession, rtc_blocker


class ExportedBackend:
    """Base of OrtBackend and TrtBackend; subclasses implement `sample` and set `kind`."""

    kind = "exported"

    def __init__(self, artifact: str | Path):
        self.artifact = Path(artifact)
        self.manifest: Manifest = read_manifest(self.artifact, verify=False)
        m = self.manifest
        self.spec: PolicySpec = m.policy_spec
        self.K = int(m.sampler["steps"])
        self.needs_noise = bool(m.sampler["needs_noise"])
        self.n_blocks, self.width = int(m.model["n_blocks"]), int(m.model["width"])
        self._scale = np.asarray(m.normalizer["action"]["scale"], dtype=np.float32)
        self._offset = np.asarray(m.normalizer["action"]["offset"], dtype=np.float32)

    def check_start(self, batch: int, x: np.ndarray, noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The initial sample (B, H, Da) and, for stochastic samplers, the per-step noise (K, B, H, Da)."""
        H, Da = self.spec.horizon, self.spec.action_dim
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (batch, H, Da):
            raise ExportError(f"initial sample: expected shape {(batch, H, Da)}, got {x.shape}")
        if not self.needs_noise:
            return x, None
        if noise is None or np.shape(noise) != (self.K, batch, H, Da):
            raise ExportError(f"{self.manifest.sampler['kind']} needs noise of shape {(self.K, batch, H, Da)}")
        return x, np.ascontiguousarray(noise, dtype=np.float32)

    def shape_of(self, graph: str, name: str, batch: int) -> tuple[int, ...]:
        """A graph output's shape from the manifest, with the batch filled in."""
        for spec in self.manifest.graphs[graph].outputs:
            if spec["name"] == name:
                return tuple(batch if d == "B" else int(d) for d in spec["shape"])
        raise ExportError(f"{self.artifact}: graph {graph!r} has no output {name!r}")

    def sample(self, obs: dict[str, np.ndarray], x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Denoise one chunk from a given start x (B, H, Da) and per-step noise (K, B, H, Da) (ignored
        by deterministic samplers; required by stochastic ones) -> the normalised sample (B, H, Da)."""
        raise NotImplementedError

    def decode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Normalised sample -> {"action": executed steps, "action_pred": whole horizon}, unnormalised
        exactly as DiffusionPolicy.predict_action."""
        pred = (np.asarray(x, dtype=np.float32) - self._offset) / self._scale
        start = self.spec.n_obs_steps - 1
        return {"action": pred[:, start:start + self.spec.n_action_steps], "action_pred": pred}

    def initial_noise(self, batch: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The start (B, H, Da) and, for stochastic samplers, every step's noise (K, B, H, Da).
        Where torch is installed these are the torch backend's own draws for the same seed (a CPU
        generator, same shapes, same order), so `--backend ort` and `--backend torch` on the same
        seeds sample the same chunks; without torch (a robot computer), numpy's default_rng(seed)."""
        shape = (batch, self.spec.horizon, self.spec.action_dim)
        try:
            import torch
        except ImportError:
            rng = np.random.default_rng(seed)
            x = rng.standard_normal(shape, dtype=np.float32)
            noise = rng.standard_normal((self.K, *shape), dtype=np.float32) if self.needs_noise else None
            return x, noise
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        x = torch.randn(shape, generator=gen).numpy()
        noise = torch.randn((self.K, *shape), generator=gen).numpy() if self.needs_noise else None
        return x, noise

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """See PolicyBackend.predict; exported policies do not self-verify (`past_actions` unused)
        and cannot chunk in real time (`committed` raises ValueError: polcache.policy.spec.rtc_blocker)."""
        if committed is not None:
            raise ValueError(rtc_blocker(self))
        feeds, batch = self.spec.check_observations(obs)
        x, noise = self.initial_noise(batch, seed)  # sample() checks again, but finds nothing left to convert
        return np.ascontiguousarray(self.decode(self.sample(feeds, x, noise))["action"])

    def deviation_from(self, reference: "ExportedBackend", probes: int = PROBES, seed: int = 0) -> dict:
        """polcache.policy.parity's deviation of the normalised chunks of this backend from `reference`'s
        on the same probe observations (standard-normal states, random pixels) and noise."""
        rng = np.random.default_rng(seed)
        obs = {}
        for key, s in self.spec.obs.items():
            shape = (probes, self.spec.n_obs_steps, *s.shape)
            obs[key] = (rng.integers(0, 256, shape, dtype=np.uint8) if np.dtype(s.dtype) == np.uint8
                        else rng.standard_normal(shape).astype(np.float32))
        x, noise = self.initial_noise(probes, seed)
        return chunk_deviation(reference.sample(obs, x, noise), self.sample(obs, x, noise))

    def reset(self) -> None:
        """DP-T keeps no state between chunks."""

    def session(self) -> StatelessSession:
        """A robot's session: exported policies keep nothing between chunks."""
        return StatelessSession(self)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for size in batch_sizes:
            obs = {key: np.zeros((size, self.spec.n_obs_steps, *s.shape), dtype=s.dtype)
                   for key, s in self.spec.obs.items()}
            self.predict(obs, seed=0)

    def describe(self) -> dict:
        m = self.manifest
        cache = m.cache.get("summary")
        if cache is not None and m.cache.get("table") is not None:  # the table itself, as the torch backend gives it
            cache = cache | {"plan": [[COMPUTE if c else REUSE for c in row] for row in m.cache["table"]],
                             "block_names": m.model.get("block_names")}
        return {"backend": self.kind, "sampler": m.sampler["kind"], "steps": self.K, "cache": cache,
                "cache_spec": m.cache.get("spec"), "artifact": str(self.artifact), "step_mode": m.step_mode}
