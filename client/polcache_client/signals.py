"""SIGTERM handled as Ctrl-C, yet told apart: what a process manager's stop (systemd, docker,
`polcache launch`) must get from a process that has something to finish first, such as
safe-stopping the robot (ControlLoop.run) or saving a training run (polcache's commands)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as Ctrl-C, so the same cleanup runs (the robot's safe stop), yet told apart:
    a process may then exit 143 (128 + SIGTERM), the status a process manager expects, not 130."""


@contextmanager
def sigterm_as_interrupt(replace: bool = True) -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (a KeyboardInterrupt), so the same cleanup runs as for
    Ctrl-C. A second SIGTERM is ignored while that cleanup runs. `replace=False`: only where SIGTERM
    would otherwise end the process outright (its default action), leaving a program's own handler
    alone. Outside the main thread (where no signal handler can be set) a no-op."""
    if threading.current_thread() is not threading.main_thread() or \
            not replace and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
