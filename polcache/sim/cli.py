"""`polcache eval`: evaluate a checkpoint in simulation."""

from __future__ import annotations

import argparse
import sys

from polcache.cli_types import (add_backend_options, add_progress_option, backend_options, given_only_with,
                                non_negative_float, non_negative_int, positive_int, seed_int, thread_count)
from polcache.errors import PolcacheError

VIDEO_EPISODES = 3  # episodes recorded as GIFs with --video, unless --video-episodes says


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint in MuJoCo: success rate and latency",
                              description="Roll a checkpoint out in a simulated task; prints success rate with a "
                                          "95% Wilson interval, episode length and per-chunk latency percentiles.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or an artifact from `polcache export`")
    p.add_argument("--task", help="task name (default: the task the checkpoint was trained on)")
    p.add_argument("--episodes", type=positive_int, default=50, help="number of episodes (default 50)")
    p.add_argument("--seed", type=seed_int, default=1000, help="episode i resets with seed S+i (default 1000)")
    p.add_argument("--cache", help="block cache: a schedule JSON from `polcache calibrate`, or a baseline such as "
                                   "uniform:N (see README)")
    p.add_argument("--max-steps", type=positive_int, help="cap each episode at this many steps (default: the "
                                                           "task's own cap, 500 for Meta-World)")
    p.add_argument("--action-steps", type=positive_int, help="execute only the first N actions of each chunk, then "
                                                              "replan (default: the checkpoint's n_action_steps)")
    p.add_argument("--ensemble", type=non_negative_float, metavar="DECAY", help="temporal ensembling of overlapping chunks with the "
                   "robot client's action schedule, weight exp(-DECAY*k) for the k-th newest chunk (default: off)")
    p.add_argument("--delay", type=non_negative_int, default=0, metavar="STEPS",
                   help="simulate a policy that takes STEPS control steps per chunk: the robot executes the previous "
                        "chunk meanwhile (default 0)")
    p.add_argument("--rtc", action="store_true", help="real-time chunking: generate each chunk guided toward the "
                                                      "actions already committed (flow samplers; torch backend)")
    p.add_argument("--instruction", help="language-conditioned policies: follow this instruction in every episode "
                                         "(e.g. another task's, to check the policy listens)")
    p.add_argument("--instructions", choices=["train", "heldout"],
                   help="language-conditioned policies, without --instruction: the task's paraphrases to cycle "
                        "through, those trained on or the held-out ones (default)")
    p.add_argument("--allow-rate-mismatch", action="store_true",
                   help="evaluate even where the task steps at another rate than the policy was trained at (its "
                        "dataset's fps): refused by default, as its success rate would not be the policy's")
    add_backend_options(p)
    p.add_argument("--threads", type=thread_count, default=1,
                   help="torch (or ONNX Runtime) intra-op threads (default 1: fastest at batch 1)")
    p.add_argument("--json", help="write the full result as JSON here (an existing file is replaced only if it is "
                                  "an eval result)")
    p.add_argument("--video", help="directory for GIFs of the first --video-episodes episodes")
    p.add_argument("--video-episodes", type=positive_int,
                   help=f"episodes recorded with --video (default {VIDEO_EPISODES})")
    add_progress_option(p)
    p.checks.append(given_only_with("--video-episodes", "video_episodes", "--video", "video"))
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from polcache.outputs import check_output
    from polcache.policy.loader import load_backend
    from polcache.signals import sigterm_as_interrupt
    from polcache.sim.evaluate import (Rollout, check_result_output, evaluate, result_written_first,
                                       side_by_side_speed)

    if args.json is not None:
        check_result_output(args.json)
    if args.video is not None:
        check_output(args.video, "a folder for GIFs", folder=True, ours=lambda _: True, flag="--video")
    torch.set_num_threads(args.threads)
    backend = load_backend(args.checkpoint, cache=args.cache, threads=args.threads, **backend_options(args))
    if args.task is not None and not args.task.strip():  # an unset shell variable: not "the checkpoint's task"
        raise PolcacheError("--task: empty task name (leave --task out for the checkpoint's task)")
    task = args.task or backend.spec.task
    if not task:
        from polcache.policy.checkpoint import no_task_hint

        raise PolcacheError(f"the checkpoint names no task: pass --task{no_task_hint(args.checkpoint)}")
    if backend.spec.task and task != backend.spec.task:  # allowed (transfer tests), but rarely meant; as sim-robot says
        from polcache.envs.registry import check_task

        check_task(task)  # an unknown one is refused first, not warned about
        print(f"warning: the checkpoint's policy was trained on {backend.spec.task}, this evaluation runs {task}",
              file=sys.stderr)
    with sigterm_as_interrupt():  # TERM reports the finished episodes, like Ctrl-C, and exits 143
        result = evaluate(backend, task, args.episodes, args.seed, progress=not args.no_progress,
                          video_dir=args.video,
                          video_episodes=(args.video_episodes or VIDEO_EPISODES) if args.video else 0,
                          rollout=Rollout(args.max_steps, args.action_steps, args.ensemble, args.delay, args.rtc,
                                          args.instruction, args.instructions),
                          allow_rate_mismatch=args.allow_rate_mismatch)
    what = backend.describe()
    result.extra.update({"checkpoint": args.checkpoint, "backend": what["backend"], "sampler": what["sampler"],
                         "steps": what["steps"], "device": what["device"], "threads": torch.get_num_threads(),
                         "cache": "none", "verify": what.get("verify_candidates", 1)})  # torch only: others refuse N > 1
    if args.verify > 1:  # how many chunks it chose: none where no episode executed enough past steps
        result.extra.update({"verify_min_past": what["verify_min_past"], "verified_chunks": what["verified_chunks"]})
    exported = what["backend"] != "torch"  # the plan is inside the artifact: no uncached comparator to load
    stopped = "interrupted" in result.extra  # Ctrl-C or SIGTERM: report the finished episodes, no speed comparison
    if exported and what["cache"]:
        result.extra["cache"] = what["cache"] | {"spec": what.get("cache_spec")}
    if args.cache and not exported:
        result.extra["cache"] = what["cache"] | {"spec": args.cache}
    # a plan that skips something, against the same checkpoint uncached (--cache none has nothing to compare)
    compare = bool(args.cache) and not exported and not stopped and (what["cache"] or {}).get("method") != "none"
    if compare:
        uncached = load_backend(args.checkpoint, **{**backend_options(args), "candidates": 1})
        result.extra["speedup"] = side_by_side_speed(uncached, backend)
    with result_written_first(args.json, result):
        _say(args, result, backend, what, compare)
    return result.exit_status()


