"""Train and evaluate one config on a task suite (Meta-World MT10 by default): one row per task
plus the mean, with 95% intervals, training time and chunk latency.

    python benchmarks/bench_suite.py --config configs/recommended_cpu.yaml             # MT10, 2 local workers
    python benchmarks/bench_suite.py --config configs/recommended_cpu.yaml --untrained # the same table, untrained
    python benchmarks/bench_suite.py --tasks push-v3,door-open-v3 --set train.epochs=100
    python benchmarks/bench_suite.py --ray auto           # tasks as Ray tasks on an existing cluster

Per task: N expert demonstrations (seeds demo-seed..), the config trained on them, then
--episodes evaluation episodes on seeds disjoint from the demonstrations. Resumable: rerunning
the same command reuses finished tasks and resumes interrupted training (OUT/<task>/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MUJOCO_GL", "egl")

from common import RESULTS, print_table, write_json  # noqa: E402

from polcache.cli import OneLineParser  # noqa: E402
from polcache.cli_types import non_negative_float, non_negative_int, positive_int, thread_count  # noqa: E402
from polcache.errors import PolcacheError  # noqa: E402
from polcache.sim.stats import wilson_interval  # noqa: E402
from polcache.sim.suite import SuiteRun, TaskResult, resolve_tasks, run_suite  # noqa: E402

SHORT_CAP = 200  # LeRobot's evaluations cap Meta-World episodes here


def short_cap(results: list[TaskResult]) -> int:
    """The N of the "within N steps" column: LeRobot's 200, or the cap the episodes actually ran under
    where that is lower (a column about steps no episode reached would only repeat the success one)."""
    return min([SHORT_CAP, *(r.extra["max_steps"] for r in results)])


def columns(cap: int) -> list[str]:
    return ["task", "success", "95% CI", f"within {cap} steps", "mean length", "train min", "steps", "chunk p50 ms"]


def within(r: TaskResult, cap: int) -> int:
    """Successes an evaluation capped at `cap` steps would count: episodes end at the first success
    and rollouts are seeded, so the first `cap` steps are the same run."""
    return sum(e["success"] and e["length"] <= cap for e in r.extra["per_episode"])


def row(r: TaskResult, cap: int) -> dict:
    lo, hi = r.ci95
    return {"task": r.task, "success": f"{r.success_rate:.0%} ({r.successes}/{r.episodes})", "95% CI": f"{lo:.0%}-{hi:.0%}",
            f"within {cap} steps": f"{within(r, cap) / r.episodes:.0%}", "mean length": f"{r.mean_episode_length:.0f}",
            "train min": f"{r.train_seconds / 60:.1f}",
            "steps": r.train_steps, "chunk p50 ms": f"{r.chunk_latency_ms['p50']:.1f}"}


def mean_row(results: list[TaskResult], cap: int) -> dict:
    ok, n = sum(r.successes for r in results), sum(r.episodes for r in results)
    lo, hi = wilson_interval(ok, n)
    return {"task": "mean", "success": f"{ok / n:.1%}", "95% CI": f"{lo:.0%}-{hi:.0%}",
            f"within {cap} steps": f"{sum(within(r, cap) for r in results) / n:.1%}",
            "mean length": f"{sum(r.mean_episode_length for r in results) / len(results):.0f}",
            "train min": f"{sum(r.train_seconds for r in results) / 60:.1f} total",
            "steps": "", "chunk p50 ms": f"{sorted(r.chunk_latency_ms['p50'] for r in results)[len(results) // 2]:.1f}"}


def build_parser() -> OneLineParser:
    """Every number is checked by its flag's type, before anything is recorded or trained."""
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/recommended_cpu.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--tasks", default="mt10", help="a suite name (mt10) or comma-separated task names")
    ap.add_argument("--demos", type=positive_int, default=50)
    ap.add_argument("--demo-seed", type=non_negative_int, default=0)
    ap.add_argument("--episodes", type=positive_int, default=50)
    ap.add_argument("--eval-seed", type=non_negative_int, default=1000,
                    help="evaluation seeds start here (demonstrations use demo-seed..)")
    ap.add_argument("--max-steps", type=positive_int, help="episode cap for evaluation (default: the task's, 500)")
    ap.add_argument("--sampler", choices=["ddpm", "ddim", "flow"])
    ap.add_argument("--steps", type=positive_int, help="denoising steps at evaluation")
    ap.add_argument("--action-steps", type=positive_int,
                    help="executed actions per chunk at evaluation (default: the config's)")
    ap.add_argument("--ensemble", type=non_negative_float, metavar="DECAY",
                    help="temporal ensembling at evaluation (default off)")
    ap.add_argument("--checkpoint", choices=["best", "last"], default="last",
                    help="which checkpoint of each run to evaluate (default last: best/ did not beat it, BENCHMARKS.md)")
    ap.add_argument("--untrained", action="store_true", help="evaluate the config's policy at initialisation")
    ap.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1)), help="local worker processes")
    ap.add_argument("--threads", type=thread_count, default=1, help="torch threads per task")
    ap.add_argument("--ray", metavar="ADDRESS", help="run tasks on Ray: 'auto' (existing cluster), 'ray://host:port' or 'local'")
    ap.add_argument("--out", default=str(RESULTS / "suite"), help="working directory (datasets, runs, per-task results)")
    ap.add_argument("--json", help="summary JSON (default OUT/suite[_untrained].json)")
    ap.checks.append(_seeds_apart)
    return ap


def _seeds_apart(args: argparse.Namespace) -> str | None:
    if args.demo_seed <= args.eval_seed < args.demo_seed + 2 * args.demos:  # the recorder may attempt 2x demos
        return "evaluation seeds overlap the demonstration seeds"
    return None


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    run = SuiteRun(config=args.config, overrides=tuple(args.overrides), demos=args.demos, demo_seed=args.demo_seed,
                   episodes=args.episodes, eval_seed=args.eval_seed, max_steps=args.max_steps, sampler=args.sampler,
                   steps=args.steps, action_steps=args.action_steps,
                   ensemble_decay=args.ensemble, untrained=args.untrained, checkpoint=args.checkpoint, threads=args.threads)
    try:
        tasks = resolve_tasks(args.tasks)
        print(f"{len(tasks)} tasks, {'ray ' + args.ray if args.ray else f'{args.workers} local workers'}, "
              f"out {args.out}")
        results = run_suite(tasks, run, args.out, workers=args.workers, ray_address=args.ray,
                            on_result=lambda r: print(f"done {r.task}: {r.success_rate:.0%} ({r.successes}/"
                                                      f"{r.episodes}), trained {r.train_seconds / 60:.1f} min",
                                                  flush=True))
    except PolcacheError as exc:  # an unknown task, no Ray cluster: one line
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    short = short_cap(results)
    rows = [row(r, short) for r in results] + [mean_row(results, short)]
    cap = results[0].extra.get("max_steps")
    print(f"\nsuccess = Meta-World info['success'] at any step of an episode capped at {cap} steps; "
          f"{args.episodes} episodes per task, seeds {args.eval_seed}-{args.eval_seed + args.episodes - 1}")
    print_table(rows, columns(short))
    name = "suite_untrained.json" if args.untrained else "suite.json"
    write_json(args.json or Path(args.out) / name, {"run": run.key(), "episode_cap": cap, "rows": rows,
                                                     "results": [{k: v for k, v in r.__dict__.items()} for r in results]})


if __name__ == "__main__":
    main()
