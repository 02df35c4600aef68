"""Simulation throughput: env steps/s (state-only and with one 96x96 camera) and camera
frames/s with polcache's fast render settings vs MuJoCo's defaults.

    python benchmarks/bench_envs.py [--steps 600] [--frames 40] [--json benchmarks/results/envs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from polcache.envs import make_env
from polcache.envs.render import CameraRenderer

STEP_TASKS = ("reach-v3", "push-v3", "cue-reach")
RENDER_CASES = (("reach-v3", "corner"), ("cue-reach", "top"))


def step_rate(task: str, steps: int, image: bool, size: int) -> float:
    """Env steps per second under uniform random actions, resetting when an episode ends."""
    env = make_env(task, seed=0, image=image, image_size=size)
    rng = np.random.default_rng(0)
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        _, _, done, _ = env.step(rng.uniform(-1, 1, env.action_dim))
        if done:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def render_rate(task: str, camera: str, fast: bool, frames: int, size: int) -> float:
    """Frames per second for one camera; a fresh env each time, since fast settings edit the model."""
    env = make_env(task, seed=0)
    env.reset()
    renderer = CameraRenderer(env.model, fast=fast)
    renderer.render(env.data, camera, size)  # GL context creation is not per-frame cost
    start = time.perf_counter()
    for _ in range(frames):
        renderer.render(env.data, camera, size)
    rate = frames / (time.perf_counter() - start)
    renderer.close()
    env.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="env steps per measurement")
    parser.add_argument("--frames", type=int, default=40, help="frames per render measurement")
    parser.add_argument("--size", type=int, default=96, help="image size in pixels")
    parser.add_argument("--json", default="benchmarks/results/envs.json", help="where to write results")
    args = parser.parse_args()

    steps = []
    for task in STEP_TASKS:
        for image in (False, True):
            rate = step_rate(task, args.steps, image, args.size)
            steps.append({"task": task, "obs": f"state+{args.size}px" if image else "state", "steps_per_s": round(rate, 1)})
    renders = []
    for task, camera in RENDER_CASES:
        for fast in (False, True):
            rate = render_rate(task, camera, fast, args.frames, args.size)
            renders.append({"task": task, "camera": camera, "settings": "fast" if fast else "default",
                            "frames_per_s": round(rate, 1), "ms_per_frame": round(1000 / rate, 2)})

    print(f"{'task':<12} {'obs':<12} {'steps/s':>9}")
    for row in steps:
        print(f"{row['task']:<12} {row['obs']:<12} {row['steps_per_s']:>9.1f}")
    print(f"\n{'task':<12} {'camera':<8} {'settings':<9} {'frames/s':>9} {'ms/frame':>9}   ({args.size}x{args.size})")
    for row in renders:
        print(f"{row['task']:<12} {row['camera']:<8} {row['settings']:<9} {row['frames_per_s']:>9.1f} {row['ms_per_frame']:>9.2f}")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
              "image_size": args.size, "step_rate": steps, "render_rate": renders}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
