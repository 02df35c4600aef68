"""Scripted-expert demonstrations written as a polcache dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from polcache.config import INSTRUCTION_KEY
from polcache.envs.base import TaskEnv
from polcache.envs.instructions import instruction_array
from polcache.envs.registry import Expert, make_env, make_expert
from polcache.errors import PolcacheError

EXTRA_STEPS = 10  # steps recorded after first success, so policies also learn to settle
HOLD_RATE = 0.1  # with holds on, the chance per step that one starts
STOP_RATE = 0.1  # with stops on, the same for a stop (tried after a hold's draw)


@dataclass(frozen=True)
class Perturbations:
    """How the executed actions depart from the expert's while each step's label stays the
    expert's own action at that observation (DART-style): the demonstrations then pass through
    the states a policy reaches when it errs, each labelled with the way back.

    `hold_steps` H: at HOLD_RATE of steps the robot starts repeating the action it last executed
    for 1..H steps, as when an action chunk runs open loop past an event (a go signal).
    `stop_steps` S: at STOP_RATE of the other steps it rests (`env.rest_action`) for 1..S steps, as
    a robot does whose next chunk is late: states at rest short of where the expert was heading.
    `action_noise` sigma: Gaussian noise of that standard deviation is added to every fresh action
    (clipped to [-1, 1]): states off the expert's path, as an imprecise policy drifts."""

    hold_steps: int = 0
    stop_steps: int = 0
    action_noise: float = 0.0

    def __post_init__(self) -> None:
        for flag, value in (("--hold-steps", self.hold_steps), ("--stop-steps", self.stop_steps),
                            ("--action-noise", self.action_noise)):
            if not value >= 0:
                raise PolcacheError(f"{flag} must be >= 0, got {value}")

    def attrs(self) -> dict:
        """What a dataset records of them."""
        return {"hold_steps": self.hold_steps, "hold_rate": HOLD_RATE if self.hold_steps else 0.0,
                "stop_steps": self.stop_steps, "stop_rate": STOP_RATE if self.stop_steps else 0.0,
                "action_noise": self.action_noise}


def _run_episode(env: TaskEnv, expert: Expert, seed: int, extra_steps: int,
                 perturb: Perturbations = Perturbations()):
    """One expert rollout; obs[t] is the observation before action[t]. Stops `extra_steps`
    after the first success, or when the env says done. Returns (Episode, succeeded). action[t]
    is always the expert's action at obs[t]; what the robot executes follows `perturb`."""
    from polcache.data.store import Episode

    obs = env.reset(seed=seed)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions: list[np.ndarray] = []
    success, first_success = False, None
    rng = np.random.default_rng(seed)
    executed, held, stale = None, 0, None  # executed: what the robot ran at the step before
    for t in range(env.max_episode_steps):
        action = np.asarray(expert(obs), dtype=np.float32)
        for k, v in obs.items():
            frames[k].append(v)
        actions.append(action)
        if not held and executed is not None:  # this and the next held - 1 steps execute `stale`
            if perturb.hold_steps and rng.random() < HOLD_RATE:
                held, stale = int(rng.integers(1, perturb.hold_steps + 1)), executed
            elif perturb.stop_steps and rng.random() < STOP_RATE:
                held, stale = int(rng.integers(1, perturb.stop_steps + 1)), env.rest_action(executed)
        if held:
            held -= 1
            executed = stale
        elif perturb.action_noise:
            noise = rng.normal(0.0, perturb.action_noise, action.shape)
            executed = np.clip(action + noise, -1.0, 1.0).astype(np.float32)
        else:
            executed = action
        obs, _, done, info = env.step(executed)
        success = info["success"]
        if success and first_success is None:
            first_success = t
        if done or (first_success is not None and t >= first_success + extra_steps):
            break
    episode = Episode(obs={k: np.stack(v) for k, v in frames.items()}, action=np.stack(actions), task=env.task)
    return episode, success


def _collect(task: str, episodes: int, seed: int, image: bool, cameras: tuple[str, ...] | None, image_size: int,
             progress: bool, keep: int | None, instruction_bytes: int,
             perturb: Perturbations) -> tuple[list, list[int], list[int], dict]:
    """One task's kept episodes, their seeds, the dropped seeds and the dataset attrs of its env.
    With `instruction_bytes`, every step also carries the episode's instruction (episode i follows
    the task's i-th training paraphrase, cycling)."""
    env = make_env(task, seed=seed, image=image, cameras=cameras, image_size=image_size)
    try:
        expert = make_expert(task, env)
        kept, kept_seeds, dropped_seeds = [], [], []
        with tqdm(total=episodes, desc=f"record {task}", unit="ep", disable=not progress) as bar:
            for i in range(episodes):  # counted by hand: an iterating bar misses the episode it breaks on
                episode, success = _run_episode(env, expert, seed + i, EXTRA_STEPS, perturb)
                if success:
                    if instruction_bytes:
                        text = instruction_array(task, "train", len(kept), instruction_bytes)
                        episode.obs[INSTRUCTION_KEY] = np.repeat(text[None], len(episode.action), axis=0)
                    kept.append(episode)
                    kept_seeds.append(seed + i)
                else:
                    dropped_seeds.append(seed + i)
                bar.set_postfix(kept=len(kept), dropped=len(dropped_seeds), refresh=False)
                bar.update()
                if keep is not None and len(kept) >= keep:
                    break
        failed = f" (seeds {dropped_seeds})" if dropped_seeds else ""  # said with or without the bar: logs need it
        short = f"; --keep {keep} not reached in {episodes} attempts" if keep is not None and len(kept) < keep else ""
        print(f"record {task}: kept {len(kept)} of {len(kept) + len(dropped_seeds)} episodes, dropped "
              f"{len(dropped_seeds)} where the expert failed{failed}{short}")
        if not kept:
            raise PolcacheError(f"{task}: the expert failed all {episodes} episodes; nothing written")
        obs_spec = {k: v.to_dict() for k, v in env.observation_spec().items()}
        if instruction_bytes:
            obs_spec[INSTRUCTION_KEY] = {"shape": [instruction_bytes], "dtype": "uint8"}
        attrs = {
            "description": env.description,
            "obs_spec": obs_spec,
            "action_dim": env.action_dim,
            "max_episode_steps": env.max_episode_steps,
            "fps": round(1.0 / env.control_period_s, 6),  # control steps per simulated second
            "expert": getattr(expert, "__name__", type(expert).__name__),
        }
    finally:
        env.close()
    return kept, kept_seeds, dropped_seeds, attrs


