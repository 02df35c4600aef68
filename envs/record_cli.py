"""`polcache record`: scripted-expert demonstrations for a task, written as a dataset."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "record",
        help="record scripted-expert demonstrations for a task",
        description="Run a task's scripted expert and write its successful episodes as a polcache dataset.",
    )
    p.add_argument("--task", required=True, help="task name, e.g. reach-v3 or cue-reach")
    p.add_argument("--episodes", type=int, required=True, help="episodes to attempt (failed ones are dropped)")
    p.add_argument("--keep", type=int, help="stop once this many successful episodes are kept (attempting at most "
                                            "--episodes)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--image", action="store_true", help="also record camera images")
    p.add_argument("--seed", type=int, default=0, help="seed of episode 0; episode i uses seed + i")
    p.add_argument("--cameras", type=lambda s: tuple(c for c in s.split(",") if c), default=None,
                   help="comma-separated cameras (default: the task's usual one); implies --image")
    p.add_argument("--image-size", type=int, default=96, help="square image size in pixels")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from polcache.envs.record import record_demonstrations

    summary = record_demonstrations(
        args.task, args.episodes, args.out, image=args.image, seed=args.seed,
        cameras=args.cameras, image_size=args.image_size, keep=args.keep,
    )
    print(f"wrote {summary['path']}: {summary['episodes']} episodes, {summary['steps']} steps, obs {', '.join(summary['obs_keys'])}")
    return 0
