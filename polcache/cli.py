"""The `polcache` command. Thin: each subcommand lives in the module that owns the feature
and exposes `register(subparsers)`; its handler calls one library function that tests call too."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Callable, NoReturn

from polcache.errors import PolcacheError
from polcache.extras import missing_extra
from polcache.signals import how_stopped, sigterm_as_interrupt
from polcache_client.signals import interrupted_status

# Modules that contribute subcommands, in the order `polcache --help` lists them.
COMMAND_MODULES = [
    "polcache.envs.record_cli",
    "polcache.data.cli",
    "polcache.train.cli",
    "polcache.ptp.cli",
    "polcache.sim.cli",
    "polcache.cache.cli",
    "polcache.serve.cli",
    "polcache.sim.robot_cli",
    "polcache.export.cli",
    "polcache.dashboard.cli",
    "polcache.launch.cli",
]


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line, as every other bad input is (argparse prints its whole usage block
    first); subcommands' parsers are of the same class. `checks` judge flags together, which argparse
    cannot (one flag that means nothing without another): each returns the error line or None."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], str | None]] = []
        for name in (None, "store"):  # None: a flag given no action=
            self.register("action", name, _StoreOnce)
        self.given: dict[str, object] = {}  # this parse's flags of one value so far: _StoreOnce

    def parse_known_args(self, args=None, namespace=None):
        self.given = {}
        parsed, extra = super().parse_known_args(args, namespace)
        for check in self.checks:
            if (problem := check(parsed)) is not None:
                self.error(problem)
        if not hasattr(parsed, "command_parser"):  # the innermost (sub)command's parser: it names its --help
            parsed.command_parser = self
        return parsed, extra

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _StoreOnce(argparse._StoreAction):
    """A flag of one value given twice with two values is refused: argparse kept the last silently
    (`serve --bind A --bind B` served on B alone). The same value twice changes nothing and passes."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None:  # a OneLineParser's (only it registers this action)
            if self.dest in parser.given and parser.given[self.dest] != values:
                parser.error(f"{option_string} given twice ({parser.given[self.dest]}, then {values}); it takes one "
                             f"value")
            parser.given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="polcache",
        description="polcache: train, evaluate, accelerate (block-wise caching) and serve transformer diffusion "
                    "policies. `polcache COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives `key=value` overrides only to the first run of positionals; later ones
    # (after an option, e.g. `train --config c.yaml --fresh train.lr=1e-3`) are overrides too.
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    action = getattr(args, f"{args.command}_command", None)  # a nested command's, as in `polcache ptp embed`
    command = f"{args.command} {action}" if action else args.command
    try:
        # every command stops on SIGTERM as on Ctrl-C, saying so (143); one with its own handler keeps it
        with sigterm_as_interrupt(replace=False):
            return int(args.handler(args) or 0)
    except PolcacheError as exc:
        print(f"polcache {command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional library (an extra) this install lacks: what to install
        if (message := missing_extra(exc)) is None:
            raise
        print(f"polcache {command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system's refusal (disk full, read-only, permission), named with its path
        paths = ": ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        print(f"polcache {command}: error: {paths + ': ' if paths else ''}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: 130 (128 + SIGINT); SIGTERM, SIGHUP raised as Terminated: 143, 129
        return _interrupted(command, exc)
    except Exception as exc:  # a library that turned the Ctrl-C it met into its own error (mujoco's import
        if not isinstance(exc.__context__, KeyboardInterrupt):  # into "ImportError: initialization failed")
            raise
        return _interrupted(command, exc.__context__)


def _interrupted(command: str, exc: KeyboardInterrupt) -> int:
    """Say how the command was stopped; its status: 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP."""
    print(f"polcache {command}: {how_stopped(exc)}", file=sys.stderr)
    return interrupted_status(exc)


def one_line(message: str) -> str:
    """A message as one line: some libraries' own (pyarrow's) carry newlines into ours."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def console() -> NoReturn:
    """The `polcache` command: `main`'s status as the process's. Once the command has ended, a Ctrl-C
    or SIGTERM while the process exits (the interpreter's teardown takes about a second with torch
    loaded) is ignored: after a finished export it turned status 0 into 130 with the artifact written,
    and after an interrupted command the documented 130 or 143 into a death by SIGINT (-2 to a
    supervisor)."""
    try:
        status = main()
    except KeyboardInterrupt:  # pressed again while main reported the first
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    console()
