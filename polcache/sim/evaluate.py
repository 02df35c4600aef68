"""In-process evaluation: run any PolicyBackend in a simulated task and report success rate
(with a 95% Wilson interval), episode length and per-chunk inference latency.

The rollout mirrors deployment: the policy's window and the executed actions it may verify
against are kept by the server's own ObservationHistory and ExecutedLog (frames at the policy's
offsets, the first one repeated at episode start); it executes n_action_steps actions, then replans.
Episode i resets with seed `seed + i`; policy noise is seeded per episode and chunk, so a
run is reproducible and different seeds give different episodes."""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from polcache.atomic import atomic_write_text
from polcache.config import INSTRUCTION_KEY, MAX_SEED
from polcache.errors import PolcacheError
from polcache.jsonfile import standard_json
from polcache.outputs import check_output, json_kind
from polcache.policy.spec import CommittedActions, PolicyBackend, PolicySpec, chunking_blocker, rate_mismatch
from polcache.serve.handshake import operator_instruction, policy_instruction
from polcache.serve.history import ExecutedLog, ObservationHistory
from polcache.sim.stats import jerk_summary, percentiles_ms, seam_jerk, wilson_interval
from polcache_client.protocol import ActionChunk
from polcache_client.schedule import ActionSchedule
from polcache_client.signals import interrupt_signal


RESULT_FORMAT = "polcache-eval-result"
_RESULT_FIELDS = ("task", "episodes", "successes", "success_rate", "ci95")  # how results before the marker look


def check_result_output(path: str | Path, flag: str = "--json") -> Path:
    """Refuse, before any episode runs, a result path that holds anything but an earlier result
    of eval or sim-robot (files written before the "format" marker are known by their fields)."""
    return check_output(path, "an eval result (JSON)", folder=False, flag=flag,
                        ours=lambda p: json_kind(p, RESULT_FORMAT, _RESULT_FIELDS))


@contextmanager
def result_written_first(path: str | None, result: "EvalResult") -> Iterator[None]:
    """Around a command's summary: --json written before it is printed (a closed stdout, a pipe to
    head, cost the whole result), and a write that failed raised after it (then it cost the summary)."""
    failed = None
    if path:
        try:
            atomic_write_text(path, result.to_json())
        except (OSError, PolcacheError) as exc:
            failed = exc
    yield
    if failed is not None:
        raise failed
    if path:
        print(f"wrote {path}")


@dataclass
class EvalResult:
    task: str
    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_episode_length: float
    latency_ms: dict
    seed: int
    per_episode: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"format": RESULT_FORMAT, **asdict(self)}  # the marker lets --json replace only a result
        d["ci95"] = list(self.ci95)
        return d

    def to_json(self) -> str:
        """The result as standard JSON (--json): a figure with no value (no episode finished, no chunk
        timed) is null (Python wrote NaN)."""
        return standard_json(self.to_dict(), indent=2)

    def summary(self) -> str:
        lo, hi = self.ci95
        lat = self.latency_ms
        cap = f" (cap {self.extra['max_steps']})" if "max_steps" in self.extra else ""
        stopped = self.extra.get("interrupted") or self.extra.get("server_refused")
        why = "interrupted" if "interrupted" in self.extra else "ended by the server's refusal"
        cut = f" [{why}: {self.episodes} of {stopped['episodes_asked']} episodes finished]" if stopped else ""
        # eval times each chunk's inference; a robot (sim-robot) from its observation's capture to the
        # tick that received the chunk, which includes the transport and waiting for that tick
        robot = self.extra.get("latency_from") == "capture"
        inference = self.extra.get("chunk", {}).get("inference_ms", {}).get("p50") if robot else None
        cut_short = self.extra.get("truncated_episodes", 0)  # a robot's episodes cut at the tick limit
        length = (f"mean episode length {self.mean_episode_length:.1f} steps{cap}" if cut_short < self.episodes
                  else "no episode ran to its end")
        if 0 < cut_short < self.episodes:
            length += f" over the {self.episodes - cut_short} not cut short"
        outcome = (f"success {self.success_rate:.0%} ({self.successes}/{self.episodes}, 95% CI {lo:.0%}-{hi:.0%}), "
                   + length if self.episodes
                   else "no episode finished")  # a robot stopped in its first: its stop and loop still reported
        latency = (f"{'observation-to-action' if robot else 'chunk'} latency p50 {lat['p50']:.1f} ms / p95 "
                   f"{lat['p95']:.1f} ms / p99 {lat['p99']:.1f} ms" if lat["p50"] == lat["p50"]  # NaN: none timed
                   else f"no chunk {'received' if robot else 'timed'}")
        return (f"{self.task}{cut}: {outcome}, {latency}"
                + (f" (the server's inference p50 {inference:.1f} ms)" if inference is not None else ""))

    def exit_status(self) -> int:
        """What the command that ran it exits with: 0, or 128 + the signal that cut it short (130 Ctrl-C,
        143 SIGTERM, 129 SIGHUP), or 1 where the server refused the robot mid-run (the finished
        episodes still reported)."""
        stopped = self.extra.get("interrupted")
        if stopped:
            return 128 + signal.Signals[stopped["signal"]]
        return 1 if "server_refused" in self.extra else 0

    def jerk_line(self) -> str | None:
        """The executed actions' jerk at chunk seams and elsewhere, as every run reports it (eval and
        sim-robot alike); None where the run measured neither."""
        seam, other = self.extra.get("seam_jerk"), self.extra.get("jerk")
        if seam is None and other is None:
            return None
        seam, other = (f"{v:.4g}" if v is not None else "n/a" for v in (seam, other))
        return (f"executed actions: jerk {seam} where a new chunk took over, {other} elsewhere (mean norm of the "
                "third difference)")


