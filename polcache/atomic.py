"""Atomic directory writes for things that matter (datasets, checkpoints, schedules).

A sibling temp directory is filled, fsynced, then swapped into place, and the parent directory
is fsynced after the swap, so a power loss leaves the old or the new directory, whole. On Linux
the swap is one renameat2(RENAME_EXCHANGE): `path` always names a complete directory, the old
one or the new, even if the process is killed mid-swap. Elsewhere (or on a filesystem without
it: NFS, CIFS, sshfs, older ZFS) an existing directory is renamed aside first and restored if
the final rename fails; a kill between the two renames leaves it aside, and the next reader
(`restore`) or writer of `path` puts it back.

A `path` that is a symbolic link is written through to the link's target, so the link keeps
pointing at the fresh data. Each writer holds an flock on a lock file named with its temp names'
tag (`.NAME.lock-PID-TAG`) while it writes; a leftover whose lock can be taken belongs to a writer
that is gone, whatever its pid now names (in a container pid 1 always looks alive), and is
removed by the next write (the pid is the fallback where a filesystem has no locks)."""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from polcache_client import filelock

from polcache.errors import PolcacheError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, the pid tells
    fcntl = None  # type: ignore[assignment]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
_KINDS = ("tmp", "old", "lock")


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


def _target(path: Path) -> Path:
    """Where a write of `path` goes: a symbolic link's target (the link then names the new data), else `path`."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _leftovers(path: Path) -> list[tuple[Path, str, str]]:
    """(entry, kind, tag) for what writers of `path` put beside it: temps, a directory set aside, lock files."""
    out = []
    for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*")):
        kind, _, tag = entry.name[len(path.name) + 2:].partition("-")
        if kind in _KINDS and tag.partition("-")[0].isdigit():
            out.append((entry, kind, tag))
    return out


def _writer_gone(path: Path, tag: str) -> bool:
    """Whether the writer whose temp names carry `tag` is gone: its lock file's flock can be taken,
    or (no lock file, or no locks on this filesystem) its pid is no running process."""
    if fcntl is not None:
        lock = path.parent / f".{path.name}.lock-{tag}"
        fd = None
        for flags in (os.O_RDWR, os.O_RDONLY):  # NFS locks want a writable file; another user's may not be
            try:
                fd = os.open(lock, flags)
                break
            except PermissionError:
                continue
            except OSError:
                break
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # released when fd closes: the writer cannot come back
            except BlockingIOError:
                return False
            except OSError:
                pass  # no locks here: the pid tells
            finally:
                os.close(fd)
    return not _alive(int(tag.partition("-")[0]))


def _remove(entry: Path) -> None:
    """Remove a file, a symbolic link (never its target) or a directory tree; what is gone already is fine."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    except OSError:
        pass


def restore(path: str | Path) -> Path:
    """Put back the directory that a writer of `path`, killed between its two renames (filesystems
    without an atomic exchange), left set aside as `.NAME.old-*`, so a reader finds the complete old
    one instead of nothing. Every reader of an atomically written path calls this first; it changes
    nothing where `path` exists, or where the writer is still running. Returns `path`."""
    path = Path(path)
    where = _target(path)
    if os.path.lexists(where):
        return path
    try:
        aside = [entry for entry, kind, tag in _leftovers(where)
                 if kind == "old" and entry.is_dir() and not entry.is_symlink() and _writer_gone(where, tag)]
        if aside:  # several only where an earlier restore could not rename: the last set aside is the newest
            os.rename(max(aside, key=lambda entry: entry.stat().st_ctime_ns), where)
    except OSError:  # a read-only folder, or another reader restored it first
        pass
    return path


def _recover(path: Path) -> None:
    """Undo what killed writers of `path` left: a directory renamed aside is put back where
    `path` is missing; their temp directories and lock files are removed."""
    restore(path)
    # locks last: each stays while its writer's temps do
    for entry, kind, tag in sorted(_leftovers(path), key=lambda leftover: leftover[1] == "lock"):
        if _writer_gone(path, tag):
            _remove(entry)