def record_demonstrations(
    task: str | Sequence[str],
    episodes: int,
    out: str | Path,
    image: bool = False,
    seed: int = 0,
    cameras: tuple[str, ...] | None = None,
    image_size: int = 96,
    progress: bool = True,
    keep: int | None = None,
    instruction_bytes: int = 0,
    perturb: Perturbations = Perturbations(),
) -> dict:
    """Run the scripted expert for `episodes` episodes (episode i uses seed + i), keep those that
    end in success, and write them to `out`. Failed ones are dropped rather than kept, since
    imitation learning would copy the failures. With `keep`, stop as soon as that many are kept
    (so "50 demonstrations" means 50 even where the expert fails some). Several tasks (a list)
    make one multi-task dataset, each episode naming its task; they must share observation and
    action shapes (Meta-World's do). `instruction_bytes` > 0 adds the `instruction` observation
    (see `_collect`); `perturb` makes the robot depart from the expert's actions while those are
    recorded (see `Perturbations`). Returns a summary dict."""
    from polcache.data.store import check_dataset_output, write_dataset
    from polcache.signals import interrupts_held

    tasks = [task] if isinstance(task, str) else list(task)
    for name, value in (("--episodes", episodes), ("--keep", 1 if keep is None else keep)):
        if value <= 0:
            raise PolcacheError(f"{name} must be a positive integer, got {value}")
    if not tasks:
        raise PolcacheError("--task: no task given")
    if instruction_bytes:  # before recording, not at the first kept episode
        from polcache.envs.instructions import INSTRUCTIONS

        unwritten = [name for name in tasks if name not in INSTRUCTIONS]
        if unwritten:
            raise PolcacheError(f"--instructions: no instructions are written for task {unwritten[0]!r} (have: "
                                f"{', '.join(sorted(INSTRUCTIONS))}); record it without --instructions")
        # the held-out paraphrases too: eval and sim-robot send those by default, to the policy trained on these
        size, longest = max((len(t.encode()), t) for name in tasks for split in INSTRUCTIONS[name].values()
                            for t in split)
        if size > instruction_bytes:
            raise PolcacheError(f"--instructions {instruction_bytes}: the longest instruction of "
                                f"{', '.join(tasks)} ({longest!r}, held-out paraphrases included: eval and sim-robot "
                                f"send those) takes {size} UTF-8 bytes; give at least {size}")
    check_dataset_output(out, demonstrations=True)  # refused before recording, not after
    kept, seeds, dropped, attrs = [], {}, {}, None
    for name in tasks:
        k, kept_seeds, dropped_seeds, task_attrs = _collect(name, episodes, seed, image, cameras, image_size, progress,
                                                            keep, instruction_bytes, perturb)
        if attrs is not None and (task_attrs["obs_spec"], task_attrs["action_dim"]) != (attrs["obs_spec"], attrs["action_dim"]):
            raise PolcacheError(f"{name}: observations or actions differ in shape from {tasks[0]}'s; "
                                "a multi-task dataset needs the same shapes")
        attrs = attrs or task_attrs
        kept += k
        seeds[name], dropped[name] = kept_seeds, dropped_seeds
    # a multi-task dataset names no single task: a policy trained on it asks eval for --task
    attrs = {**attrs, "task": tasks[0] if len(tasks) == 1 else "", "seed": seed, "extra_steps_after_success": EXTRA_STEPS,
             **perturb.attrs()}
    if len(tasks) == 1:
        attrs.update(episode_seeds=seeds[tasks[0]])
    else:
        attrs.update(description=f"{len(tasks)} tasks: {', '.join(tasks)}", tasks_recorded=tasks, episode_seeds=seeds)
    with interrupts_held():  # every episode is recorded: a stop now would lose them, or end after the swap
        write_dataset(out, kept, attrs)  # and say "terminated" of a dataset it had written
    return {
        "path": str(out),
        "task": tasks[0] if len(tasks) == 1 else tasks,
        "episodes": len(kept),
        "dropped": sum(len(d) for d in dropped.values()),
        "dropped_seeds": dropped[tasks[0]] if len(tasks) == 1 else dropped,
        "steps": int(sum(len(e.action) for e in kept)),
        "obs_keys": sorted(kept[0].obs),
    }
