"""Test doubles: a synthetic clock, a numpy policy backend and a scripted robot."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import numpy as np

from polcache.policy.spec import ArraySpec, PolicySpec


class FakeClock:
    """Time moves only when the loop sleeps; `lateness` makes every wake-up late by that much."""

    def __init__(self, t: float = 100.0):
        self.t = t
        self.lateness = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t) + self.lateness

    def advance(self, dt: float) -> None:
        self.t += dt


STATE_DIM = 3
ACTION_DIM = 2


def fake_spec(n_obs_steps: int = 2, n_action_steps: int = 8, obs_stride: int = 1) -> PolicySpec:
    return PolicySpec(
        obs={"state": ArraySpec((STATE_DIM,), "float32")},
        action_dim=ACTION_DIM,
        n_obs_steps=n_obs_steps,
        horizon=16,
        n_action_steps=n_action_steps,
        task="fake",
        obs_stride=obs_stride,
    )


class FakeBackend:
    """actions[b, i] = newest state[0] + i in every dimension: an action's value says which
    control step it belongs to when the state carries the step index. Records what it saw."""

    def __init__(self, spec: PolicySpec | None = None, delay_s: float = 0.0):
        self.spec = spec or fake_spec()
        self.delay_s = delay_s
        self.calls: list[dict[str, np.ndarray]] = []  # the last 16
        self.first_obs: dict[str, np.ndarray] | None = None
        self.past: list[np.ndarray | None] = []  # past_actions of each call (the last 16)
        self.resets = 0

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None, past_actions=None) -> np.ndarray:
        self.past = [*self.past[-15:], None if past_actions is None else np.array(past_actions)]
        state = obs["state"]
        assert state.shape[1:] == (self.spec.n_obs_steps, STATE_DIM)
        self.calls.append({k: v.copy() for k, v in obs.items()})
        self.first_obs = self.first_obs or self.calls[-1]
        del self.calls[:-16]
        if self.delay_s:
            time.sleep(self.delay_s)
        steps = np.arange(self.spec.n_action_steps, dtype=np.float32)
        base = state[:, -1, 0][:, None] + steps[None, :]
        return np.repeat(base[:, :, None], self.spec.action_dim, axis=2).astype(np.float32)

    def describe(self) -> dict:
        return {"backend": "fake", "device": "cpu", "sampler": "none", "steps": 0, "cache": None}

    def warmup(self, batch_sizes=(1,)) -> None:
        pass

    def session(self):
        from polcache.policy.spec import StatelessSession

        backend = self

        class Counted(StatelessSession):
            def reset(self) -> None:  # counted on the backend: each robot's session reset at its epochs
                backend.resets += 1

        return Counted(self)


class BatchingFakeBackend(FakeBackend):
    """FakeBackend that computes several robots' chunks in one `predict` call, as TorchBackend
    does (polcache.policy.batching); a row whose newest state[0] is `fail_on` fails alone.
    `batches` holds each call's newest state[0] per row (the robots' values), oldest call first."""

    batch_blocker = None

    def __init__(self, spec: PolicySpec | None = None, delay_s: float = 0.0, fail_on: float | None = None):
        super().__init__(spec, delay_s)
        self.fail_on = fail_on
        self.batches: list[list[float]] = []

    def predict_sessions(self, requests) -> list:
        values = [float(r.obs["state"][0, -1, 0]) for r in requests]
        self.batches.append(values)
        ok = [r for r, v in zip(requests, values) if v != self.fail_on]
        actions = iter(self.predict({k: np.concatenate([r.obs[k] for r in ok]) for k in self.spec.obs}) if ok else [])
        return [ValueError(f"bad row {v:g}") if v == self.fail_on else next(actions)[None] for v in values]


class StepRobot:
    """An adapter whose state is the index of the current control period (from the clock, so
    ticks skipped under load keep the count right); with FakeBackend, the action applied in
    period n should have value n."""

    obs_spec = {"state": ((STATE_DIM,), "float32")}
    action_dim = ACTION_DIM

    def __init__(self, hz: float, clock=None):
        self.hz = hz
        self.now = clock.now if clock else time.monotonic
        self.t0: float | None = None
        self.tick = -1
        self.applied: list[tuple[int, float]] = []  # (period index, action value)
        self.stops: list[int] = []

    def observe(self) -> dict[str, np.ndarray]:
        now = self.now()
        self.t0 = now if self.t0 is None else self.t0
        self.tick = round((now - self.t0) * self.hz)
        return {"state": np.array([self.tick, 0, 0], np.float32)}

    def act(self, action: np.ndarray) -> None:
        self.applied.append((self.tick, float(action[0])))

    def safe_stop(self) -> None:
        self.stops.append(self.tick)


class RawPeer:
    """A bare DEALER for sending arbitrary bytes to a server and reading its replies."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None):
        import zmq

        self._zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:  # as a client that sets one itself does (docs/protocol.md: do not)
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def recv(self, timeout_s: float = 2.0):
        from polcache_client.protocol import decode

        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply from server")
        return decode(self.socket.recv())

    def request(self, frame: bytes, timeout_s: float = 2.0):
        self.send(frame)
        return self.recv(timeout_s)

    def handshake(self, spec=None, name: str = "raw"):
        from polcache_client.protocol import Handshake, encode

        spec = spec or {"state": ((STATE_DIM,), "float32")}
        return self.request(encode(Handshake(obs_spec=spec, action_dim=ACTION_DIM, hz=50.0, name=name)))

    def close(self) -> None:
        self.socket.close(linger=0)


def observation(seq: int, epoch: int = 0, value: float | None = None, t_capture: float = 1.0, **arrays) -> bytes:
    from polcache_client.protocol import Observation, encode

    state = np.array([seq if value is None else value, 0, 0], np.float32)
    return encode(Observation(epoch=epoch, seq=seq, t_capture=t_capture, arrays=arrays or {"state": state}))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for servers whose port a test must know before they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float = 2.0) -> bool:
    """Poll `predicate` until true (records are appended just after the reply is sent)."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


class StallingLink:
    """A TCP link from robots to a server at `target_port` that can stall: while `stalled` is set
    nothing is forwarded either way and every connection stays open, as over a cable pulled or a
    Wi-Fi link lost for a moment; TCP then delivers all that was held, late, once it is cleared.
    Robots connect to `address`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalling-link", daemon=True)

    def __enter__(self) -> "StallingLink":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._closing.is_set():
            if self.stalled.is_set():  # read nothing: what is sent waits in the kernel's buffers
                time.sleep(0.002)
                continue
            for key, _ in self._selector.select(timeout=0.01):
                if key.fileobj is self._listener:
                    robot, _ = self._listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.target_port))
                    self._selector.register(robot, selectors.EVENT_READ, server)
                    self._selector.register(server, selectors.EVENT_READ, robot)
                    continue
                source, sink = key.fileobj, key.data
                try:
                    data = source.recv(1 << 16)
                    if data:
                        sink.sendall(data)
                        continue
                except OSError:
                    pass
                for end in (source, sink):  # one side closed: so does the other
                    if end.fileno() >= 0:
                        self._selector.unregister(end)
                        end.close()
