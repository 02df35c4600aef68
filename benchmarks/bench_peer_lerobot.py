"""LeRobot's DiffusionPolicy against polcache's recommended config on the same demonstrations, at
equal CPU training time (issue 12): train LeRobot's policy with LeRobot's own trainer for a
wall-clock budget, roll it out with polcache's env wrapper on the seeds polcache's MT10 suite used,
and rerun polcache's checkpoint on the same seeds in the same process (success and chunk latency).

Runs in a separate venv, because lerobot 0.4.4 pins torch<2.11 and no registry torchvision imports
next to this machine's torch 2.13 CPU. Setup (outside the repo; the system torch is not touched):

    python -m venv --system-site-packages /work/lerobot-venv
    /work/lerobot-venv/bin/pip install --no-deps lerobot==0.4.4 "datasets>=4,<5" draccus==0.10.0 \\
        pyyaml-include==1.4.1 mergedeep toml "deepdiff>=7.0.1,<9" orderly-set termcolor jsonlines \\
        einops dill multiprocess pandas xxhash httpx httpcore psutil "accelerate>=1.10,<2" pyserial \\
        "huggingface-hub>=0.34.2,<0.36" "diffusers>=0.27.2,<0.36" "transformers>=4.57.1,<5" \\
        "tokenizers>=0.22,<=0.23.0"
    cp -r benchmarks/lerobot_venv/torchvision /work/lerobot-venv/lib/python3.11/site-packages/

The versions are lerobot 0.4.4's own pins where it has them (transformers, which lerobot's policy
registry imports when it finds it, at the pin of lerobot's transformers extra). The last line
installs an import-only torchvision stand-in (benchmarks/lerobot_venv/torchvision/__init__.py):
every function or class in it raises ShimCalled when used, so a run that finishes proves the
state-only policy never ran torchvision code; this script refuses to run with a real torchvision.

    polcache data export-lerobot /work/exp/suite_mt10/data/push-v3_50demos_seed0.zarr \\
        --out /work/exp/peer/push-v3_50demos_lerobot
    OMP_NUM_THREADS=1 nice -n 5 /work/lerobot-venv/bin/python benchmarks/bench_peer_lerobot.py \\
        --dataset /work/exp/peer/push-v3_50demos_lerobot --work /work/exp/peer --minutes 8.8 26.4

Another task (`--task`, its polcache run read from `--suite`): the same with reach-v3's
demonstrations and polcache's 7.0 minutes on it, in a work folder of its own:

    OMP_NUM_THREADS=1 nice -n 5 /work/lerobot-venv/bin/python benchmarks/bench_peer_lerobot.py --task reach-v3 \\
        --dataset /work/exp/peer/reach-v3_50demos_lerobot --work /work/exp/peer/reach-v3 --minutes 7.0 21.0

State only: LeRobot's DiffusionPolicy needs an image or `observation.environment_state` besides
`observation.state`, so the 39-dim Meta-World state is split as LeRobot's own Meta-World env splits
it: the first 4 dims (hand position, gripper) are the robot state, the other 35 (object poses, the
previous frame's, the goal) the environment state; the derived dataset is written with LeRobot's
own dataset writer (which computes its normalisation stats). Everything else is LeRobot's default
(n_obs_steps 2, horizon 16, n_action_steps 8, batch 8, Adam 1e-4 with 500 warm-up steps and cosine
decay over the run, no EMA) except two settings the issue's run used: the UNet's widths
(128,256,512), the issue's 17M-param UNet (LeRobot's default 512,1024,2048 is 250M params: 4.8 s per training step and 2.4 s
per DDIM-10 chunk here, so 8.8 minutes would be about 110 steps), and DDIM with 10 steps (its
default sampler is DDPM-100).

The budget is CPU time, as the issue asks ("equal CPU training time"): polcache's 8.8 minutes were
one process with one thread on a core of its own. LeRobot's trainer counts steps, not minutes, so
two short probe runs (20 and 100 steps) measure its start-up and CPU seconds per step, and the run
gets the steps that fill the budget; the table reports the CPU and wall minutes it actually took.
Re-runnable: finished stages (derived dataset, probe, each trained budget, each evaluation) are
reused from --work."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # this checkout's polcache, not the installed one
os.environ.setdefault("MUJOCO_GL", "egl")

from common import RESULTS, print_table, write_json  # noqa: E402

from polcache.atomic import atomic_write_text  # noqa: E402
from polcache.sim.stats import percentiles_ms, wilson_interval  # noqa: E402

ROBOT_STATE_DIMS = 4  # LeRobot's Meta-World env: agent_pos = obs[:4] (hand xyz, gripper)
SHORT_CAP = 200  # LeRobot's Meta-World evaluations cap episodes here
PROBE_STEPS = (20, 100)
LATENCY_WARMUP = 5  # chunk calls per policy before the side-by-side latency is timed
SUITE = Path("/work/exp/suite_mt10")  # bench_suite.py --out of the MT10 run: <task>/result.json, <task>/run
COLUMNS = ["policy", "params", "train CPU min", "train wall min", "steps", "success", "95% CI", "within 200 steps", "95% CI (200)",
           "mean length", "chunk p50 ms", "chunk p95 ms"]


def split_state(state: np.ndarray) -> dict[str, np.ndarray]:
    """Meta-World's flat state as LeRobot's DiffusionPolicy wants it: robot state + environment state."""
    state = np.asarray(state, dtype=np.float32)
    return {"observation.state": state[..., :ROBOT_STATE_DIMS],
            "observation.environment_state": state[..., ROBOT_STATE_DIMS:]}


def check_torchvision_shim() -> str:
    """The only torchvision this comparison may see is the stand-in; and it must refuse to work."""
    import torchvision

    if not getattr(torchvision, "IS_POLCACHE_SHIM", False):
        raise SystemExit(f"torchvision {torchvision.__version__} is a real one; this benchmark documents the "
                         "shim setup (see the docstring), rerun in that venv")
    try:
        torchvision.transforms.Resize(8)
    except torchvision.ShimCalled:
        return torchvision.__version__
    raise SystemExit("the torchvision shim did not refuse a call")


def repo_id(task: str) -> str:
    return f"local/{task}_50demos_split"


def derive_dataset(exported: Path, out: Path, task: str) -> Path:
    """polcache's LeRobot export (observation.state = 39 dims) -> the split-state dataset, written by
    LeRobot's own writer. Built beside `out` and renamed, so an interrupted run leaves nothing."""
    if (out / "meta" / "info.json").exists():
        return out
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = LeRobotDataset("local/" + exported.name, root=exported)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    state_dim = src.features["observation.state"]["shape"][0]
    features = {
        "observation.state": {"dtype": "float32", "shape": (ROBOT_STATE_DIMS,), "names": None},
        "observation.environment_state": {"dtype": "float32", "shape": (state_dim - ROBOT_STATE_DIMS,),
                                          "names": None},
        "action": {"dtype": "float32", "shape": tuple(src.features["action"]["shape"]), "names": None},
    }
    dst = LeRobotDataset.create(repo_id(task), fps=src.fps, features=features, root=partial, use_videos=False)
    episode = None
    for i in range(len(src)):
        item = src[i]
        if episode is not None and int(item["episode_index"]) != episode:
            dst.save_episode()
        episode = int(item["episode_index"])
        dst.add_frame({**split_state(item["observation.state"].numpy()),
                       "action": item["action"].numpy().astype(np.float32), "task": item["task"]})
    dst.save_episode()
    dst.finalize()
    partial.rename(out)
    return out