def interruption(exc: KeyboardInterrupt, episodes_asked: int) -> dict:
    """What a run's result records when Ctrl-C, SIGTERM or SIGHUP (Terminated) cut it short (eval and
    sim-robot alike): the episodes asked for and the signal, whose exit status EvalResult gives."""
    return {"episodes_asked": episodes_asked, "signal": interrupt_signal(exc).name}


@dataclass(frozen=True)
class Rollout:
    """How actions reach the env. `max_steps` caps episodes below the task's own limit;
    `action_steps` executes only that many actions per chunk before replanning (default: the
    policy's n_action_steps); `ensemble_decay` blends overlapping chunks with the robot client's
    own ActionSchedule (exponential temporal ensembling, weight exp(-decay * k) for the k-th
    newest chunk), exactly as over ZeroMQ. `delay` simulates a policy that takes that many control
    steps per chunk, `rtc` generates chunks by real-time chunking (flow samplers). A language-conditioned policy follows `instruction`
    in every episode, or else the task's `instructions` split (train | heldout), episode i
    taking the split's i-th paraphrase (cycling)."""

    max_steps: int | None = None
    action_steps: int | None = None
    ensemble_decay: float | None = None
    delay: int = 0  # control steps from planning a chunk to executing it (simulated inference latency)
    rtc: bool = False  # real-time chunking: guide each chunk toward the actions already committed
    instruction: str | None = None
    instructions: str | None = None  # train | heldout (None: heldout, or the one instruction)


def _what_fits(rollout: Rollout, n: int, per_chunk: int) -> str:
    """The change that makes a delay fit chunks of `n` actions: fewer actions per chunk while the delay
    leaves room, else a shorter delay (for the --action-steps given, and for one action per chunk)."""
    if rollout.delay < n:
        return f"lower --action-steps to at most {n - rollout.delay}"
    if per_chunk == 1:
        return f"--delay at most {n - 1}"
    if rollout.action_steps:
        return f"--delay at most {n - per_chunk} with --action-steps {per_chunk}, {n - 1} with --action-steps 1"
    return f"--delay at most {n - 1}, with --action-steps 1"


