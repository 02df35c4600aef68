"""SIGTERM handled as Ctrl-C, yet told apart: what a process manager's stop (systemd, docker,
`polcache launch`) must get from a process that has something to finish first, such as
safe-stopping the robot (ControlLoop.run) or saving a training run (polcache's commands); and
interrupts held while the robot's safe stop runs, so a second press does not cut it short."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


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


@contextmanager
def interrupts_deferred(what: str) -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM are held until the block ends, then raised (KeyboardInterrupt,
    Terminated), so the second press people give a stopping program does not cut `what` short (a
    robot's safe stop left half-sent). Ctrl-C pressed twice inside is raised at once: a `what` that
    hangs can still be left. Nothing is raised after the block while an exception is already on its
    way out (the stop a failure or an interrupt made: that one propagates). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[KeyboardInterrupt] = []

    def on_interrupt(signum, frame):
        if signum == signal.SIGINT and any(type(h) is KeyboardInterrupt for h in held):
            log.warning("%s: abandoned (Ctrl-C twice)", what)
            raise KeyboardInterrupt
        held.append(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
        if signum == signal.SIGINT:
            log.warning("%s first (Ctrl-C again to abandon it)", what)

    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held and sys.exc_info()[1] is None:
        raise held[0]