def _say(args: argparse.Namespace, result, backend, what: dict, compare: bool) -> None:
    """The run's summary lines: the result, seam jerk, self-verification, the cache's speedup."""
    print(result.summary())
    if args.instruction is None and (texts := result.extra.get("instructions")):  # said: only --json had them
        print(f"instructions: {len(texts)} {args.instructions or 'heldout'} paraphrase{'s' if len(texts) > 1 else ''} "
              f"of {result.task}, one per episode in turn: {'; '.join(repr(t) for t in texts)}")
    if jerk := result.jerk_line():
        print(jerk)
    if args.verify > 1:
        line, verified = _verify_line(result, backend.spec)
        print(line, file=sys.stdout if verified else sys.stderr)
    if args.cache and what["backend"] != "torch" and "interrupted" not in result.extra:  # README: it times both
        print(f"cache {args.cache}: no speedup timed: the artifact holds only the cached graphs (time the plan on the "
              f"checkpoint, --backend torch, or with benchmarks/bench_export.py)")
    if compare:
        sp = result.extra["speedup"]
        guided = (f"; sampled without real-time chunking, whose guided chunks took p50 {result.latency_ms['p50']:.1f} "
                  "ms in this run" if args.rtc else "")
        print(f"cache {args.cache}: {sp['uncached_ms']:.1f} ms -> {sp['cached_ms']:.1f} ms per chunk "
              f"({sp['speedup']:.2f}x, medians of {sp['calls']} calls side by side{guided})")
        cache = what["cache"]
        if cache.get("dynamic"):
            print(f"threshold cache: {cache['block_evals_mean']} of {cache['block_evals_uncached']} block evaluations "
                  f"per chunk on average over the episodes")


def _verify_line(result, spec) -> tuple[str, bool]:
    """How many chunks self-verification chose, and whether any; where none, a warning that says why: a
    chunk is scored once the robot executed actions at verify_min_past of its past frames' steps, and
    the episodes may end before that."""
    verified, chunks, need = result.extra["verified_chunks"], result.latency_ms["n"], result.extra["verify_min_past"]
    line = f"self-verification: {verified} of {chunks} chunks chosen among {result.extra['verify']} candidates"
    if verified:
        return line, True
    step = sorted(-offset for offset in spec.frame_offsets[:-1])[need - 1]  # the oldest past frame it must reach
    return (f"warning: {line}: none had executed actions at {need} past frames (--verify-min-past; the oldest of them "
            f"{step} steps back), and the episodes were {result.mean_episode_length:.0f} steps long on average: "
            + ("lower --verify-min-past to verify on this task" if need > 1 else
               "each episode's first chunk has no past to check, and the episodes ended before more chunks could be; "
               "longer episodes (--max-steps) verify")), False

