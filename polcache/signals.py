"""SIGTERM handled as Ctrl-C, yet told apart: what a process manager's stop (systemd, docker,
`polcache launch`) must get from a command that has something to finish first, such as saving
the training run or safe-stopping the robot."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from polcache.errors import Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (a KeyboardInterrupt), so the same cleanup runs as for
    Ctrl-C and the command exits 143 (128 + SIGTERM) rather than 130. A second SIGTERM is ignored
    while that cleanup runs. Outside the main thread (where no signal handler can be set) a no-op."""
    if threading.current_thread() is not threading.main_thread():
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
def interrupts_held() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM are ignored: for the save an interrupted command makes on its way
    out, which a second press would otherwise cut short (losing the work since the last save) or
    turn into a traceback. SIGKILL still stops it (the saves are atomic). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