@contextmanager
def _writer_lock(path: Path, tag: str) -> Iterator[None]:
    """Hold an flock on `.NAME.lock-TAG` while writing, so a cleaner can tell this writer's temps from a
    dead one's; the kernel drops it when the process dies. Without locks here, only the pid tells."""
    lock = path.parent / f".{path.name}.lock-{tag}"
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if fd is not None:
                os.close(fd)
                fd = None
                lock.unlink(missing_ok=True)
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # before its lock is dropped: nobody takes it for a dead writer's
            os.close(fd)


def _fsync(path: Path | str, directory: bool = False) -> None:
    """fsync a file, or a directory's entries (some filesystems cannot: then nothing more is possible)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`), deepest first, so what a rename makes
    visible is on disk before the rename is."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                _fsync(file)
        _fsync(folder, directory=True)


@contextmanager
def naming_errors(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OSError while writing `path` named with `path`: a full disk or quota fails a write(), a flush or
    an fsync, which name no file ("No space left on device" alone), and a failure inside a temp copy
    `tmp` would name a hidden file the user never asked for."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and (tmp is None or not str(exc.filename).startswith(str(tmp))):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory to fill; on normal exit it replaces `path` (a link's target), durably; on
    error it vanishes."""
    path = _target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    with _writer_lock(path, tag), naming_errors(path, tmp):
        try:
            yield tmp
            _fsync_tree(tmp)
            if not os.path.lexists(path):
                os.rename(tmp, path)
            elif not _exchange(tmp, path):  # (where it could, tmp now holds the old directory: removed below)
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
            _fsync(path.parent, directory=True)
            _remove(old)
        finally:
            _remove(tmp)


_OUTPUTS_HELD: set[Path] = set()  # this process's output locks: a writer inside another of the same path takes none


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """One process at a time makes `path` (a dataset, an embedding store): an flock on `.NAME.writing`
    beside it (polcache_client.filelock) for the whole command, so a second command writing the same
    output at once is refused at its start, naming the first's pid (two `ptp embed --out X` both said
    "wrote X", the second's result replacing the first's unseen). Where the folder is not there yet,
    or takes no lock file, nothing is held."""
    path = _target(Path(path)).absolute()  # where the write goes: a link and its target take one lock
    lock = path.parent / f".{path.name}.writing"
    if path in _OUTPUTS_HELD or not path.parent.is_dir():
        yield
        return
    try:
        fd = filelock.hold(lock)
    except filelock.LockHeld as held:
        raise PolcacheError(f"{path}: another process{f' (pid {held.holder})' if held.holder else ''} is writing it; "
                            f"wait for it to end or give another output") from None
    except OSError:  # a read-only folder: the write itself says so
        fd = None
    _OUTPUTS_HELD.add(path)
    try:
        yield
    finally:
        _OUTPUTS_HELD.discard(path)
        filelock.release(lock, fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file (a link's target) via a temp file + rename (same filesystem), fsynced first, and
    the folder after, so the new name is on disk too."""
    atomic_write_together([(path, data)])


def atomic_write_together(files: Sequence[tuple[str | Path, bytes]]) -> None:
    """Write files that belong together (a schedule and its picture) as atomic_write_bytes does one:
    every one written and fsynced under its temp name first, then all renamed in a row, so a failure
    while writing any of them (a full disk) replaces none; only a kill between the renames, which do
    no I/O, could leave some replaced (replacing one after the other left a new schedule beside the
    old picture when the picture's write failed)."""
    with ExitStack() as held:
        staged = []
        for path, data in files:
            path = _target(Path(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            _recover(path)
            tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp = path.parent / f".{path.name}.tmp-{tag}"
            held.enter_context(_writer_lock(path, tag))
            held.callback(_remove, tmp)
            with naming_errors(path, tmp):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            staged.append((tmp, path))
        for tmp, path in staged:
            with naming_errors(path, tmp):
                os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for _, path in staged):
            with naming_errors(folder):
                _fsync(folder, directory=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
