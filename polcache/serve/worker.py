"""Inference on its own thread, so the server keeps answering heartbeats and draining
observations while the policy computes; results come back through a queue plus a wake-up
message on an inproc socket the server polls alongside the network."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from polcache.policy.spec import PolicyBackend, PolicySession
from polcache_client.logs import RateLimitedLog

log = logging.getLogger("polcache.serve")


@dataclass
class Job:
    robot: bytes  # session identity
    epoch: int
    seq: int
    obs_seqs: list[int]  # history steps in `obs`, oldest first
    t_capture: float  # robot clock
    received: float  # server perf_counter at receipt
    obs: dict[str, np.ndarray]  # (1, n_obs_steps, ...)
    session: PolicySession  # the robot's policy session (its per-robot state)
    reset_session: bool  # first request of a new epoch
    queue_depth: int  # robots waiting when this job was dispatched
    superseded: int  # older observations it replaced
    past_actions: np.ndarray | None = None  # executed at the past frames' steps (protocol v2), if known
    timing: dict[str, float] = field(default_factory=dict)  # stages so far, ms


@dataclass
class Result:
    job: Job
    actions: np.ndarray | None  # (n_action_steps, action_dim) float32, or None on failure
    error: str | None


class InferenceWorker:
    def __init__(self, backend: PolicyBackend, context: zmq.Context, wake_endpoint: str):
        self.backend = backend
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._wake = context.socket(zmq.PAIR)
        self._wake.connect(wake_endpoint)
        self._warn = RateLimitedLog(log).warning
        self._thread = threading.Thread(target=self._run, name="polcache-inference", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Hand over one job; the server submits only when the previous result came back."""
        self._jobs.put_nowait(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self._wake.close(linger=0)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.results.put(self._infer(job))
            self._wake.send(b"")

    def _infer(self, job: Job) -> Result:
        spec = self.backend.spec
        try:
            if job.reset_session:  # here, in the inference thread: never while the session predicts
                job.session.reset()
            t0 = time.perf_counter()
            raw = job.session.predict(job.obs, job.obs_seqs, past_actions=job.past_actions)
            t1 = time.perf_counter()
            actions = np.asarray(raw, dtype=np.float32)
            expected = (1, spec.n_action_steps, spec.action_dim)
            if actions.shape != expected:
                raise ValueError(f"policy returned actions of shape {actions.shape}, expected {expected}")
            if not np.isfinite(actions).all():
                raise ValueError("policy produced NaN or infinite actions")
            job.timing["inference"] = (t1 - t0) * 1e3
            job.timing["postprocess"] = (time.perf_counter() - t1) * 1e3
            return Result(job, actions[0], None)
        except Exception as exc:  # a failing policy must not take the server down
            self._warn(type(exc).__name__, f"inference failed for observation {job.seq}: {exc}")
            return Result(job, None, f"{type(exc).__name__}: {exc}")