def check_rollout(rollout: Rollout, spec: PolicySpec) -> int:
    """The actions executed per chunk; PolcacheError where the policy's chunks cannot give them."""
    if (rollout.action_steps or 0) > spec.n_action_steps:  # a chunk holds no more actions than that
        raise PolcacheError(f"--action-steps {rollout.action_steps}: the policy executes at most "
                            f"{spec.n_action_steps} actions per chunk (its n_action_steps)")
    per_chunk = rollout.action_steps or spec.n_action_steps
    if per_chunk + rollout.delay > spec.n_action_steps:
        raise PolcacheError(f"a delay of {rollout.delay} steps with {per_chunk} actions executed per chunk needs "
                            f"chunks of at least {per_chunk + rollout.delay} actions; the policy's have "
                            f"{spec.n_action_steps} ({_what_fits(rollout, spec.n_action_steps, per_chunk)})")
    if rollout.ensemble_decay is not None and per_chunk + rollout.delay >= spec.n_action_steps:
        # each chunk is replaced only once all its actions ran: nothing would be blended, silently
        fewer = spec.n_action_steps - 1 - rollout.delay
        raise PolcacheError(f"--ensemble blends nothing here: with {per_chunk} of each chunk's {spec.n_action_steps} "
                            f"actions executed" + (f" and a delay of {rollout.delay}" if rollout.delay else "")
                            + " no two chunks overlap; "
                            + (f"pass --action-steps {fewer} or fewer to ensemble" if fewer >= 1 else
                               "lower --delay to ensemble"))
    return per_chunk


def chunk_seed(episode_seed: int, chunk: int) -> int:
    """The sampling seed of an episode's `chunk`-th chunk: episode_seed * 10007 + chunk, modulo 2^63 so
    that it stays a seed every backend takes (0..2^63-1) for any episode seed; 10007 is odd, so episode
    seeds that differ below 2^63 still get different seeds for the same chunk. Below 2^63 it is the
    plain value, so runs with smaller seeds are reproduced exactly as before the modulo."""
    return (episode_seed * 10007 + chunk) % (MAX_SEED + 1)


def run_episode(env, backend: PolicyBackend, seed: int, latencies: list[float], frames: list | None = None,
                rollout: Rollout = Rollout(), instruction: np.ndarray | None = None) -> dict:
    """One episode; it ends at the first success, when the env says done, or at the step cap.
    `instruction` (encoded) joins every observation of a language-conditioned policy.

    The step index is the clock: a chunk planned at step s has action i due at step s + i and,
    with `rollout.delay` d, reaches the robot only at step s + d (the robot executes the previous
    chunk meanwhile, as on a real robot whose policy takes d control periods; the episode's first
    chunk is waited for). Returns also the jerk of the executed actions at the steps where a new
    chunk takes over (`seam_jerk`) and elsewhere (`jerk`)."""
    def observe(obs: dict) -> dict:
        return obs if instruction is None else {**obs, INSTRUCTION_KEY: instruction}

    spec = backend.spec
    cap = min(env.max_episode_steps, rollout.max_steps or env.max_episode_steps)
    per_chunk = check_rollout(rollout, spec)
    schedule = (ActionSchedule(1.0, "latest") if rollout.ensemble_decay is None
                else ActionSchedule(1.0, "ensemble", rollout.ensemble_decay))
    session = backend.session()  # this episode's own policy state
    session.reset()
    history = ObservationHistory(spec.n_obs_steps, spec.obs_stride, spec.frame_mode)
    history.push(0, observe(env.reset(seed=seed)))
    executed = ExecutedLog(spec.history_span)  # the action applied at each step, for self-verification
    in_flight: deque[tuple[int, ActionChunk]] = deque()  # (step it arrives, chunk)
    applied, seams = [], []
    last: ActionChunk | None = None
    success, done, steps, chunk = False, False, 0, 0
    while not (done or success) and steps < cap:
        if steps % per_chunk == 0:
            past = executed.at(steps, spec.frame_offsets[:-1], spec.action_dim)
            # what the robot will execute from now on: the newest chunk planned, arrived or still in flight
            planned = last.actions[last.t_actions >= steps] if last is not None else ()
            committed = CommittedActions(planned, rollout.delay) if rollout.rtc and len(planned) else None
            t0 = time.perf_counter()
            frame_steps, window = history.window()
            actions = session.predict(window, frame_steps, seed=chunk_seed(seed, chunk), past_actions=past,
                                      committed=committed)[0]
            latencies.append(time.perf_counter() - t0)
            last = ActionChunk(0, chunk, [], float(steps), steps + np.arange(len(actions), dtype=np.float64), actions, {})
            in_flight.append((steps + (rollout.delay if chunk else 0), last))
            chunk += 1
        while in_flight and in_flight[0][0] <= steps:
            schedule.add(in_flight.popleft()[1], float(steps))
            seams.append(steps)
        action = schedule.action_at(float(steps))
        executed.record([steps], np.asarray(action, dtype=np.float32)[None])
        applied.append(action)
        obs, _, done, info = env.step(action)
        steps += 1
        history.push(steps, observe(obs))
        if frames is not None:
            frames.append(env.render())
        success = bool(info.get("success"))
    return {"seed": seed, "success": success, "length": steps, **seam_jerk(np.asarray(applied), seams[1:])}


