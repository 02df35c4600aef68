"""`polcache train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from polcache.cli_types import DEVICE_HELP, FRESH_HELP, add_progress_option, config_file
from polcache.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a diffusion policy from a recorded dataset",
        description="Train a policy of the family the config names (policy.family: dp-t or vla). Re-running the "
                    "same command resumes from OUT/last. Multi-GPU/CPU: torchrun --standalone --nproc_per_node N -m "
                    "polcache.cli train --config ...")
    p.add_argument("--config", required=True, type=config_file, help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value, e.g. train.steps=1000")
    p.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_progress_option(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from polcache.train.loop import launch_rank, train

    cfg = load_config(args.config, args.overrides)
    path = train(cfg, fresh=args.fresh, progress=not args.no_progress, device=args.device)
    if launch_rank() == 0:  # under torchrun, one line for the run, not one per process
        announce_checkpoint(path)
    return 0


def announce_checkpoint(path: Path) -> None:
    """A trained checkpoint's path, and the commands that take it next (eval with --task where the
    checkpoint names none: a multi-task run, a LeRobot root's)."""
    from polcache.jsonfile import read_json_object
    from polcache.policy.checkpoint import trained_tasks

    print(f"checkpoint: {path}")
    eval_ = f"polcache eval --checkpoint {path} (in simulation)"
    if not read_json_object(path / "meta.json").get("task"):
        tasks = trained_tasks(path).get("tasks")
        eval_ = (f"polcache eval --checkpoint {path} --task TASK (in simulation"
                 f"{'; TASK one of ' + ', '.join(tasks) if tasks else ''})")
    print(f"next: {eval_}, polcache calibrate --checkpoint {path} (a cache schedule), polcache serve --checkpoint "
          f"{path} (for robots)")
