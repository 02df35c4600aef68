"""Several robots' chunks from one backend call.

A server with several robots waiting can answer them with one batched inference instead of one
call each: on CPU a batch of B windows costs far less than B calls (the weights are read once),
on a GPU the per-call launch cost is paid once. What a robot's session keeps between chunks (its
embedding ring, its executed actions) stays its own: each session prepares its own row, and the
backend samples the rows together. A backend opts in by implementing `BatchingBackend`; any
other backend, and any row its backend cannot share (e.g. one that self-verifies), is computed
with one call per robot, with the same results.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np

from polcache.errors import InferenceError
from polcache.policy.spec import NON_FINITE_ACTIONS, CommittedActions, PolicyBackend, PolicySession, check_seed


class SessionRequest(NamedTuple):
    """One robot's share of a batched inference: the `PolicySession.predict` arguments a server
    passes (rows with real-time chunking's committed actions run alone: one gradient per step)."""

    session: PolicySession
    obs: dict[str, np.ndarray]  # (1, n_obs_steps, ...)
    seqs: Sequence[int]
    seed: int | None = None  # the row's own noise: a row gets the same chunk batched or alone
    past_actions: np.ndarray | None = None
    committed: CommittedActions | None = None


Outcome = np.ndarray | Exception  # (1, n_action_steps, action_dim), or why this row failed


@runtime_checkable
class BatchingBackend(Protocol):
    """A backend that computes several sessions' chunks in one call."""

    batch_blocker: str | None  # why it cannot batch at all (e.g. a data-dependent cache plan), or None

    def predict_sessions(self, requests: Sequence[SessionRequest]) -> list[Outcome]:
        """One outcome per request, in order; a failing row does not fail the others. Each row's
        chunk equals its session's own `predict` with the same seed (to float rounding)."""
        ...


def batching_blocker(backend: PolicyBackend) -> str | None:
    """Why `backend` computes one robot per call, or None when it batches."""
    if not isinstance(backend, BatchingBackend):
        return f"{type(backend).__name__} predicts one robot per call"
    return backend.batch_blocker


def session_predictor(backend: PolicyBackend) -> Callable[[Sequence[SessionRequest]], list[Outcome]]:
    """What computes several requests' chunks on `backend`: its batched path where it has one,
    else one call per robot. Chosen once (a Protocol isinstance check costs ~10 us a call)."""
    return backend.predict_sessions if batching_blocker(backend) is None else predict_each


Row = TypeVar("Row")  # what a backend prepares per robot before the shared call (features, checked arrays)


def predict_shared(requests: Sequence[SessionRequest], shares: Callable[[SessionRequest], bool],
                   prepare: Callable[[SessionRequest], Row],
                   run: Callable[[list[Row], list[int | None]], np.ndarray],
                   max_rows: int | None = None) -> list[Outcome]:
    """A backend's `predict_sessions` from its three parts: rows that `shares` refuses go alone
    (`predict_alone`); each other row is `prepare`d on its own, so one robot's bad input fails only
    that robot; the prepared rows then go to `run` (prepared rows, their seeds -> actions (n,
    n_action_steps, action_dim)) together, at most `max_rows` per call, and a failing call fails
    only its own rows."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    shared: list[int] = []
    rows: list[Row] = []
    for i, r in enumerate(requests):
        try:
            if not shares(r):
                outcomes[i] = predict_alone(r)
                continue
            check_seed(r.seed)  # a bad seed fails its own row here, not the shared call
            rows.append(prepare(r))
            shared.append(i)
        except Exception as exc:  # noqa: BLE001 - this row's input is bad, the others still run
            outcomes[i] = exc
    step = max_rows or len(shared) or 1
    for start in range(0, len(shared), step):
        group = shared[start:start + step]
        try:
            actions = run(rows[start:start + step], [requests[i].seed for i in group])
            for row, i in enumerate(group):  # a row gone NaN (e.g. its robot's absurd input) fails alone
                row_actions = actions[row:row + 1]
                outcomes[i] = row_actions if np.isfinite(row_actions).all() else InferenceError(NON_FINITE_ACTIONS)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: every row of this call learns why
            for i in group:
                outcomes[i] = exc
    return outcomes


def predict_each(requests: Sequence[SessionRequest]) -> list[Outcome]:
    """Each request's chunk through its own session, one call per robot."""
    return [predict_alone(r) for r in requests]


def predict_alone(request: SessionRequest) -> Outcome:
    """One robot's chunk through its own session, its failure returned rather than raised."""
    try:
        return request.session.predict(request.obs, request.seqs, seed=request.seed,
                                       past_actions=request.past_actions, committed=request.committed)
    except Exception as exc:  # noqa: BLE001 - a failing row is reported to its robot only
        return exc
