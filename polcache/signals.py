"""Signals around a command's work: SIGTERM handled as Ctrl-C yet told apart (polcache_client.signals,
shared with the robot's control loop), and interrupts held during the save an interrupted command
makes on its way out."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from polcache_client.signals import interrupt_signal, sigterm_as_interrupt

__all__ = ["how_stopped", "interrupts_held", "sigterm_as_interrupt"]


def how_stopped(exc: KeyboardInterrupt) -> str:
    """What a command says it was: interrupted (Ctrl-C), terminated (SIGTERM) or hung up (SIGHUP)."""
    return {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(interrupt_signal(exc), "hung up (SIGHUP)")


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