def run_lerobot_train(dataset: Path, out_dir: Path, steps: int, down_dims: str, task: str) -> tuple[float, float]:
    """LeRobot's own trainer (lerobot-train), one process, one torch thread; returns (wall, CPU) seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)  # lerobot-train refuses an existing output_dir
    cmd = [sys.executable, "-m", "lerobot.scripts.lerobot_train",
           f"--dataset.repo_id={repo_id(task)}", f"--dataset.root={dataset}",
           "--policy.type=diffusion", "--policy.device=cpu", "--policy.push_to_hub=false",
           f"--policy.down_dims=[{down_dims}]",
           "--policy.noise_scheduler_type=DDIM", "--policy.num_inference_steps=10",
           "--wandb.enable=false", "--num_workers=0", f"--steps={steps}", f"--save_freq={steps}",
           f"--log_freq={max(1, steps // 20)}", f"--output_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(out_dir.parent / f"{out_dir.name}.log", "w") as log:
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def probe(dataset: Path, work: Path, down_dims: str, task: str) -> dict:
    """Start-up CPU seconds and CPU seconds per step of LeRobot's trainer here, from two short runs."""
    path = work / f"probe_{down_dims.replace(',', '-')}.json"
    if path.exists():
        return json.loads(path.read_text())
    runs = {n: run_lerobot_train(dataset, work / f"probe_{n}", n, down_dims, task) for n in PROBE_STEPS}
    (n1, (_, c1)), (n2, (_, c2)) = runs.items()
    per_step = (c2 - c1) / (n2 - n1)
    result = {"runs": {str(n): {"wall_s": w, "cpu_s": c} for n, (w, c) in runs.items()},
              "cpu_seconds_per_step": per_step, "startup_cpu_seconds": max(0.0, c1 - n1 * per_step)}
    for n in PROBE_STEPS:
        shutil.rmtree(work / f"probe_{n}", ignore_errors=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def train_budget(dataset: Path, work: Path, minutes: float, rate: dict, down_dims: str, task: str) -> dict:
    """Train for the steps that fill `minutes` of CPU time (the probe's rate); report what it took."""
    run = work / f"lerobot_dp_{down_dims.replace(',', '-')}_{minutes:g}min"
    path = work / f"{run.name}.train.json"
    if path.exists():
        return json.loads(path.read_text())
    steps = int((minutes * 60 - rate["startup_cpu_seconds"]) / rate["cpu_seconds_per_step"])
    wall, cpu = run_lerobot_train(dataset, run, steps, down_dims, task)
    result = {"budget_cpu_minutes": minutes, "down_dims": down_dims, "steps": steps, "train_wall_seconds": wall,
              "train_cpu_seconds": cpu, "checkpoint": str(run / "checkpoints" / "last" / "pretrained_model")}
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def episode_summary(per_episode: list[dict]) -> dict:
    n = len(per_episode)
    ok = sum(e["success"] for e in per_episode)
    ok200 = sum(e["success"] and e["length"] <= SHORT_CAP for e in per_episode)
    return {"episodes": n, "successes": ok, "ci95": wilson_interval(ok, n), "successes_200": ok200,
            "ci95_200": wilson_interval(ok200, n), "mean_length": float(np.mean([e["length"] for e in per_episode])),
            "per_episode": per_episode}


def load_lerobot(checkpoint: str):
    """LeRobot's policy and its pre-/post-processors, loaded as its own evaluation loads them."""
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = DiffusionPolicy.from_pretrained(checkpoint).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=checkpoint)
    return policy, pre, post


