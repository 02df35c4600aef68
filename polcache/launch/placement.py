"""CPU affinity, SCHED_FIFO and the EEVDF time slice for the launcher's children.

All are applied in the child between fork and exec, so every thread the program starts later
(torch's pool, ZeroMQ's I/O thread) inherits them; setting them on a pid from outside would
only move the thread that happens to carry that id. Scheduling is a wish, not a requirement:
where SCHED_FIFO is not permitted (or the kernel has no slice requests) the child runs with
ordinary scheduling and the launcher says so in one line (`placement_warnings`)."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from pathlib import Path
from typing import Callable

from polcache.launch.config import Placement

PR_SET_PDEATHSIG = 1  # linux/prctl.h
SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())  # Jetson: aarch64


class SchedAttr(ctypes.Structure):
    """struct sched_attr (linux/sched/types.h), first version (48 bytes)."""

    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32),
                ("sched_runtime", ctypes.c_uint64), ("sched_deadline", ctypes.c_uint64),
                ("sched_period", ctypes.c_uint64)]


def request_slice(slice_us: int) -> bool:
    """Ask for a `slice_us` time slice under ordinary scheduling (SCHED_OTHER's sched_runtime,
    Linux 6.12+); False where the kernel or libc cannot take the request."""
    if SYS_SCHED_SETATTR is None:
        return False
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=os.SCHED_OTHER, sched_runtime=slice_us * 1000)
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0
    except (OSError, AttributeError):
        return False


def slice_ns(pid: int) -> int | None:
    """The slice the kernel gives `pid` (se.slice in /proc/PID/sched), if it says."""
    try:
        for line in Path(f"/proc/{pid}/sched").read_text().splitlines():
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


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
        if placement.slice_us:
            request_slice(placement.slice_us)
        if placement.fifo_priority:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(placement.fifo_priority))
            except OSError:
                pass

    return setup


def placement_warnings(name: str, pid: int, placement: Placement) -> list[str]:
    """One line for each scheduling wish `pid` did not get (nothing for a child that already exited)."""
    try:
        policy = os.sched_getscheduler(pid)
    except OSError:
        return []
    warnings = []
    if placement.fifo_priority and policy != os.SCHED_FIFO:
        warnings.append(f"{name}: SCHED_FIFO priority {placement.fifo_priority} is not permitted here (needs root, "
                        f"CAP_SYS_NICE or an rtprio limit); running it with ordinary scheduling")
    if placement.slice_us and policy != os.SCHED_FIFO and slice_ns(pid) != placement.slice_us * 1000:
        warnings.append(f"{name}: this kernel did not take the {placement.slice_us} us time slice request "
                        f"(needs Linux 6.12+); running it with the default slice")
    return warnings


def describe(placement: Placement) -> str:
    where = "CPUs " + ",".join(map(str, placement.cpus)) if placement.cpus else "any CPU"
    sched = f"SCHED_FIFO {placement.fifo_priority}" if placement.fifo_priority else "ordinary scheduling"
    if placement.slice_us:
        sched += f", {placement.slice_us} us slice"
    return f"{where}, {sched}"
