"""CPU affinity and SCHED_FIFO for the launcher's children.

Both are applied in the child between fork and exec, so every thread the program starts later
(torch's pool, ZeroMQ's I/O thread) inherits them; setting them on a pid from outside would
only move the thread that happens to carry that id. Real-time scheduling is a wish, not a
requirement: where it is not permitted the child runs with ordinary scheduling and the launcher
says so in one line (`placement_warning`)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

from polcache.launch.config import Placement

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask the kernel to send SIGTERM if the launcher dies, so a killed launcher leaves nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: children are still stopped by the launcher itself
        pass


def child_setup(placement: Placement) -> Callable[[], None]:
    """The `preexec_fn` that places a child; never raises for refused scheduling (the parent
    reads the child's scheduling back and reports)."""
    cpus = set(placement.cpus)

    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if placement.fifo_priority:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(placement.fifo_priority))
            except OSError:
                pass

    return setup


def placement_warning(name: str, pid: int, placement: Placement) -> str | None:
    """One line if `pid` did not get the SCHED_FIFO priority its placement asks for."""
    if not placement.fifo_priority:
        return None
    try:
        if os.sched_getscheduler(pid) == os.SCHED_FIFO:
            return None
    except OSError:  # already exited; its exit status tells the story
        return None
    return (f"{name}: SCHED_FIFO priority {placement.fifo_priority} is not permitted here (needs CAP_SYS_NICE, which "
            f"root has unless it was dropped, or an rtprio limit); running it with ordinary scheduling")


def describe(placement: Placement) -> str:
    where = "CPUs " + ",".join(map(str, placement.cpus)) if placement.cpus else "any CPU"
    sched = f"SCHED_FIFO {placement.fifo_priority}" if placement.fifo_priority else "ordinary scheduling"
    return f"{where}, {sched}"
