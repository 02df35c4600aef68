"""Atomic directory writes for things that matter (datasets, checkpoints, schedules).

A sibling temp directory is filled, then swapped into place. On Linux the swap is one
renameat2(RENAME_EXCHANGE): `path` always names a complete directory, the old one or the new,
even if the process is killed mid-swap. Elsewhere (or on a filesystem without it) an existing
directory is renamed aside first and restored if the final rename fails; a kill between the two
renames leaves it aside, and the next reader (`restore`) or writer of `path` puts it back. Temp names carry the
writer's pid, so the next write also removes what killed writers left behind."""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two paths in one step; False where this system or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def restore(path: str | Path) -> Path:
    """Put back the directory that a writer of `path`, killed between its two renames (filesystems
    without an atomic exchange), left set aside as `.NAME.old-*`, so a reader finds the complete old
    one instead of nothing. Every reader of an atomically written path calls this first; it changes
    nothing where `path` exists, or where the writer is still running. Returns `path`."""
    path = Path(path)
    if os.path.lexists(path):
        return path
    try:
        for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
            pid = leftover.name[len(path.name) + 6:].partition("-")[0]
            if pid.isdigit() and not _alive(int(pid)) and leftover.is_dir() and not leftover.is_symlink():
                os.rename(leftover, path)
                break
    except OSError:  # a read-only folder, or another reader restored it first
        pass
    return path


def _recover(path: Path) -> None:
    """Undo what killed writers of `path` left: a directory renamed aside is put back where
    `path` is missing; their temp directories are removed."""
    restore(path)
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*")):
        kind, _, tag = leftover.name[len(path.name) + 2:].partition("-")
        pid = tag.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory to fill; on normal exit it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        yield tmp
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):  # (where it could, tmp now holds the old directory: removed below)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temp file + rename (same filesystem), fsynced first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