def check_rate(policy_hz: float | None, task_hz: float, task: str, allow_mismatch: bool = False) -> dict | None:
    """Refuse a task that steps at another rate than the policy was trained at (its spec's control_hz,
    where known): its actions are per control step, so at another rate the robot moves at another speed
    and the success rate measured is not the policy's. With `allow_mismatch` it runs, said on stderr, and
    the rates are returned for the result to record; None where they agree or the policy's is unknown."""
    if not rate_mismatch(policy_hz, task_hz):
        return None
    rates = f"the policy was trained at {policy_hz:g} Hz (its dataset's fps) but {task} steps at {task_hz:g} Hz"
    if not allow_mismatch:
        raise PolcacheError(f"{rates}: its actions are per control step, so a success rate measured here is not the "
                            f"policy's; pass --allow-rate-mismatch to evaluate anyway")
    print(f"warning: {rates} (--allow-rate-mismatch): the success rate is measured at the wrong rate", file=sys.stderr)
    return {"policy_hz": policy_hz, "task_hz": task_hz}


def evaluate(backend: PolicyBackend, task: str, episodes: int, seed: int = 0, progress: bool = True,
             video_dir: str | Path | None = None, video_episodes: int = 0, rollout: Rollout = Rollout(),
             allow_rate_mismatch: bool = False) -> EvalResult:
    """Roll `backend` out for `episodes` episodes of `task` (episode i uses seed + i). A task stepping
    at another rate than the policy was trained at is refused unless `allow_rate_mismatch`."""
    from polcache.envs import make_env  # simulation is an optional extra
    from polcache.envs.instructions import instructions
    from polcache.policy.checkpoint import check_compatible

    if rollout.rtc and (why := chunking_blocker(backend)):
        raise PolcacheError(f"--rtc: {why}")
    image_keys = [k for k in backend.spec.obs if k.startswith("image_")]
    cams = tuple(k[len("image_"):] for k in image_keys)
    size = backend.spec.obs[image_keys[0]].shape[0] if image_keys else 96
    env = make_env(task, seed=seed, image=bool(cams), cameras=cams or None, image_size=size)
    meta = {"obs_keys": list(backend.spec.obs), "obs_spec": {k: v.to_dict() for k, v in backend.spec.obs.items()},
            "action_dim": backend.spec.action_dim}
    env_spec = env.observation_spec()
    texts = None
    if rollout.instruction is not None:  # refused where it would be ignored without a word
        operator_instruction(rollout.instruction, backend.spec, "--instruction")
        if rollout.instructions is not None:
            raise PolcacheError(f"--instructions {rollout.instructions}: give it or --instruction, not both (an "
                                "--instruction is followed in every episode)")
    elif rollout.instructions is not None and INSTRUCTION_KEY not in backend.spec.obs:
        raise PolcacheError(f"--instructions {rollout.instructions}: this policy takes no instruction (it is not "
                            "language-conditioned)")
    if INSTRUCTION_KEY in backend.spec.obs:  # the evaluator gives the instruction, as a robot would
        env_spec[INSTRUCTION_KEY] = backend.spec.obs[INSTRUCTION_KEY]
        texts = ((rollout.instruction,) if rollout.instruction is not None
                 else instructions(task, rollout.instructions or "heldout"))
        split = rollout.instructions or "heldout"
        encoded = [policy_instruction(t, backend.spec, "--instruction" if rollout.instruction is not None
                                      else f"{task}'s {split} paraphrase {t!r} (--instructions)") for t in texts]
    check_compatible(meta, env_spec, env.action_dim, f"task {task!r}")  # first: other shapes, whatever the rate
    mismatch = check_rate(backend.spec.control_hz, 1.0 / env.control_period_s, task, allow_rate_mismatch)
    check_rollout(rollout, backend.spec)  # before the progress bar: a bad option is one line
    cap = min(env.max_episode_steps, rollout.max_steps or env.max_episode_steps)
    if (rollout.max_steps or 0) > cap:  # the env ends its episodes there: run, but not under a cap not applied
        print(f"note: --max-steps {rollout.max_steps} is above {task}'s own cap of {cap} steps; episodes end at {cap}")
    latencies: list[float] = []
    per_episode = []
    interrupted = None
    try:
        for i in tqdm(range(episodes), desc=f"eval {task}", disable=not progress, unit="ep"):
            frames = [] if video_dir and i < video_episodes else None
            ep = run_episode(env, backend, seed + i, latencies, frames, rollout,
                             None if texts is None else encoded[i % len(encoded)])
            if texts is not None:
                ep["instruction"] = texts[i % len(texts)]
            per_episode.append(ep)
            if frames:
                _write_gif(Path(video_dir) / f"{task}_seed{seed + i}.gif", frames, env.control_period_s)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM in a long evaluation: the finished episodes are a result
        if not per_episode:
            raise
        interrupted = interruption(exc, episodes)
    finally:
        env.close()
    n, n_ok = len(per_episode), sum(e["success"] for e in per_episode)
    return EvalResult(
        task=task, episodes=n, successes=n_ok, success_rate=n_ok / max(1, n), ci95=wilson_interval(n_ok, n),
        mean_episode_length=float(np.mean([e["length"] for e in per_episode])) if per_episode else 0.0,
        latency_ms=percentiles_ms(latencies), seed=seed, per_episode=per_episode, extra={"max_steps": cap,
        "action_steps": min(backend.spec.n_action_steps, rollout.action_steps or backend.spec.n_action_steps),
        "ensemble_decay": rollout.ensemble_decay, "delay": rollout.delay, "rtc": rollout.rtc,
        **jerk_summary(per_episode),
        **({} if texts is None else {"instructions": list(texts)}),
        **({"rate_mismatch": mismatch} if mismatch else {}),
        **({"interrupted": interrupted} if interrupted else {})})


