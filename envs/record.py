"""Scripted-expert demonstrations written as a polcache dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from polcache.envs.base import TaskEnv
from polcache.envs.registry import Expert, make_env, make_expert
from polcache.errors import PolcacheError

EXTRA_STEPS = 10  # steps recorded after first success, so policies also learn to settle


def _run_episode(env: TaskEnv, expert: Expert, seed: int, extra_steps: int):
    """One expert rollout; obs[t] is the observation before action[t]. Stops `extra_steps`
    after the first success, or when the env says done. Returns (Episode, succeeded)."""
    from polcache.data.store import Episode

    obs = env.reset(seed=seed)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions: list[np.ndarray] = []
    success, first_success = False, None
    for t in range(env.max_episode_steps):
        action = np.asarray(expert(obs), dtype=np.float32)
        for k, v in obs.items():
            frames[k].append(v)
        actions.append(action)
        obs, _, done, info = env.step(action)
        success = info["success"]
        if success and first_success is None:
            first_success = t
        if done or (first_success is not None and t >= first_success + extra_steps):
            break
    episode = Episode(obs={k: np.stack(v) for k, v in frames.items()}, action=np.stack(actions), task=env.task)
    return episode, success


def record_demonstrations(
    task: str,
    episodes: int,
    out: str | Path,
    image: bool = False,
    seed: int = 0,
    cameras: tuple[str, ...] | None = None,
    image_size: int = 96,
    progress: bool = True,
    keep: int | None = None,
) -> dict:
    """Run the scripted expert for `episodes` episodes (episode i uses seed + i), keep those that
    end in success, and write them to `out`. Failed ones are dropped rather than kept, since
    imitation learning would copy the failures. With `keep`, stop as soon as that many are kept
    (so "50 demonstrations" means 50 even where the expert fails some). Returns a summary dict."""
    from polcache.data.store import write_dataset

    if episodes <= 0 or (keep is not None and keep <= 0):
        raise PolcacheError(f"episodes and keep must be positive, got {episodes} and {keep}")
    env = make_env(task, seed=seed, image=image, cameras=cameras, image_size=image_size)
    try:
        expert = make_expert(task, env)
        kept, kept_seeds, dropped_seeds = [], [], []
        with tqdm(range(episodes), desc=f"record {task}", unit="ep", disable=not progress) as bar:
            for i in bar:
                episode, success = _run_episode(env, expert, seed + i, EXTRA_STEPS)
                if success:
                    kept.append(episode)
                    kept_seeds.append(seed + i)
                else:
                    dropped_seeds.append(seed + i)
                bar.set_postfix(kept=len(kept), dropped=len(dropped_seeds))
                if keep is not None and len(kept) >= keep:
                    break
        if progress:
            failed = f" (seeds {dropped_seeds})" if dropped_seeds else ""
            print(f"record {task}: kept {len(kept)} of {len(kept) + len(dropped_seeds)} episodes, dropped {len(dropped_seeds)} where the expert failed{failed}")
        if not kept:
            raise PolcacheError(f"{task}: the expert failed all {episodes} episodes; nothing written to {out}")
        attrs = {
            "task": task,
            "description": env.description,
            "seed": seed,
            "episode_seeds": kept_seeds,
            "obs_spec": {k: v.to_dict() for k, v in env.observation_spec().items()},
            "action_dim": env.action_dim,
            "max_episode_steps": env.max_episode_steps,
            "fps": round(1.0 / env.control_period_s, 6),  # control steps per simulated second
            "expert": getattr(expert, "__name__", type(expert).__name__),
            "extra_steps_after_success": EXTRA_STEPS,
        }
        write_dataset(out, kept, attrs)
    finally:
        env.close()
    return {
        "path": str(out),
        "task": task,
        "episodes": len(kept),
        "dropped": len(dropped_seeds),
        "dropped_seeds": dropped_seeds,
        "steps": int(sum(len(e.action) for e in kept)),
        "obs_keys": sorted(kept[0].obs),
    }
