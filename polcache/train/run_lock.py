"""One training at a time per out= directory.

A second `polcache train` with the same out= (a supervisor restarting a run while an operator
starts it by hand) resumed from the first one's in-flight checkpoint and forked the run, its log
holding each step twice. The run holds an flock on OUT/.train.lock instead."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from polcache.atomic import naming_errors
from polcache.errors import ConfigError

RUN_LOCK = ".train.lock"  # in OUT: held (flock) by the run that writes OUT


@contextmanager
def run_lock(out: Path, rank: int = 0) -> Iterator[None]:
    """Hold an exclusive flock on OUT/.train.lock for the whole run, refusing (ConfigError) a second run
    with the same out= while one holds it: it would resume from the first one's in-flight checkpoint
    and fork the run. The kernel drops the lock when the process dies, so a killed run leaves none
    behind. Under torchrun only rank 0 takes it (the others wait for it in init_process_group, and
    torchrun stops them when it fails); where the filesystem has no locks, the run goes on without."""
    if rank != 0:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / RUN_LOCK
    f = open(lock, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            holder = f"pid {holder}, " if holder.isdigit() else ""
            raise ConfigError(f"out={out}: another training holds it ({holder}lock {lock}); wait for it to end or give "
                              f"another out directory") from None
        except OSError:
            pass  # no locks on this filesystem
        else:
            f.seek(0)
            f.truncate()
            with naming_errors(lock):  # unbuffered: a full disk fails here, named, not again in close()
                os.write(f.fileno(), f"{os.getpid()}\n".encode())
        yield
    finally:
        if created and [p.name for p in out.iterdir()] == [RUN_LOCK]:  # failed before writing anything:
            lock.unlink(missing_ok=True)                                # leave no folder behind
            out.rmdir()
        f.close()
