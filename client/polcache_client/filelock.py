"""One writer at a time: an flock on a small file beside what is written, holding the writer's pid.
The kernel drops it when the process dies, so a killed writer leaves nothing that blocks the next;
the file is removed when the writer is done (while still held, and a writer that took it between
its open and its flock sees the path name another file, and takes that one)."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, every writer proceeds
    fcntl = None  # type: ignore[assignment]


class LockHeld(Exception):
    """Another process holds the lock; `holder` is its pid as it wrote it ("" where unreadable)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold(lock: Path) -> int | None:
    """Take the lock at `lock` (created if missing) and write this process's pid into it; the
    descriptor to give `release`, or None where the system has no flock. Raises LockHeld."""
    if fcntl is None:
        return None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(holder) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release(lock: Path, fd: int | None) -> None:
    """Remove the lock file and drop the lock (the next writer may take it)."""
    if fd is not None:
        lock.unlink(missing_ok=True)
        os.close(fd)