def lerobot_action(policy, pre, post, state: np.ndarray):
    """One select_action call on a Meta-World state: the next action of the queued chunk, or a new chunk."""
    import torch

    with torch.inference_mode():
        return post(policy.select_action(pre({k: torch.from_numpy(v)[None] for k, v in split_state(state).items()})))


def load_polcache(reference: dict, run: Path):
    """polcache's checkpoint of the suite run, with the sampler and steps its evaluation used."""
    from polcache.policy.loader import load_backend

    extra = reference["extra"]
    return load_backend(str(run / Path(extra["checkpoint"]).name), sampler=extra["sampler"],
                        steps=extra["denoising_steps"], threads=1)


def evaluate_lerobot(checkpoint: str, task: str, episodes: int, seed: int) -> dict:
    """Roll LeRobot's policy out in polcache's env: LeRobot's select_action queue executes its 8-action
    chunks; a chunk's latency is the call that plans it (pre-processing, DDIM-10, post-processing)."""
    import torch
    from lerobot.utils.constants import ACTION

    from polcache.envs import make_env

    policy, pre, post = load_lerobot(checkpoint)
    params = sum(p.numel() for p in policy.parameters())
    env = make_env(task, seed=seed)
    per_episode, latencies = [], []
    for i in range(episodes):
        torch.manual_seed(seed + i)
        policy.reset()
        obs, success, done, steps = env.reset(seed=seed + i), False, False, 0
        while not (done or success) and steps < env.max_episode_steps:
            planning = len(policy._queues[ACTION]) == 0
            t0 = time.perf_counter()
            action = lerobot_action(policy, pre, post, obs["state"])
            if planning:
                latencies.append(time.perf_counter() - t0)
            obs, _, done, info = env.step(action[0].numpy())
            steps += 1
            success = bool(info.get("success"))
        per_episode.append({"seed": seed + i, "success": success, "length": steps})
        print(f"  lerobot episode {i + 1}/{episodes}: {'success' if success else 'fail'} at {steps} steps", flush=True)
    return {"params": params, **episode_summary(per_episode), "chunk_ms": percentiles_ms(latencies)}


