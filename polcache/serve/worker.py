"""Inference on its own thread, so the server keeps answering heartbeats and draining
observations while the policy computes; results come back through a queue plus a wake-up
message on an inproc socket the server polls alongside the network. Each hand-off is one thread
wake-up (SimpleQueue is a bare C lock, unlike queue.Queue's Condition): on a busy machine each
wake-up may wait for a core, and these two are what the server adds to a bare REQ/REP round
trip's wake-ups (BENCHMARKS.md, transport); so a policy faster than that runs on the server's
own thread instead (`infer`, the server's inline path).

The server hands over a batch: the jobs of every robot it serves at once. They run as one
backend call where the backend batches (polcache.policy.batching), and each job's result stands
alone: a row that fails is that robot's error, the others' chunks still go out."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from polcache.errors import PolcacheError
from polcache.policy.batching import SessionRequest, session_predictor
from polcache.policy.spec import CommittedActions, PolicyBackend, PolicySession, finite_actions

log = logging.getLogger("polcache.serve")
LABEL_CHARS = 64  # of a robot's name in log lines


@dataclass(slots=True)
class Job:
    robot: bytes  # session identity
    name: str  # the robot's handshake name, for the log
    epoch: int
    generation: int  # the session's (Session.generation) when dispatched: replied to only if still current
    seq: int
    obs_seqs: list[int]  # history steps in `obs`, oldest first
    t_capture: float  # robot clock
    received: float  # server perf_counter at receipt
    obs: dict[str, np.ndarray]  # (1, n_obs_steps, ...)
    session: PolicySession  # the robot's policy session (its per-robot state)
    reset_session: bool  # first request of a new epoch
    queue_depth: int  # robots waiting when this job was dispatched
    batch_size: int  # robots whose chunks this job's inference computed together
    superseded: int  # older observations it replaced
    past_actions: np.ndarray | None = None  # executed at the past frames' steps (protocol v2), if known
    committed: CommittedActions | None = None  # real-time chunking: the robot's planned actions from now on
    timing: dict[str, float] = field(default_factory=dict)  # stages so far, ms
    # the outcome, filled by `InferenceWorker.infer`: the chunk's actions, or why there are none
    actions: np.ndarray | None = None  # (n_action_steps, action_dim) float32
    error: str | None = None


def robot_label(name: str, robot: bytes) -> str:
    """A robot in the server's log: its handshake name (cut short: a name may be 4096 characters, and
    it is in every line about the robot), which several robots may share, and its session (the
    connection's routing id), which tells them apart."""
    shown = name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS] + "..."
    return f"{shown or '(unnamed)'} (session {robot.hex()})"


class InferenceWorker:
    def __init__(self, backend: PolicyBackend, context: zmq.Context, wake_endpoint: str,
                 simulated_latency_s: float = 0.0):
        """`simulated_latency_s`: added to every inference, as a slower computer would take (a test
        aid: real-time chunking and chunk blending compared under latency on a fast machine)."""
        self.backend = backend
        self.simulated_latency_s = simulated_latency_s
        self._chunk_shape = (1, backend.spec.n_action_steps, backend.spec.action_dim)  # what one row's predict returns
        self._predict = session_predictor(backend)
        self._jobs: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()  # at most one batch waits
        self.done: queue.SimpleQueue[list[Job]] = queue.SimpleQueue()  # a batch's jobs, answered, then a wake-up
        self._wake = context.socket(zmq.PAIR)
        self._wake.connect(wake_endpoint)
        self._traced: set[type] = set()  # exception types whose traceback was logged (the first of each)
        self._thread = threading.Thread(target=self._run, name="polcache-inference", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Hand over one batch; the server submits only when the previous results came back."""
        self._jobs.put(jobs)

    def close(self, timeout_s: float) -> bool:
        """Stop the worker once its inference under way (if any) ends; False if it did not within
        `timeout_s` (a hung device): it is left running, its socket open, so the context cannot end."""
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        # The socket is closed here, by the thread that sends on it: closed by the server after a join that
        # timed out, it could be in the middle of the send of an inference that ended just then.
        try:
            while (jobs := self._jobs.get()) is not None:
                self.done.put(self.infer(jobs))
                self._wake.send(b"")
        finally:
            self._wake.close(linger=0)

    def infer(self, jobs: list[Job]) -> list[Job]:
        """The jobs, each with its actions or its error; every chunk's `inference` time is the
        shared call's. Runs on the worker thread, or on the caller's while the worker is idle (the
        server's inline path)."""
        ready = []
        for job in jobs:
            try:
                if job.reset_session:  # here, in the inference thread: never while the session predicts
                    job.session.reset()
                ready.append(job)
            except Exception as exc:  # noqa: BLE001 - a failing policy must not take the server down
                self._fail(job, exc)
        t0 = time.perf_counter()
        try:
            requests = [SessionRequest(job.session, job.obs, job.obs_seqs, past_actions=job.past_actions,
                                       committed=job.committed) for job in ready]
            outcomes = list(self._predict(requests))
        except Exception as exc:  # noqa: BLE001 - a backend that raised for the whole batch
            outcomes = [exc] * len(ready)
        if len(outcomes) != len(ready):  # a backend written elsewhere: no row may go unanswered or mismatched
            outcomes = [RuntimeError(f"the backend returned {len(outcomes)} results for a batch of {len(ready)} "
                                     f"observation{'s' if len(ready) > 1 else ''}")] * len(ready)
        if self.simulated_latency_s:
            time.sleep(self.simulated_latency_s)
        inference_ms = (time.perf_counter() - t0) * 1e3
        for job, outcome in zip(ready, outcomes):
            t1 = time.perf_counter()
            try:
                job.actions = self._checked(outcome)
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)
                continue
            job.timing["inference"] = inference_ms
            job.timing["postprocess"] = (time.perf_counter() - t1) * 1e3
        return jobs

    def _checked(self, outcome: np.ndarray | Exception) -> np.ndarray:
        """One row's actions (n_action_steps, action_dim), or the reason it has none raised."""
        if isinstance(outcome, Exception):
            raise outcome
        actions = np.asarray(outcome, dtype=np.float32)
        if actions.shape != self._chunk_shape:
            raise ValueError(f"policy returned actions of shape {actions.shape}, expected {self._chunk_shape}")
        return finite_actions(actions)[0]

    def _fail(self, job: Job, exc: Exception) -> None:
        """The robot's refusal (logged by the server) says what failed; a bug in the policy or backend
        (a TypeError, an AttributeError) is logged here too, with its traceback, once per type."""
        if not isinstance(exc, (PolcacheError, ValueError)) and type(exc) not in self._traced:
            self._traced.add(type(exc))
            log.error("inference failed for observation %d (epoch %d) of %s: %s", job.seq, job.epoch,
                      robot_label(job.name, job.robot), exc, exc_info=exc)
        job.error = str(exc) if isinstance(exc, PolcacheError) else f"{type(exc).__name__}: {exc}"  # ours say it all
