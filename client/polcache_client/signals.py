"""SIGTERM handled as Ctrl-C, yet told apart: what a process manager's stop (systemd, docker,
`polcache launch`) must get from a process that has something to finish first, such as
safe-stopping the robot (ControlLoop.run) or saving a training run (polcache's commands); and
interrupts held while the robot's safe stop runs, so a second press does not cut it short."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) raised as Ctrl-C, so the same cleanup runs (the robot's safe stop), yet
    told apart: a process may then exit 128 + its signal (143 for SIGTERM, the status a process
    manager expects; 129 for SIGHUP), not 130."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signal.Signals(signum)


def interrupt_signal(exc: KeyboardInterrupt) -> signal.Signals:
    """The signal behind an interrupt: SIGINT for Ctrl-C, else the Terminated's own."""
    return exc.signum if isinstance(exc, Terminated) else signal.SIGINT


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """The exit status after an interrupt, 128 + its signal: 130 (Ctrl-C), 143 (SIGTERM), 129 (SIGHUP)."""
    return 128 + interrupt_signal(exc)


@contextmanager
def sigterm_as_interrupt(replace: bool = True) -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (a KeyboardInterrupt), so the same cleanup runs as for
    Ctrl-C; so does SIGHUP where its action is the default (ending the process). A second signal is
    ignored while that cleanup runs. `replace=False`: SIGTERM too only where it would otherwise end
    the process outright, leaving a program's own handler alone. Outside the main thread (where no
    signal handler can be set) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGHUP too (the terminal or SSH session that ran it closed): its default also ended the process
    # outright, the robot still executing its last command; only where it is the default (nohup ignores it)
    taken = [sig for sig in (signal.SIGTERM, signal.SIGHUP)
             if signal.getsignal(sig) is signal.SIG_DFL or (replace and sig == signal.SIGTERM)]

    def interrupt(signum, frame):
        for sig in taken:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    interrupt.raises_terminated = True  # interrupts_deferred holds a SIGHUP it would raise

    previous = {sig: signal.signal(sig, interrupt) for sig in taken}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def interrupts_deferred(what: str) -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM are held until the block ends, then delivered: raised
    (KeyboardInterrupt, Terminated), or handed to the program's own handler where it set one, so the
    second press people give a stopping program does not cut `what` short (a robot's safe stop left
    half-sent). Ctrl-C pressed twice inside is raised at once: a `what` that hangs can still be
    left. A signal the program ignores stays ignored. A block that itself raised (a stop that failed)
    still gets its signal: raised with the block's exception as its context, as a program that retries
    after hardware errors must not swallow an operator's stop; so does one called while the program
    handles an exception (an `except` that carries on). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def on_interrupt(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in held:
            log.warning("%s: abandoned (Ctrl-C twice)", what)
            raise KeyboardInterrupt
        held.append(signum)
        if signum == signal.SIGINT:
            log.warning("%s first (Ctrl-C again to abandon it)", what)

    hangup = signal.getsignal(signal.SIGHUP)  # held where it would end the process or raise (sigterm_as_interrupt)
    candidates = (signal.SIGINT, signal.SIGTERM) + (
        (signal.SIGHUP,) if hangup is signal.SIG_DFL or getattr(hangup, "raises_terminated", False) else ())
    previous = {sig: signal.signal(sig, on_interrupt) for sig in candidates
                if signal.getsignal(sig) is not signal.SIG_IGN}
    abandoned = False  # Ctrl-C twice: that KeyboardInterrupt is the delivery
    try:
        yield
    except KeyboardInterrupt:
        abandoned = True
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held and not abandoned:
            _deliver(held[0], previous[held[0]])


def _deliver(signum: int, handler: object) -> None:
    """A held signal, as it would have been had it not waited: the program's own handler, or the
    interrupt polcache raises for it (Ctrl-C's KeyboardInterrupt, SIGTERM's and SIGHUP's Terminated)."""
    raises = handler is signal.default_int_handler or getattr(handler, "raises_terminated", False)
    if callable(handler) and not raises:
        handler(signum, None)
        return
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)
