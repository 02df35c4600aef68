"""A simulated task acting as a robot: it speaks the protocol to a policy server through the
same client library and control loop a real robot uses, paced to wall-clock time, and reports
success exactly like `polcache eval`, so the two can be compared for the same checkpoint.

The simulated robot advances one environment step per applied action; while it waits for
its first chunk or after a safe stop it holds still (the simulation does not step).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import numpy as np

from polcache.errors import PolcacheError
from polcache.metrics import Metrics
from polcache.serve.handshake import wire_obs_spec
from polcache.config import INSTRUCTION_KEY
from polcache.sim.evaluate import EvalResult, check_rate, interruption
from polcache.sim.stats import jerk_summary, seam_jerk, wilson_interval
from polcache_client import (ActionSchedule, ConnectError, ControlLoop, KeyFolderError, PolicyClient, ProtocolError,
                             Watchdog, use_realtime_priority)


log = logging.getLogger(__name__)


class SimRobot:
    """RobotAdapter over a TaskEnv: observe returns the observation its sensor sees, act steps the env.
    `sensor_lag_s`: observe returns the scene as it was this long ago, as a lagging camera would;
    `stamped`: the robot then says when it was captured (`capture_time`, see
    polcache_client.adapter), as a well-integrated real robot does."""

    def __init__(self, env, sensor_lag_s: float = 0.0, stamped: bool = True):
        self.env = env
        self.obs_spec = wire_obs_spec(env.observation_spec())
        self.action_dim = env.action_dim
        self.sensor_lag_s = sensor_lag_s
        self._frames: deque[tuple[float, dict[str, np.ndarray]]] = deque()  # (time made, observation), oldest first
        self._captured_at = 0.0  # when the observation observe() last returned was captured
        if sensor_lag_s and stamped:
            self.capture_time = lambda: self._captured_at

    def begin(self, seed: int) -> None:
        self._frames.clear()
        self._record_frame(self.env.reset(seed=seed))
        self.steps, self.safe_stops = 0, 0
        self.done = self.success = False
        self.applied: list[np.ndarray] = []  # every action applied this episode ...
        self.seams: list[int] = []  # ... and the steps where a newly arrived chunk took over

    def _record_frame(self, obs: dict[str, np.ndarray]) -> None:
        self._frames.append((time.monotonic(), obs))

    def observe(self) -> dict[str, np.ndarray]:
        """The scene as it was `sensor_lag_s` ago, captured then (a sensor samples it continuously:
        while the robot holds still, its frames show the same scene with newer times)."""
        seen = time.monotonic() - self.sensor_lag_s
        while len(self._frames) > 1 and self._frames[1][0] <= seen:  # a newer one is old enough: the older goes
            self._frames.popleft()
        made, obs = self._frames[0]
        self._captured_at = max(made, seen)  # made later: an episode's first observation, the only one there is
        return obs

    def act(self, action: np.ndarray) -> None:
        self.applied.append(np.asarray(action, dtype=np.float32))
        obs, _, done, info = self.env.step(action)
        self._record_frame(obs)
        self.steps += 1
        self.success = self.success or info["success"]
        self.done = done or self.success or self.steps >= self.env.max_episode_steps

    def safe_stop(self) -> None:
        self.safe_stops += 1


# what a refused handshake that names a camera image means for sim-robot's own options
CAMERA_HINT = (" (sim-robot sends camera NAME's image as image_NAME for each --cameras NAME, at --image-size "
               "pixels: give the policy's cameras and size)")


MAX_SENSOR_LAG_MS = 5000.0  # beyond it every chunk is long past due; the loop refuses capture times 10 s old


def episode_tick_limit(max_episode_steps: int, hz: float) -> int:
    """The most ticks one episode runs: ticks without a step (waiting for a chunk, safe-stopped) do not
    count as the task's steps, so twice its step cap plus 10 s of them end an episode that would
    otherwise wait for a server forever."""
    return 2 * max_episode_steps + int(10 * hz)


def sim_robot_name(task: str) -> str:
    """The name the robot gives the server, and the label of its own metrics."""
    return f"sim-robot {task}"


def _check_options(sensor_lag_ms: float, stamped: bool, blend: str, decay: float | None) -> None:
    """run_sim_robot's options that cannot go together or are out of range, refused before the scene loads."""
    if not 0 <= sensor_lag_ms <= MAX_SENSOR_LAG_MS:
        raise PolcacheError(f"sensor_lag_ms must be in [0, {MAX_SENSOR_LAG_MS:g}] ms, got {sensor_lag_ms}")
    if decay is not None and blend != "ensemble":
        raise PolcacheError(f"decay weighs ensembled chunks; blend {blend!r} executes the newest chunk only")
    if not stamped and not sensor_lag_ms:
        raise PolcacheError("stamped=False leaves out the time of a lagging sensor's data: give the lag "
                            "(sensor_lag_ms)")