def evaluate_polcache(reference: dict, run: Path, task: str, episodes: int, seed: int) -> dict:
    """polcache's MT10 checkpoint of `task` rerun on the same seeds in this process."""
    from polcache.sim.evaluate import evaluate

    backend = load_polcache(reference, run)
    result = evaluate(backend, task, episodes, seed=seed, progress=False)
    per_episode = [{"seed": e["seed"], "success": e["success"], "length": e["length"]}
                   for e in result.per_episode]
    return {"params": sum(p.numel() for p in backend.policy.parameters()), **episode_summary(per_episode),
            "chunk_ms": result.latency_ms}


def latency_side_by_side(lerobot_checkpoint: str, reference: dict, run: Path, task: str, calls: int,
                         seed: int) -> dict:
    """Both policies' chunk latency on the same observations, alternating call by call in one
    process, so load on the machine hits both alike (the evaluations above ran at other times)."""
    from polcache.envs import make_env

    policy, pre, post = load_lerobot(lerobot_checkpoint)
    backend = load_polcache(reference, run)
    env = make_env(task, seed=seed)
    times: dict[str, list[float]] = {"lerobot": [], "polcache": []}
    for i in range(calls + LATENCY_WARMUP):
        state = np.asarray(env.reset(seed=seed + i)["state"], np.float32)
        policy.reset()  # an empty queue: the next call plans a chunk
        t0 = time.perf_counter()
        lerobot_action(policy, pre, post, state)
        t1 = time.perf_counter()
        backend.predict({"state": np.repeat(state[None, None], backend.spec.n_obs_steps, axis=1)}, seed=i)
        t2 = time.perf_counter()
        if i >= LATENCY_WARMUP:
            times["lerobot"].append(t1 - t0)
            times["polcache"].append(t2 - t1)
    result = {name: percentiles_ms(t) for name, t in times.items()}
    return {**result, "calls": calls, "lerobot_over_polcache_p50": result["lerobot"]["p50"] / result["polcache"]["p50"]}