GIF_STEPS_PER_FRAME = 2  # every other step: half the file, still smooth


def _write_gif(path: Path, frames: list[np.ndarray], control_period_s: float) -> None:
    """An episode's frames at their real pace. imageio (>= 2.28, Pillow) takes `duration` in milliseconds
    (0.08 meant 0 ms: players raced through it, and Pillow merged a held pose's identical frames away);
    GIF delays count hundredths of a second and browsers slow anything under 20 ms to 100 ms."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    frame_ms = max(20, round(GIF_STEPS_PER_FRAME * control_period_s * 100) * 10)
    imageio.mimsave(path, frames[::GIF_STEPS_PER_FRAME], duration=frame_ms, loop=0)


def side_by_side_speed(uncached: PolicyBackend, cached: PolicyBackend, calls: int = 20) -> dict:
    """Median per-chunk latency of both backends on the same observation, interleaved call by call
    (drift on a noisy machine hits both alike): what `polcache eval --cache` reports as the speedup."""
    obs = cached.spec.placeholder_observations()
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for b in (uncached, cached):
        b.predict(obs, seed=0)  # warm-up
    for i in range(calls):
        for name, b in (("uncached", uncached), ("cached", cached)):
            t0 = time.perf_counter()
            b.predict(obs, seed=i)
            times[name].append(time.perf_counter() - t0)
    u, c = float(np.median(times["uncached"])) * 1e3, float(np.median(times["cached"])) * 1e3
    return {"uncached_ms": round(u, 3), "cached_ms": round(c, 3), "speedup": round(u / c, 3), "calls": calls}
