"""`polcache launch`."""

from __future__ import annotations

import argparse

from polcache.cli_types import config_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch", help="start server, dashboard and (simulated) robot together from one config",
        description="Start `polcache serve`, the dashboard and, if the config enables it, `polcache sim-robot` as "
                    "child processes pinned to the config's CPUs (SCHED_FIFO where permitted). The robot starts "
                    "once the server answers a heartbeat. Ctrl-C or SIGTERM stops the robot first (safe stop), "
                    "then the server, then the dashboard. See configs/launch/.")
    p.add_argument("config", type=config_file, help="launch config YAML, e.g. configs/launch/sim.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value, e.g. robot.episodes=5")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from polcache.launch import load_launch_config, run_launch

    return run_launch(load_launch_config(args.config, args.overrides))