def _episode_summary(robot: SimRobot, seed: int, instruction: str | None, reconnects: int) -> dict[str, Any]:
    """One finished episode's entry in the result: outcome, length, stops, seam jerk, reconnects to
    the server during it (an outage it spanned); the instruction sent where the policy follows
    instructions."""
    return ({"seed": seed, "success": robot.success, "length": robot.steps, "safe_stops": robot.safe_stops,
             "truncated": not robot.done, "reconnects": reconnects,
             **seam_jerk(np.asarray(robot.applied), sorted(set(robot.seams))[1:])}
            | ({"instruction": instruction} if instruction else {}))


def _refusal_hint(exc: Exception, task: str, texts: list[str | None]) -> str:
    """What sim-robot's user can do about the server's refusal of its handshake, where it knows ("" if not)."""
    code = exc.code if isinstance(exc, ConnectError) else None  # the server's reason for refusing the handshake
    if code == "spec_mismatch" and "image_" in str(exc):
        return CAMERA_HINT
    if code == "bad_instruction" and texts == [None]:
        return f" (sim-robot: no instructions are written for task {task!r}; give one with --instruction TEXT)"
    return ""


def run_sim_robot(
    task: str,
    server: str,
    hz: float,
    episodes: int,
    seed: int = 1000,
    *,
    cameras: tuple[str, ...] | None = None,
    image_size: int = 96,
    keys_dir: str | None = None,
    blend: str = "ensemble",
    decay: float | None = None,
    hold_s: float = 0.2,
    connect_timeout_s: float = 30.0,
    realtime: bool = False,
    metrics: Metrics | None = None,
    instruction: str | None = None,
    name: str | None = None,
    sensor_lag_ms: float = 0.0,
    stamped: bool = True,
    allow_rate_mismatch: bool = False,
) -> EvalResult:
    """Run `episodes` episodes of `task` (episode i resets with seed + i, as in `polcache eval`);
    every tick and chunk record goes to `metrics`; `realtime` runs the loop under SCHED_FIFO.
    Episode i sends `instruction`, or else the task's i-th held-out paraphrase where written.
    `name`: what the robot calls itself at the server (default `sim_robot_name(task)`), so several
    robots on one task can be told apart in its log and metrics. `sensor_lag_ms`, `stamped`: a
    lagging sensor, and whether the robot says when its data were captured (SimRobot). `decay`:
    ensembling's (ActionSchedule's default where None), refused with `blend` latest, which has none.
    An episode is cut after `episode_tick_limit` ticks, however few of them stepped (waiting for a
    chunk, safe-stopped: a server gone quiet): marked `truncated` and counted as no success. A task
    that steps at another rate than the policy was trained at is refused as `polcache eval` refuses
    it, unless `allow_rate_mismatch`."""
    from polcache.envs import make_env  # simulation is an optional extra
    from polcache.envs.instructions import INSTRUCTIONS, instructions

    _check_options(sensor_lag_ms, stamped, blend, decay)
    texts = ([instruction] if instruction is not None
             else list(instructions(task, "heldout")) if task in INSTRUCTIONS else [None])

    metrics = metrics or Metrics()
    interrupted, refused, mismatch, loop, chunk_actions = None, None, None, None, None
    schedule = ActionSchedule(hz, blend, **({} if decay is None else {"decay": decay}))
    env = make_env(task, seed=seed, image=bool(cameras), cameras=cameras, image_size=image_size)
    robot = SimRobot(env, sensor_lag_ms / 1e3, stamped)
    per_episode = []
    try:
        with PolicyClient(server, robot.obs_spec, robot.action_dim, hz, name=name or sim_robot_name(task),
                          keys_dir=keys_dir,
                          instruction=texts[0]) as client:
            try:  # Ctrl-C or (Terminated) SIGTERM, e.g. `polcache launch` stopping, from the connect on:
                policy = client.connect(timeout_s=connect_timeout_s)
                chunk_actions = policy.get("n_action_steps")  # how long a chunk lasts, for the summary
                if policy.get("task") and policy["task"] != task:  # allowed (transfer tests), but rarely meant
                    log.warning("the server's policy was trained on %s, this robot runs %s", policy["task"], task)
                mismatch = check_rate(policy.get("control_hz"), 1.0 / env.control_period_s, task, allow_rate_mismatch)
                follows = INSTRUCTION_KEY in (policy.get("obs") or {})  # a policy without language ignores them
                if realtime:
                    try:
                        use_realtime_priority()
                    except PermissionError as exc:
                        raise PolcacheError(str(exc)) from None

                def chunk_arrived(record) -> None:
                    metrics.record(record)
                    if not record.stale_chunks:
                        robot.seams.append(robot.steps)

                loop = ControlLoop(robot, client, hz, schedule=schedule, watchdog=Watchdog(hold_s),
                                   on_tick=metrics.record, on_chunk=chunk_arrived)
                max_ticks = episode_tick_limit(env.max_episode_steps, hz)
                try:
                    for i in range(episodes):
                        connections = client.connections
                        robot.begin(seed + i)
                        loop.reset_episode(texts[i % len(texts)])
                        # safe-stops the robot if interrupted; an episode's end needs no stop: the next resets the scene
                        loop.run(ticks=max_ticks, until=lambda: robot.done, then_stop=False)
                        if not robot.done:
                            log.warning("episode %d (seed %d) cut at %d ticks (%.0f s) after %d of its %d steps: the "
                                        "robot waited or was stopped for the rest (a server gone quiet?); counted as "
                                        "no success, marked truncated", i, seed + i, max_ticks, max_ticks / hz,
                                        robot.steps, env.max_episode_steps)
                        per_episode.append(_episode_summary(robot, seed + i, texts[i % len(texts)] if follows else None,
                                                            client.connections - connections))
                finally:  # run() stops the robot only on its own way out: here after the last episode and on an
                    loop.stop()  # interrupt between runs (begin, reset_episode); none after run()'s or the watchdog's
            except KeyboardInterrupt as exc:  # the episodes finished (none too, also before the server answered)
                interrupted = interruption(exc, episodes)  # and the stop: a result
            except ConnectError as exc:
                if loop is None:  # at the first connect: nothing ran (one line, below)
                    raise
                # a server restarted with another policy refused the robot's handshake on reconnecting: the
                # episodes finished so far are a result too (it cost them all, with exit status 2 for bad input)
                refused = {"episodes_asked": episodes, "error": f"{exc}{_refusal_hint(exc, task, texts)}"}
            # the loop's own stop on the way out; the tick records' safe stops count it too (a record of its own)
            stopped = loop is not None and loop.safe_stops > 0
            reconnects, policy_changes = max(0, client.connections - 1), client.policy_changes
    except (ConnectError, ProtocolError, KeyFolderError) as exc:  # a bad --server address, no server, an
        # instruction the client refused to send (e.g. not UTF-8), a --keys folder without the keys: one line
        raise PolcacheError(f"{exc}{_refusal_hint(exc, task, texts)}") from None
    finally:
        env.close()
    n, n_ok = len(per_episode), sum(e["success"] for e in per_episode)
    # a cut episode's steps say how long the robot waited, not how long the task took: left out of the mean
    ran = [e["length"] for e in per_episode if not e["truncated"]]
    snap = metrics.snapshot()
    latency = snap.get("chunk", {}).get("latency_ms", {})
    return EvalResult(
        task=task, episodes=n, successes=n_ok, success_rate=n_ok / max(1, n),
        ci95=wilson_interval(n_ok, n),
        mean_episode_length=float(np.mean(ran)) if ran else math.nan,
        latency_ms={k: latency.get(k, float("nan")) for k in ("p50", "p95", "p99")} | {"n": latency.get("n", 0)},
        seed=seed, per_episode=per_episode,
        extra={"latency_from": "capture", "server": server, "hz": hz, "blend": blend,
               **({"decay": schedule.decay} if blend == "ensemble" else {}), "tick": snap.get("tick", {}),
               "chunk": snap.get("chunk", {}),
               "safe_stop": stopped, "reconnects": reconnects, "policy_changes": policy_changes,
               **jerk_summary(per_episode),
               "truncated_episodes": sum(e["truncated"] for e in per_episode), "chunk_actions": chunk_actions,
               **({"sensor_lag_ms": sensor_lag_ms, "stamped": stamped} if sensor_lag_ms else {}),
               **({"rate_mismatch": mismatch} if mismatch else {}),
               **({"interrupted": interrupted} if interrupted else {}),
               **({"server_refused": refused} if refused else {})})
