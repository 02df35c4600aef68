"""A task suite as one resumable job: per task, record demonstrations, train a config, evaluate.

Each task is independent, so tasks run in parallel: local worker processes by default, or Ray
tasks on an existing cluster. Every finished task leaves `OUT/<task>/result.json` (written
atomically); a rerun skips tasks whose result matches the requested run and resumes a
half-trained one from its checkpoint, so an interrupted suite picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from polcache.errors import CheckpointError, PolcacheError
from polcache.extras import install_hint
from polcache.jsonfile import read_json_object

if TYPE_CHECKING:
    from polcache.config import ExperimentConfig

SUITES = {
    # Meta-World's MT10 (metaworld.env_dict.MT10_V3), in Meta-World's order.
    "mt10": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"),
    # Our language test (envs/pad_reach.py): one scene, the instruction names the pad.
    "pad-reach": ("pad-reach-left", "pad-reach-middle", "pad-reach-right"),
}


@dataclass(frozen=True)
class SuiteRun:
    """What one suite run asks of every task; a stored result is reused only if it matches."""

    config: str
    overrides: tuple[str, ...] = ()
    demos: int = 50
    demo_seed: int = 0
    episodes: int = 50
    eval_seed: int = 1000
    max_steps: int | None = None  # episode cap for evaluation (None: the task's own, 500 for Meta-World)
    sampler: str | None = None
    steps: int | None = None
    untrained: bool = False  # evaluate the config's policy at initialisation (the floor of the table)
    action_steps: int | None = None  # executed actions per chunk at evaluation (None: the config's)
    ensemble_decay: float | None = None  # temporal ensembling at evaluation (None: off)
    checkpoint: str = "last"  # which checkpoint of a run to evaluate: last, or best (validation; did not beat last)
    threads: int = 1

    def key(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "threads"}


@dataclass
class TaskResult:
    task: str
    run: dict
    success_rate: float
    successes: int
    episodes: int
    ci95: list[float]
    mean_episode_length: float
    chunk_latency_ms: dict
    train_seconds: float
    train_steps: int
    demos: int
    extra: dict = field(default_factory=dict)


def resolve_tasks(spec: str) -> list[str]:
    """'mt10' or a comma-separated task list -> task names (checked against the registry)."""
    from polcache.envs import list_tasks

    tasks = list(SUITES[spec.lower()]) if spec.lower() in SUITES else [t.strip() for t in spec.split(",") if t.strip()]
    known = set(list_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise PolcacheError(f"tasks: unknown {unknown or spec!r}; give a suite ({', '.join(SUITES)}) or task names")
    return tasks


def _stored(path: Path, run: SuiteRun) -> TaskResult | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("run") != run.key():
        return None
    try:
        return TaskResult(**data)
    except TypeError:  # written by a version with other fields: run again
        return None


def run_task(task: str, run: SuiteRun, out: str | Path) -> TaskResult:
    """Record (once), train (resuming) and evaluate one task; the result is also stored under out/task."""
    import torch

    from polcache.atomic import atomic_write_text
    from polcache.config import load_config
    from polcache.data import EpisodeStore
    from polcache.envs import record_demonstrations
    from polcache.policy.loader import load_backend
    from polcache.sim.evaluate import Rollout, evaluate
    from polcache.train.loop import save_initial, train

    torch.set_num_threads(run.threads)
    root = Path(out) / task
    result_path = root / ("untrained.json" if run.untrained else "result.json")
    stored = _stored(result_path, run)
    if stored is not None:
        return stored
    data = Path(out) / "data" / f"{task}_{run.demos}demos_seed{run.demo_seed}.zarr"
    if not data.exists():
        # Up to twice the attempts, so tasks whose expert sometimes fails still get `demos` episodes.
        record_demonstrations(task, 2 * run.demos, data, seed=run.demo_seed, progress=False, keep=run.demos)
    cfg = load_config(run.config, [*run.overrides, f"task={task}", f"dataset={data}", f"train.threads={run.threads}"])
    # a folder per training recipe: one that changed (an override, the demos, the config file) trains anew; it
    # had resumed the old run ("nothing left to train") and recorded the old weights under the new recipe
    cfg.out = str(root / ("untrained" if run.untrained else f"run-{recipe_id(cfg)}"))
    t0 = time.time()
    try:
        checkpoint = save_initial(cfg) if run.untrained else train(cfg, progress=False)
    except CheckpointError as exc:  # training's remedy is its --fresh flag; here the run's folder is the suite's
        raise CheckpointError(f"{task}: {exc} (for the suite: remove {cfg.out} to train this task's run again, "
                              f"or give another --out)") from None
    # Summed over resumed segments when the log has them; an untrained row trained for 0 s.
    train_seconds = 0.0 if run.untrained else (_train_seconds(Path(cfg.out)) or time.time() - t0)
    if run.checkpoint == "best" and (checkpoint.parent / "best").exists():
        checkpoint = checkpoint.parent / "best"
    backend = load_backend(checkpoint, sampler=run.sampler, steps=run.steps)
    what = backend.describe()
    res = evaluate(backend, task, run.episodes, run.eval_seed, progress=False,
                   rollout=Rollout(run.max_steps, run.action_steps, run.ensemble_decay))
    result = TaskResult(
        task=task, run=run.key(), success_rate=res.success_rate, successes=res.successes, episodes=res.episodes,
        ci95=list(res.ci95), mean_episode_length=res.mean_episode_length, chunk_latency_ms=res.latency_ms,
        train_seconds=round(train_seconds, 1), train_steps=int(_checkpoint_step(checkpoint)),
        demos=EpisodeStore.open(data).num_episodes,
        extra={"checkpoint": str(checkpoint), "sampler": what["sampler"], "denoising_steps": what["steps"],
               "max_steps": res.extra.get("max_steps"), "per_episode": res.per_episode})
    atomic_write_text(result_path, json.dumps(asdict(result), indent=1))
    return result


def recipe_id(cfg: "ExperimentConfig") -> str:
    """What decides a task's trained weights, as 8 hex digits: the whole resolved config (its dataset
    names the demos and their seed) but where it is written and how many threads train it."""
    from polcache.config import to_dict

    recipe = to_dict(cfg)
    recipe.pop("out")
    recipe["train"].pop("threads")
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _train_seconds(run_dir: Path) -> float:
    """Time spent training, from train_log.jsonl: its last elapsed_s, which counts on across resumed
    segments from the checkpoint each resumed (work lost to a crash after a checkpoint is not counted)."""
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return 0.0
    elapsed = [rec["elapsed_s"] for rec in map(json.loads, lines) if "elapsed_s" in rec]
    return elapsed[-1] if elapsed else 0.0


def _checkpoint_step(checkpoint: Path) -> int:
    return int(read_json_object(Path(checkpoint) / "meta.json", CheckpointError).get("step", 0))


def run_suite(tasks: Sequence[str], run: SuiteRun, out: str | Path, workers: int = 1, ray_address: str | None = None,
              on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run every task (in parallel) and return results in task order. `ray_address` ('auto',
    'ray://host:port' or 'local') runs each task as a Ray task instead of a local process."""
    Path(out).mkdir(parents=True, exist_ok=True)
    results: dict[str, TaskResult] = {}
    if ray_address:
        for r in _run_on_ray(tasks, run, out, ray_address):
            results[r.task] = r
            _keep_locally(r, run, out)
            if on_result:
                on_result(r)
    elif workers <= 1:
        for t in tasks:
            results[t] = run_task(t, run, out)
            if on_result:
                on_result(results[t])
    else:
        env = {"OMP_NUM_THREADS": str(run.threads), "MKL_NUM_THREADS": str(run.threads)}
        os.environ.update(env)  # inherited by the worker processes before torch starts there
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run_task, t, run, out): t for t in tasks}
            for fut in as_completed(futures):
                r = fut.result()
                results[r.task] = r
                if on_result:
                    on_result(r)
    return [results[t] for t in tasks]


def _keep_locally(result: TaskResult, run: SuiteRun, out: str | Path) -> None:
    """Store a result returned by a cluster worker here too (its own copy may be on another machine)."""
    from polcache.atomic import atomic_write_text

    path = Path(out) / result.task / ("untrained.json" if run.untrained else "result.json")
    if _stored(path, run) is None:
        atomic_write_text(path, json.dumps(asdict(result), indent=1))


def _run_on_ray(tasks: Sequence[str], run: SuiteRun, out: str | Path, address: str) -> list[TaskResult]:
    try:
        import ray
    except ImportError:
        raise PolcacheError(f"--ray needs Ray: {install_hint('ray')}") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "local" else address, num_cpus=None, log_to_driver=False,
                     include_dashboard=False)
        except ConnectionError as exc:  # no cluster at that address
            raise PolcacheError(f"--ray {address}: no Ray cluster to join ({exc}); start one (`ray start --head`) "
                                f"or use --ray local") from None
    try:
        remote = ray.remote(num_cpus=run.threads)(run_task)
        refs = [remote.remote(t, run, str(Path(out).resolve())) for t in tasks]
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()
