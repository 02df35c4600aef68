"""`polcache calibrate`: calibrate a checkpoint and write its block cache schedule."""

from __future__ import annotations

import argparse

from polcache.cli_types import (DEVICE_HELP, add_progress_option, add_sampler_options, non_negative_int, positive_int,
                                seed_int, thread_count)
from polcache.extras import install_hint


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="calibrate a checkpoint and write a block-wise cache schedule (BAC)",
        description="Run uncached sampling on calibration observations (windows of --dataset or of the "
                    "checkpoint's training dataset, else environment resets), measure every block's delta "
                    "similarity across denoising steps, solve the Adaptive Caching Scheduler per block and "
                    "apply Bubbling Union. Writes the "
                    "schedule JSON (use it with `polcache eval --cache FILE`) and a heatmap PNG beside it.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--budget", type=positive_int, required=True, help="update steps per block S (1..K)")
    p.add_argument("--bu-blocks", type=non_negative_int,
                   help="blocks widened by Bubbling Union (paper: 5 in simulation, 3 on robots; default 5, or "
                        "every block of a model with fewer)")
    add_sampler_options(p)
    p.add_argument("--samples", type=positive_int, default=32, help="calibration observations (default 32)")
    p.add_argument("--dataset", help="dataset (polcache zarr or LeRobot root) to take them from (default: the "
                   "checkpoint's training dataset where it is found and is that data, else environment resets)")
    p.add_argument("--method", choices=["bac", "blockwise", "unified"], default="bac",
                   help="bac: ACS + Bubbling Union (default); blockwise: ACS per block; unified: one ACS for all")
    p.add_argument("--objective", choices=["error-bound", "similarity"], default="error-bound",
                   help="what ACS optimises per block: error-bound (default) minimises a first-order bound on "
                        "the action error, weighting each step by how strongly its errors reach the actions; "
                        "similarity maximises the cosine similarity kept (the paper's BAC)")
    p.add_argument("--no-force-last", action="store_true",
                   help="do not recompute every block at the final step (the authors' code does)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for observation choice and sampling noise")
    p.add_argument("--batch-size", type=positive_int, default=8, help="observations per calibration batch")
    p.add_argument("--check", type=check_count, default=16,
                   help="held-out observations to check the schedule on against uncached sampling, same noise: "
                        "mean error, worst action, roughness (default 16; 0: no check)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--threads", type=thread_count, default=1,
                   help="torch intra-op threads (default 1: shared CPUs oversubscribe badly)")
    p.add_argument("--out", required=True, help="schedule JSON to write, a .json name (the heatmap goes to the same name .png); an existing "
                        "file is replaced only if it is a schedule, and an existing .png only with its schedule")
    add_progress_option(p)
    p.set_defaults(handler=_run)


def check_count(text: str) -> int:
    """--check: 0 (no check) up to as many observations as a calibration may take."""
    from polcache.cache.calibrate import MAX_SAMPLES

    n = non_negative_int(text)
    if n > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"expected 0..{MAX_SAMPLES} held-out observations, got {n}")
    return n


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    import torch

    from polcache.cache.calibrate import calibrate_checkpoint, check_schedule

    torch.set_num_threads(args.threads)
    schedule = calibrate_checkpoint(
        args.checkpoint, args.out, args.budget, args.bu_blocks, args.sampler, args.steps, args.samples,
        args.method, not args.no_force_last, args.seed, args.batch_size, args.device, not args.no_progress,
        args.objective, args.dataset)
    kept = schedule.kept_similarity()
    title = (f"{schedule.method} schedule ({schedule.objective} objective): {schedule.sampler} K={schedule.steps}, "
             f"budget {schedule.budget}")
    if schedule.method == "bac":
        title += f", Bubbling Union over {schedule.bu_blocks} blocks (*)"
    table = Table(title=title)
    table.add_column("block")
    table.add_column("L1 score", justify="right")
    table.add_column("updates", justify="right")
    table.add_column("mean similarity kept", justify="right")
    table.add_column("update steps")
    for i, (name, steps) in enumerate(schedule.update_steps.items()):
        star = " *" if name in schedule.bu_selected else ""
        table.add_row(name + star, f"{schedule.calibration.l1[i]:.4f}", str(len(steps)), f"{kept[name]:.4f}",
                      " ".join(map(str, steps)))
    console = Console()
    console.print(table)
    total = schedule.steps * len(schedule.update_steps)
    console.print(f"block evaluations {schedule.block_evals} of {total} uncached: compute limit "
                  f"{total / schedule.block_evals:.2f}x; calibration: {schedule.calibration.source}",
                  markup=False, soft_wrap=True)  # one line in a log too (a pipe is 80 columns to rich)
    png = Path(args.out).with_suffix(".png")
    console.print(f"wrote {args.out} and {png}" if png.exists() else
                  f"wrote {args.out} (no heatmap: matplotlib is not installed; {install_hint('matplotlib')})",
                  markup=False, soft_wrap=True)
    if args.check:  # after the schedule is written and said so: a Ctrl-C here loses only the check
        checked = check_schedule(args.checkpoint, schedule, args.check, args.samples, args.seed, args.device,
                                 args.dataset)
        console.print(_checked_line(checked), markup=False, soft_wrap=True)
    return 0


def _checked_line(checked: dict[str, float]) -> str:
    """The held-out check, with a larger budget suggested where the chunks came out rough: a cached
    plan's mean error can be small while its worst action and its chunks' smoothness are not."""
    from polcache.cache.check import ROUGH_JERK_RATIO

    if not checked["observations"]:
        return "not checked: the calibration used every window of the dataset (no held-out observation left)"
    jerk = checked["jerk_ratio"]
    line = (f"checked on {checked['observations']:.0f} held-out observations against uncached sampling (same "
            f"noise): NMSE {checked['nmse']:.2g}, worst action off by {checked['max_dev']:.2g} (normalised units), "
            + ("chunks too short to measure their jerk" if jerk is None else f"chunks {jerk:.2f}x as jerky"))
    if jerk is not None and jerk > ROUGH_JERK_RATIO:
        line += (f"; rougher than {ROUGH_JERK_RATIO:g}x: a larger --budget smooths them at some speed (BENCHMARKS.md, "
                 f"'The budget, not the objective')")
    return line