def row(name: str, params: int, cpu_s: float, wall_s: float, steps: int, r: dict) -> dict:
    n = r["episodes"]
    return {"policy": name, "params": f"{params / 1e6:.1f}M", "train CPU min": f"{cpu_s / 60:.1f}",
            "train wall min": f"{wall_s / 60:.1f}", "steps": steps,
            "success": f"{r['successes'] / n:.0%} ({r['successes']}/{n})",
            "95% CI": "{:.0%}-{:.0%}".format(*r["ci95"]),
            "within 200 steps": f"{r['successes_200'] / n:.0%} ({r['successes_200']}/{n})",
            "95% CI (200)": "{:.0%}-{:.0%}".format(*r["ci95_200"]), "mean length": f"{r['mean_length']:.0f}",
            "chunk p50 ms": f"{r['chunk_ms']['p50']:.1f}", "chunk p95 ms": f"{r['chunk_ms']['p95']:.1f}"}


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    atomic_write_text(path, json.dumps(result, indent=2))  # an interrupted run never leaves half a stage
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="push-v3", help="the Meta-World task (default push-v3)")
    ap.add_argument("--suite", type=Path, default=SUITE,
                    help=f"polcache's MT10 suite run holding <task>/result.json and <task>/run (default {SUITE})")
    ap.add_argument("--dataset", type=Path, required=True,
                    help="polcache's LeRobot export of the task's demonstrations")
    ap.add_argument("--work", type=Path, required=True, help="folder for the derived dataset, runs and caches")
    ap.add_argument("--minutes", type=float, nargs="+", default=[8.8],
                    help="training budgets in CPU minutes (polcache's push-v3 run: 8.8 minutes of one core, reach-v3 7.0)")
    ap.add_argument("--down-dims", default="128,256,512",
                    help="the UNet's widths: the issue's 17M-param UNet (LeRobot's default 512,1024,2048 is 250M)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000, help="first evaluation seed (polcache's MT10 suite: 1000)")
    ap.add_argument("--latency-calls", type=int, default=100,
                    help="chunks per policy in the side-by-side latency comparison (default 100)")
    args = ap.parse_args()

    import lerobot
    import torch

    torch.set_num_threads(1)
    shim = check_torchvision_shim()
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = derive_dataset(args.dataset, args.work / f"{args.task}_50demos_lerobot_split", args.task)
    rate = probe(dataset, args.work, args.down_dims, args.task)
    reference = json.loads((args.suite / args.task / "result.json").read_text())
    polcache_eval = cached(args.work / f"polcache_eval_{args.episodes}.json",
                           lambda: evaluate_polcache(reference, args.suite / args.task / "run", args.task,
                                                     args.episodes, args.seed))
    # polcache's run: one process, one thread, a core of its own (the other task on the other core)
    rows = [row("polcache recommended (DP-T, DDIM-16)", polcache_eval["params"], reference["train_seconds"],
                reference["train_seconds"], reference["train_steps"], polcache_eval)]
    runs = []
    for minutes in args.minutes:
        trained = train_budget(dataset, args.work, minutes, rate, args.down_dims, args.task)
        run_dir = Path(trained["checkpoint"]).parents[2]
        result = cached(run_dir.parent / f"{run_dir.name}.eval_{args.episodes}.json",
                        lambda: evaluate_lerobot(trained["checkpoint"], args.task, args.episodes, args.seed))
        runs.append({**trained, "eval": result})
        rows.append(row(f"LeRobot DiffusionPolicy ({minutes:g} CPU min budget, DDIM-10)", result["params"],
                        trained["train_cpu_seconds"], trained["train_wall_seconds"], trained["steps"], result))
    print_table(rows, COLUMNS)
    side = latency_side_by_side(runs[0]["checkpoint"], reference, args.suite / args.task / "run", args.task,
                                args.latency_calls, args.seed)
    print(f"chunk latency side by side ({args.latency_calls} calls each, alternating, 1 thread, batch 1): LeRobot p50 "
          f"{side['lerobot']['p50']:.1f} ms, polcache p50 {side['polcache']['p50']:.1f} ms: "
          f"LeRobot {side['lerobot_over_polcache_p50']:.1f}x slower per chunk")
    write_json(RESULTS / ("peer_lerobot.json" if args.task == "push-v3" else f"peer_lerobot_{args.task}.json"), {
        "task": args.task, "episodes": args.episodes, "seed": args.seed, "lerobot": lerobot.__version__,
        "torch": torch.__version__, "torchvision": shim, "probe": rate, "rows": rows,
        "polcache": {"reference": {k: reference[k] for k in ("train_seconds", "train_steps", "successes",
                                                              "episodes", "chunk_latency_ms")},
                     "rerun": polcache_eval},
        "lerobot_runs": runs, "latency_side_by_side": side})


if __name__ == "__main__":
    main()
