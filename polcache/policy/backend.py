"""The torch backend: a checkpoint behind the backend-agnostic `PolicyBackend` interface."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from polcache.config import past_tokens
from polcache.errors import ConfigError, ObservationError
from polcache.policy.batching import Outcome, SessionRequest, predict_shared
from polcache.policy.executor import decided_at_run_time, make_store
from polcache.policy.loader import check_options
from polcache.policy.graph import ChunkGraph, GuidedChunkGraph, graph_blocker
from polcache.policy.ops import OP_LIST
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.parity import DEFAULT_TOLERANCE, check_parity
from polcache.policy.precision import action_deviation, parse_precision, probe_observations, reduced_copy
from polcache.policy.residual_norm import add_norm_triton, triton_blocker
from polcache.policy.session import TorchSession
from polcache.policy.rtc import guided_denoise, overlap_weights, require_flow
from polcache.policy.spec import (RTC_NEEDS, CommittedActions, PolicySession, PolicySpec, StatelessSession,
                                  check_seed, finite_actions)

log = logging.getLogger(__name__)


def _reason(exc: Exception) -> str:
    """An exception as one line for a log or `describe()`: its type and its message's first line."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class TorchBackend:
    """Runs a DiffusionPolicy with a chosen sampler, step count, (optional) cache plan, device and
    denoiser precision.

    On CUDA every chunk with a static plan replays a CUDA graph captured per batch size at its
    first call (`warmup` captures ahead of serving); `graphs=False` or a run-time-decided plan
    (threshold cache) runs eager, and `describe()` says which and why. Inside a graph the sampler
    update is one compiled kernel (`fused_update`, default: with graphs; measured 2-9% faster
    chunks on an H100), falling back to the plain update, with the reason logged, where
    torch.compile fails; and each residual add is fused with the next LayerNorm in one Triton kernel
    (`fused_norm`, default: with graphs where Triton is installed; 4-17% faster chunks on an H200).
    A bf16/fp16 denoiser passes the parity gate of polcache.policy.precision before it serves.

    Several robots' sessions share one sampling call (`predict_sessions`): each row draws its noise
    from its own seed, so it gets the chunk it would get alone. Rows that self-verify run alone
    (their N candidates are a batch already), and a threshold cache turns batching off (its
    compute-or-reuse decision would be taken over the whole batch, coupling the robots)."""

    def __init__(self, policy: DiffusionPolicy, sampler: str | None = None, steps: int | None = None,
                 plan: Sequence[Sequence[int]] | None = None, device: str | torch.device = "cpu",
                 precision: str = "fp32", graphs: bool = True, precision_tolerance: float = DEFAULT_TOLERANCE,
                 fused_update: bool | None = None, candidates: int = 1, min_verified: int | None = None,
                 fused_norm: bool | None = None):
        check_options(steps, precision_tolerance=precision_tolerance, candidates=candidates, min_verified=min_verified)
        self.device = torch.device(device)
        policy = policy.to(self.device).eval()
        self.sampler = policy.sampler(sampler, steps)
        if plan is not None and len(plan) != self.sampler.num_steps:
            raise ValueError(f"cache plan has {len(plan)} steps but the sampler runs {self.sampler.num_steps}")
        self.plan = plan
        self.spec: PolicySpec = policy.spec
        self.precision = precision
        self.parity = None
        dtype = parse_precision(precision)
        if dtype != torch.float32:
            low = reduced_copy(policy, dtype)
            self.parity = action_deviation(policy, low, self.sampler, plan, probe_observations(policy, device=self.device))
            check_parity(self.parity, f"{precision} denoiser", precision_tolerance)
            policy = low
        self.policy = policy
        self.candidates = candidates  # > 1: self-verification when predict gets the executed past actions
        past = policy.spec.n_obs_steps - 1
        # the past tokens the training loss supervised, most recent first (policy.past_loss): only they are scored
        self.trained_past = past_tokens(policy.cfg)
        if candidates > 1 and self.trained_past == 0:
            why = ("it observes one frame: it has no past action tokens" if past == 0 else
                   f"it was trained with policy.past_loss={policy.cfg.past_loss}: its past action tokens were never "
                   f"learned")
            raise ConfigError(f"--verify {candidates}: self-verification scores candidates by their predicted past "
                              f"actions, and {why} (a Past-Token Prediction policy has them)")
        if min_verified is not None and not 1 <= min_verified <= max(self.trained_past, 1):
            raise ConfigError(f"--verify-min-past must be in 1..{self.trained_past} (the policy's past action tokens "
                              f"its loss trained, policy.past_loss={policy.cfg.past_loss}), got {min_verified}")
        # trained past tokens that must have been executed before candidates are scored (default: all, the paper's rule)
        self.min_verified = self.trained_past if min_verified is None else min_verified
        self.verified_chunks = 0  # chosen by self-verification so far: none where no chunk had enough past steps
        self.graph_blocker = graph_blocker(self.device, plan, policy.host_step) if graphs else "turned off"
        if fused_update if fused_update is not None else self.graph_blocker is None:
            self.sampler = self.sampler.fused()
        # each residual add fused with the next LayerNorm in one Triton kernel (polcache.policy.residual_norm);
        # default: with graphs (4-17% faster chunks on an H200), not eager (Triton's launch costs more there)
        use_norm = fused_norm if fused_norm is not None else self.graph_blocker is None
        self.norm_blocker = triton_blocker(self.device) if use_norm else "turned off"
        if fused_norm and self.norm_blocker is not None:
            log.warning("fused add+norm unavailable: %s; running the plain adds and LayerNorms", self.norm_blocker)
        self.add_norm = add_norm_triton if self.norm_blocker is None else None
        self._graphs: dict[tuple[int, bool], ChunkGraph] = {}  # per (batch size, from features)
        self._guided_graph: GuidedChunkGraph | None = None  # real-time chunking, captured at its first chunk
        self.rtc_graph_blocker = self.graph_blocker  # set to the reason where capturing it fails
        self.dynamic = decided_at_run_time(plan)
        self.batch_blocker = ("the threshold cache decides which blocks to compute from the whole batch's data"
                              if self.dynamic else None)
        # a threshold cache's cost depends on the data: block evaluations and chunk calls so far
        self.gate_evals, self.gate_calls = 0, 0

    def _capture(self, batch: dict[str, torch.Tensor]) -> ChunkGraph:
        try:
            return ChunkGraph(self.policy, self.sampler, self.plan, batch, add_norm=self.add_norm)
        except Exception as exc:  # noqa: BLE001 - torch.compile raises many kinds (no triton, no compiler)
            if not self.sampler.is_fused:
                raise
            log.warning("compiled sampler update unavailable (%s); capturing the plain update instead", _reason(exc))
            self.sampler = self.policy.sampler(self.sampler.kind, self.sampler.num_steps)
            return ChunkGraph(self.policy, self.sampler, self.plan, batch, add_norm=self.add_norm)

    def _batch(self, obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Checked observations (PolicySpec.check_observations) as tensors on the device."""
        arrays, _ = self.spec.check_observations(obs)
        return {k: torch.as_tensor(a).to(self.device) for k, a in arrays.items()}

    def _sample(self, inputs: dict[str, torch.Tensor], x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The normalised sample (B, H, Da) from the start `x` and step `noise` (see
        DiffusionPolicy.initial_noise) for raw observations or {"features": ...}, through the
        captured graph of that batch size and input kind where graphs are on."""
        if self.graph_blocker is not None:
            with torch.no_grad():
                feats = inputs["features"] if "features" in inputs else self.policy.encode(inputs)
                if not self.dynamic:
                    return self.policy.denoise(feats, self.sampler, x, noise, self.plan, add_norm=self.add_norm)
                store = make_store(self.plan, len(self.policy.cache_blocks))
                x = self.policy.denoise(feats, self.sampler, x, noise, self.plan, store)
                self.gate_evals, self.gate_calls = self.gate_evals + store.computed, self.gate_calls + 1
                return x
        key = (x.shape[0], "features" in inputs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(inputs)
        return graph(inputs, x, noise)

    def _noise(self, size: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's start and step noise, drawn from one generator seeded with `seed`."""
        return self.policy.initial_noise(size, self.sampler, self._generator(seed), self.device)

    def _row_noise(self, seeds: Sequence[int | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's noise whose row i is what `_noise(1, seeds[i])` draws: rows batched together
        sample what each would alone."""
        rows = [self._noise(1, seed) for seed in seeds]
        x = torch.cat([r[0] for r in rows])
        noise = None if rows[0][1] is None else torch.cat([r[1] for r in rows], dim=1)
        return x, noise

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """See PolicyBackend.predict: obs[key] (B, n_obs_steps, *shape) -> actions (B, n_action_steps,
        action_dim) float32; `seed` makes the chunk reproducible (the same seed, the same noise)."""
        batch = self._batch(obs)
        if committed is not None or (self.candidates > 1 and past_actions is not None):
            with torch.no_grad():
                feats = self.policy.encode(batch)
            return self.predict_features(feats, seed, past_actions, committed)
        return finite_actions(self._actions(self._sample(batch, *self._noise(next(iter(batch.values())).shape[0], seed))))

    def predict_features(self, feats: torch.Tensor, seed: int | None = None,
                         past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """`predict` from encoded observations (B, To, F): what sessions with an embedding ring
        buffer call, and where self-verification and real-time chunking happen."""
        if committed is not None:
            actions = self._actions(self._chunked(feats, committed, self._generator(seed)))
        elif self._verifies(past_actions):
            actions = self._verified(feats, np.asarray(past_actions, dtype=np.float32), self._generator(seed))
            self.verified_chunks += 1
        else:
            actions = self._actions(self._sample({"features": feats}, *self._noise(feats.shape[0], seed)))
        return finite_actions(actions)

    def predict_sessions(self, requests: Sequence[SessionRequest]) -> list[Outcome]:
        """Each robot's chunk (see polcache.policy.batching): every row is encoded on its own (a
        ring-buffer session keeps its frames), then the rows that can share it sample in one call."""
        return predict_shared(requests, self._shares, self._row_features, self._sample_rows)

    def _shares(self, request: SessionRequest) -> bool:
        """Whether this request's row can sample with others (not one that self-verifies or chunks
        in real time, nor another backend's session)."""
        return (self.batch_blocker is None and isinstance(request.session, (TorchSession, StatelessSession))
                and request.session.backend is self and not self._verifies(request.past_actions)
                and request.committed is None)

    def _sample_rows(self, feats: list[torch.Tensor], seeds: list[int | None]) -> np.ndarray:
        """Encoded rows sampled together, row i from `seeds[i]`'s noise."""
        return self._actions(self._sample({"features": torch.cat(feats)}, *self._row_noise(seeds)))

    def _row_features(self, request: SessionRequest) -> torch.Tensor:
        """One robot's encoded window (1, To, F), through its session's ring buffer where it has one."""
        if isinstance(request.session, TorchSession):
            return request.session.features(request.obs, request.seqs)
        batch = self._batch(request.obs)
        if next(iter(batch.values())).shape[0] != 1:
            raise ObservationError(f"a session predicts for one robot: batch 1, got {next(iter(batch.values())).shape[0]}")
        with torch.no_grad():
            return self.policy.encode(batch)

    def _verifies(self, past_actions: np.ndarray | None) -> bool:
        """Whether a chunk with these executed past actions is chosen by self-verification."""
        if self.candidates == 1 or past_actions is None:
            return False
        past = np.asarray(past_actions, dtype=np.float32)
        want = (self.spec.n_obs_steps - 1, self.spec.action_dim)
        if past.shape != want:  # checked first: a wrong shape must not quietly turn verification off
            raise ObservationError(f"past_actions: expected shape {want} (the actions executed at the past frames' "
                                   f"steps, NaN rows where none was), got {past.shape}")
        scored = past[len(past) - self.trained_past:]  # the most recent: the tokens the loss trained
        return int(np.isfinite(scored).all(axis=-1).sum()) >= self.min_verified

    def _chunked(self, feats: torch.Tensor, committed: CommittedActions, gen: torch.Generator | None) -> torch.Tensor:
        """Real-time chunking (polcache.policy.rtc): one gradient per flow step, the whole chunk
        replayed as a CUDA graph where graphs are on (eager, with the reason logged, where its
        capture fails)."""
        spec = self.spec
        require_flow(self.sampler)
        actions = np.asarray(committed.actions, dtype=np.float32)
        if feats.shape[0] != 1 or actions.ndim != 2 or actions.shape[1] != spec.action_dim:
            raise ValueError(f"real-time chunking takes one observation history and committed actions of shape "
                             f"(n, {spec.action_dim}), got batch {feats.shape[0]} and {actions.shape}")
        start = spec.n_obs_steps - 1  # token of the current step
        n = min(len(actions), spec.horizon - start)
        target = torch.zeros(1, spec.horizon, spec.action_dim, device=self.device)
        weights = torch.zeros(1, spec.horizon, 1, device=self.device)
        if n > 0:
            target[0, start:start + n] = self.policy.normalizer.normalize(
                "action", torch.as_tensor(actions[:n], device=self.device))
            weights[0, start:start + n, 0] = torch.as_tensor(overlap_weights(n, committed.delay), device=self.device)
        x, _ = self.policy.initial_noise(1, self.sampler, gen, self.device)
        if self.rtc_graph_blocker is None and self._guided_graph is None:
            try:
                self._guided_graph = GuidedChunkGraph(self.policy, self.sampler, self.plan, feats, target, weights)
            except Exception as exc:  # noqa: BLE001 - a capture failure leaves the eager path, which still works
                self.rtc_graph_blocker = f"capture failed: {_reason(exc)}"
                log.warning("real-time chunking runs eager: %s", self.rtc_graph_blocker)
        if self._guided_graph is not None:
            return self._guided_graph(feats, x, target, weights)
        return guided_denoise(self.policy, feats, self.sampler, x, self.plan, target, weights)

    def _actions(self, x: torch.Tensor) -> np.ndarray:
        """A normalised sample -> the executed actions as float32 numpy on the host."""
        return self.policy.to_actions(x)["action"].float().cpu().numpy()

    def _generator(self, seed: int | None) -> torch.Generator | None:
        seed = check_seed(seed)
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def _verified(self, feats: torch.Tensor, past_actions: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
        """Self-verification: N candidates from one encoding; the one whose predicted past action
        tokens are closest (MSE, normalised actions) to what the robot executed at those steps
        (rows of NaN: steps not executed, e.g. before the episode began, are not scored)."""
        size = feats.shape[0]
        past = self.spec.n_obs_steps - 1
        if size != 1 or past_actions.shape != (past, self.spec.action_dim):
            raise ValueError(f"self-verification takes one observation history and the {past} executed past "
                             f"actions (shape {(past, self.spec.action_dim)}), got batch {size} and "
                             f"{past_actions.shape}")
        with torch.no_grad():
            x = self._sample({"features": feats.expand(self.candidates, -1, -1)},
                             *self.policy.initial_noise(self.candidates, self.sampler, gen, self.device))
            executed = np.isfinite(past_actions).all(axis=-1)
            executed[:past - self.trained_past] = False  # tokens older than policy.past_loss=recent:k learned nothing
            known = torch.as_tensor(executed, device=self.device)
            target = self.policy.normalizer.normalize("action", torch.as_tensor(past_actions, device=self.device))
            scores = (x[:, :past][:, known].float() - target[known]).pow(2).mean(dim=(1, 2))
            best = int(torch.argmin(scores))
        return self._actions(x[best:best + 1])

    def session(self) -> PolicySession:
        """A robot's session: an embedding ring where the encoder is per frame, else stateless."""
        return TorchSession(self) if self.policy.encoder.per_frame else StatelessSession(self)

    def warmup(self, batch_sizes: Sequence[int] = (1,), rtc: bool = False) -> None:
        """Run (and on CUDA capture) one chunk per batch size, directly and through that many robot
        sessions (the path the server takes), and with `rtc` one real-time-chunking chunk, so the
        first robot request does not pay it."""
        obs = {k: v.cpu().numpy() for k, v in probe_observations(self.policy, 1).items()}
        seqs = list(range(self.spec.n_obs_steps))
        if rtc:
            committed = CommittedActions(np.zeros((self.spec.n_action_steps, self.spec.action_dim), np.float32), 1)
            self.predict(obs, seed=0, committed=committed)
        for size in batch_sizes:
            batch = probe_observations(self.policy, size)
            self.predict({k: v.cpu().numpy() for k, v in batch.items()}, seed=0)
            for outcome in self.predict_sessions([SessionRequest(self.session(), obs, seqs, 0) for _ in range(size)]):
                if isinstance(outcome, Exception):
                    raise outcome

    @property
    def rtc_blocker(self) -> str | None:
        """Why this backend cannot chunk in real time, or None: the guidance differentiates through a
        flow sampler's steps, and makes one chunk, where self-verification would choose among several."""
        if self.sampler.kind != "flow":
            return f"{RTC_NEEDS}, this is torch with {self.sampler.kind}"
        if self.candidates > 1:  # the guided chunk took precedence: none was verified
            return (f"real-time chunking generates one chunk guided toward the committed actions, self-verification "
                    f"(--verify {self.candidates}) picks one of several candidates: they do not combine, drop one of "
                    f"them")
        return None

    def describe(self) -> dict:
        cache = None
        if self.plan is not None:
            from polcache.cache import plan_summary

            cache = plan_summary(self.plan) | {  # the table itself: dashboards draw it as a heatmap
                "plan": [[int(op) for op in row] for row in self.plan], "ops": OP_LIST,
                "block_names": [b.name for b in self.policy.cache_blocks]}
            if self.dynamic:  # measured over the chunks computed so far
                cache["block_evals_mean"] = round(self.gate_evals / self.gate_calls, 1) if self.gate_calls else None
        return {"backend": "torch", "device": str(self.device), "sampler": self.sampler.kind,
                "steps": self.sampler.num_steps, "cache": cache, "precision": self.precision,
                "parity": self.parity, "cuda_graphs": self.graph_blocker is None,
                "fused_update": self.sampler.is_fused, "fused_norm": self.add_norm is not None,
                "fused_norm_off_because": self.norm_blocker, "verify_candidates": self.candidates,
                "verify_min_past": self.min_verified, "verified_chunks": self.verified_chunks,
                "cuda_graphs_off_because": self.graph_blocker, "rtc_cuda_graph": self._guided_graph is not None,
                "rtc_cuda_graph_off_because": self.rtc_graph_blocker, "batched_sessions": self.batch_blocker is None,
                "batching_off_because": self.batch_blocker}
