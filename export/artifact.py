"""What every backend of an exported artifact shares, whatever runs its graphs (ONNX Runtime,
TensorRT): the manifest and policy spec, observation and start-noise checks, the numpy action
decode, seeded noise, and `predict` and `predict_sessions` (several robots in one graph run) on top
of the runtime's own `sample`. Needs no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from polcache.errors import ExportError, ObservationError
from polcache.export.manifest import Manifest, read_manifest
from polcache.policy.batching import Outcome, SessionRequest, predict_shared
from polcache.policy.ops import COMPUTE, OP_LIST, REUSE
from polcache.policy.parity import PROBES, chunk_deviation
from polcache.policy.spec import (RTC_NEEDS, CommittedActions, PolicySpec, StatelessSession, check_seed,
                                  finite_actions)


class ExportedBackend:
    """Base of OrtBackend and TrtBackend; subclasses implement `sample` and set `kind`."""

    kind = "exported"
    batch_blocker: str | None = None  # every exported graph takes a batch axis: robots share a run
    rtc_blocker: str | None = f"{RTC_NEEDS}: exported graphs run the sampler's steps without its gradient"
    max_batch: int | None = None  # the most rows one run takes (a TensorRT engine's profile), None: any

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
        seed = check_seed(seed)
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
            gen.manual_seed(seed)
        x = torch.randn(shape, generator=gen).numpy()
        noise = torch.randn((self.K, *shape), generator=gen).numpy() if self.needs_noise else None
        return x, noise

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """See PolicyBackend.predict; exported policies do not self-verify (`past_actions` unused)
        and cannot chunk in real time (`committed` raises ValueError: `rtc_blocker` says why)."""
        if committed is not None:
            raise ValueError(self.rtc_blocker)
        feeds, batch = self.spec.check_observations(obs)
        x, noise = self.initial_noise(batch, seed)  # sample() checks again, but finds nothing left to convert
        return finite_actions(np.ascontiguousarray(self.decode(self.sample(feeds, x, noise))["action"]))

    def predict_sessions(self, requests: Sequence[SessionRequest]) -> list[Outcome]:
        """Each robot's chunk (see polcache.policy.batching): every row's observations are checked on
        their own, then the rows run through the graphs together, each from its own seed's noise,
        so a row's chunk is the one its own `predict` gives."""
        return predict_shared(requests, self._shares, self._row_feeds, self._sample_rows, self.max_batch)

    def _shares(self, request: SessionRequest) -> bool:
        """Whether a request's row can run with others (not one asking for real-time chunking, which
        its own session refuses with the reason, nor another backend's session)."""
        return (isinstance(request.session, StatelessSession) and request.session.backend is self
                and request.committed is None)

    def _row_feeds(self, request: SessionRequest) -> dict[str, np.ndarray]:
        """One robot's checked observations, batch 1."""
        feeds, batch = self.spec.check_observations(request.obs)
        if batch != 1:
            raise ObservationError(f"a session predicts for one robot: batch 1, got {batch}")
        return feeds

    def _sample_rows(self, rows: list[dict[str, np.ndarray]], seeds: list[int | None]) -> np.ndarray:
        """Checked rows sampled in one run of the graphs, row i from `seeds[i]`'s noise."""
        draws = [self.initial_noise(1, seed) for seed in seeds]
        x = np.concatenate([d[0] for d in draws])
        noise = np.concatenate([d[1] for d in draws], axis=1) if self.needs_noise else None
        obs = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
        return np.ascontiguousarray(self.decode(self.sample(obs, x, noise))["action"])

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

    def session(self) -> StatelessSession:
        """A robot's session: exported policies keep nothing between chunks."""
        return StatelessSession(self)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """One chunk per batch size, up to the most one run takes (`predict_sessions` splits larger)."""
        for size in sorted({min(s, self.max_batch or s) for s in batch_sizes}):
            self.predict(self.spec.placeholder_observations(size), seed=0)

    def describe(self) -> dict:
        m = self.manifest
        cache = m.cache.get("summary")
        if cache is not None and m.cache.get("table") is not None:  # the table itself, as the torch backend gives it
            cache = cache | {"plan": [[COMPUTE if c else REUSE for c in row] for row in m.cache["table"]],
                             "ops": OP_LIST,
                             "block_names": m.model.get("block_names")}
        return {"backend": self.kind, "sampler": m.sampler["kind"], "steps": self.K, "cache": cache,
                "cache_spec": m.cache.get("spec"), "artifact": str(self.artifact), "step_mode": m.step_mode}
