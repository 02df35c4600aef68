"""`polcache record`: scripted-expert demonstrations for a task, written as a dataset."""

from __future__ import annotations

import argparse

from polcache.cli_types import name_list, non_negative_float, non_negative_int, seed_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "record",
        help="record scripted-expert demonstrations for a task",
        description="Run a task's scripted expert and write its successful episodes as a polcache dataset.",
    )
    p.add_argument("--task", required=True, help="task name, e.g. reach-v3 or cue-reach; several (comma-separated, or "
                                              "a suite name: mt10, pad-reach) make one multi-task dataset")
    p.add_argument("--episodes", type=positive_int, required=True,
                   help="episodes to attempt per task (failed ones are dropped)")
    p.add_argument("--keep", type=positive_int, help="stop once this many successful episodes are kept per task "
                                            "(attempting at most --episodes)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--image", action="store_true", help="also record camera images")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of episode 0; episode i uses seed + i")
    p.add_argument("--cameras", type=name_list, default=None,
                   help="comma-separated cameras (default: the task's usual one); implies --image")
    p.add_argument("--image-size", type=positive_int, help="square image size in pixels (default 96)")
    p.add_argument("--instructions", type=positive_int, nargs="?", const=64, default=0, metavar="BYTES",
                   help="also record each episode's instruction (one of the task's training paraphrases) as the "
                        "'instruction' observation of BYTES UTF-8 bytes (default 64), for language-conditioned policies")
    p.add_argument("--hold-steps", type=non_negative_int, default=0, metavar="H",
                   help="now and then (10%% of steps) have the robot repeat its last executed action for 1..H steps "
                        "while the expert's own actions are recorded: demonstrations of recovering from stale actions, "
                        "as a policy executing action chunks open loop meets them (H: n_action_steps - 1); default 0")
    p.add_argument("--stop-steps", type=non_negative_int, default=0, metavar="S",
                   help="now and then (10%% of the steps without a hold) have the robot rest for 1..S steps, as when its "
                        "next chunk is late, while the expert's actions are recorded: demonstrations of going on from "
                        "rest short of where the expert was heading; default 0")
    p.add_argument("--action-noise", type=non_negative_float, default=0.0, metavar="SIGMA",
                   help="add Gaussian noise of this standard deviation to every executed action (actions span "
                        "[-1, 1]) while the expert's actions are recorded (DART): demonstrations of coming back to "
                        "the expert's path from off it; default 0")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.checks.append(_image_size_check)
    p.set_defaults(handler=_run)


def _image_size_check(args: argparse.Namespace) -> str | None:
    if args.image_size is not None and not (args.image or args.cameras):  # accepted and ignored: a state-only dataset
        return "argument --image-size: sizes camera images; give --image (or --cameras) with it"
    return None


def _run(args: argparse.Namespace) -> int:
    from polcache.data.store import check_dataset_output
    from polcache.envs import Perturbations, record_demonstrations  # lazily: a renderer error is one line
    from polcache.signals import sigterm_as_interrupt

    from polcache.sim.suite import SUITES

    check_dataset_output(args.out, "--out", demonstrations=True)  # before recording, not after
    tasks = list(SUITES.get(args.task, [t for t in args.task.split(",") if t]))
    with sigterm_as_interrupt():  # TERM stops as Ctrl-C does (the old dataset kept), said and exiting 143
        summary = record_demonstrations(
            tasks[0] if len(tasks) == 1 else tasks, args.episodes, args.out, image=args.image, seed=args.seed,
            cameras=args.cameras, keep=args.keep, instruction_bytes=args.instructions,
            **({} if args.image_size is None else {"image_size": args.image_size}),
            perturb=Perturbations(args.hold_steps, args.stop_steps, args.action_noise), progress=not args.no_progress,
        )
    n = summary["episodes"]
    print(f"wrote {summary['path']}: {n} episode{'' if n == 1 else 's'}, {summary['steps']} steps, "
          f"obs {', '.join(summary['obs_keys'])}")
    return 0
