"""The metrics file the dashboard reads: one JSON object per line, rotated by size so it never
fills a disk, written by a background thread so a slow disk never delays a control tick. Here, in
the robot-side package, so a robot with only polcache-client installed writes the robot half of
the dashboard (latency, control rate, period error, queue, drops) the way `sim-robot` does:

    with MetricsFile("robot.jsonl", robot="arm-1") as metrics:  # closed (what is left written) even on Ctrl-C
        metrics.write_info(role="robot", hz=50)
        ControlLoop(robot, client, 50, on_tick=metrics.write, on_chunk=metrics.write).run()

Lines look like {"kind": "tick", "t": ..., "period_error_ms": ..., ...}; see the record
classes in polcache_client.records (and polcache.serve.records, the server's) for the fields of
each kind. `labels` (e.g. the robot's name) are added to every line that lacks them, so a reader
of several files can tell robots apart.

The caller encodes its line (msgspec, a few microseconds) and appends it to a deque; the
writer thread wakes every `flush_s` and writes what has gathered. A thread woken for every
record cost the server a wake-up per request, and the woken thread then competed for the
interpreter lock with the next request (polcache's BENCHMARKS.md, "Metrics off the reply path");
a dashboard polling every second sees no difference.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from polcache_client import filelock
from polcache_client.logs import RateLimitedLog

log = logging.getLogger("polcache.metrics")
FLUSH_S = 0.1  # how long a line may wait for the file


class MetricsFileError(ValueError):
    """A metrics file that cannot be written: a folder, another kind of file, an unwritable path."""


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


_RECORD_START = re.compile(rb'\s*\{\s*"kind"\s*:')  # how every record's line starts
METRICS_FILE = 'a polcache metrics file (lines of {"kind": ...} records)'


def _first_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def _starts_as_records(start: bytes) -> bool:
    return not start.strip() or _RECORD_START.match(start) is not None


def is_metrics_file(path: Path) -> bool:
    """Whether a writer may append to `path`: it is empty, or it starts as a record does ({"kind": ..,
    even cut off by a killed writer). Anything else (a schedule, an eval result given by mistake) was
    appended to, and rotated away."""
    try:
        return _starts_as_records(_first_bytes(path))
    except OSError:
        return False


def check_metrics_path(path: str | Path, label: str | None = "metrics file") -> Path:
    """`path` as a Path where it is a metrics file or may become one (not there yet, empty, or
    starting as a record does); else MetricsFileError in one line, "LABEL PATH: why; expected ..".
    The one check, and wording, of both sides: this writer (and polcache's JsonlWriter) refuses to
    append to a folder or a file of another kind (a schedule, a robot.json, a README given by
    mistake; rotation would move it away), and polcache's dashboard and report refuse to read one
    (they served an empty page). Here, not in polcache, so that a robot with polcache-client alone
    gets every check too. `label`: how the user gave the path (a flag), None for none."""
    if not str(path).strip():  # Path("") is the current folder, which would be named "."
        raise MetricsFileError(f"{label or 'metrics file'}: empty path; expected {METRICS_FILE}")
    name = f"{label} {path}" if label else str(path)
    if str(path).endswith(("/", os.sep)):  # Path() drops the slash: the file would be written (or read) there
        raise MetricsFileError(f"{name}: ends with a slash, a folder; expected {METRICS_FILE}, a file name")
    path = Path(path)
    try:
        for parent in path.parents:  # not there yet, it seemed: a path that can never be created (or written)
            if parent.exists() and not parent.is_dir():
                raise MetricsFileError(f"{name}: {parent} is a file, not a folder")
        if path.is_dir():
            raise MetricsFileError(f"{name}: is a folder; expected {METRICS_FILE}")
        if path.exists() and not path.is_file():  # a pipe or device: opening it to look may block, rotating renames it
            raise MetricsFileError(f"{name}: is not a regular file; expected {METRICS_FILE}")
        if path.exists():
            try:
                start = _first_bytes(path)
            except OSError as exc:  # another user's file, or mode 200: it was called "not a polcache metrics file"
                raise MetricsFileError(f"{name}: cannot read it ({exc.strerror}); expected {METRICS_FILE} this user "
                                       f"may read") from None
            if not _starts_as_records(start):
                raise MetricsFileError(f"{name}: is not {METRICS_FILE}")
    except PermissionError as exc:  # a folder on the way this user may not enter (Path.exists raises on it)
        raise MetricsFileError(f"{name}: permission denied ({exc.filename}); expected {METRICS_FILE} this user "
                               f"may read and write") from None
    return path


_Writer = TypeVar("_Writer", bound="MetricsFile")  # a with block's target keeps its subclass (JsonlWriter)


class MetricsFile:
    """Keeps `path` under `max_bytes` by renaming it to path.1 (path.1 to path.2, ...) and keeps
    `backups` old files; drops (and counts) records when more than `queue_size` wait. A reader
    following the rotation must look more often than `backups` full files take to write. Every
    new file starts with the latest `info` line written, so the files left once the first is
    rotated away still say what ran (deadline, target rate, cache plan)."""

    def __init__(self, path: str | Path, max_bytes: int = 10 * 2**20, backups: int = 3, queue_size: int = 10_000,
                 labels: dict[str, Any] | None = None, flush_s: float = FLUSH_S, robot: str = ""):
        """`robot`: the name every line lacking one gets (a robot's records carry none), the
        dashboard's label for this robot: one per robot, as its handshake's `name`."""
        self.path = self._checked(path)
        self.labels = {**({"robot": robot} if robot else {}), **(labels or {})}
        self.max_bytes = max_bytes
        self.backups = backups
        self.queue_size = queue_size
        self.flush_s = flush_s
        self.dropped = 0
        self._info = b""  # the latest info line, repeated at the start of every rotated file
        self._lock: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = self._writer_lock()
            self._open()
        except OSError as exc:
            filelock.release(self._lock_path(), self._lock)  # not kept by a writer that never started
            raise MetricsFileError(f"metrics file {self.path}: cannot write it ({exc.strerror})") from None
        self._lines: deque[bytes] = deque()  # appended by any thread, taken by the writer (both atomic)
        self._encoder = msgspec.json.Encoder(enc_hook=_builtin_scalar)
        self._prefixes: dict[type, bytes] = {}  # per record class, see _record_line
        self._warn = RateLimitedLog(log).warning
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polcache-metrics-writer", daemon=True)
        self._thread.start()

    def _writer_lock(self) -> int | None:
        """The file's writer lock (polcache_client.filelock), held until closed: a second process
        writing the same file (two servers given one --metrics-file) mixed two runs in it and rotated
        it on two counts, losing lines; it is refused instead."""
        try:
            return filelock.hold(self._lock_path())
        except filelock.LockHeld as held:
            who = ("another writer in this process" if held.holder == str(os.getpid()) else
                   f"another process{f' (pid {held.holder})' if held.holder else ''}")
            raise MetricsFileError(f"metrics file {self.path}: {who} writes it; give each writer its own file (the "
                                   f"dashboard and the report read several)") from None

    def _lock_path(self) -> Path:
        """Beside the file itself: a second writer given a link to it takes the same lock."""
        real = self.path.resolve()
        return real.with_name(f".{real.name}.writer")

    def _checked(self, path: str | Path) -> Path:
        """The path to write, checked once before the file is opened (check_metrics_path): a folder or
        a file of another kind is refused, never appended to; an existing metrics file is appended to.
        A subclass adds its own checks here (polcache's JsonlWriter: those of every polcache output)."""
        return check_metrics_path(path)

    def write(self, item: dict[str, Any] | Any) -> None:
        """One line: a dict or a record (its kind and fields), with the labels it lacks (`robot`)."""
        if len(self._lines) >= self.queue_size:  # the disk falls behind: this record is lost, the caller is not held
            self.dropped += 1
            self._warn("queue", f"metrics line not written to {self.path}: {self.queue_size} lines already "
                                f"wait for the disk")
            return
        try:
            if isinstance(item, dict):  # an info line (kept for the next rotated file) or another map
                # "kind" first, the labels it lacks last: a file is known as a metrics file by its lines
                # starting {"kind": ... (a writer must never make a file it refuses to append to)
                head = {"kind": item["kind"]} if "kind" in item else {}
                line = self._encoder.encode(head | item | {k: v for k, v in self.labels.items() if k not in item})
                if item.get("kind") == "info":
                    self._info = line
            else:
                line = self._record_line(item)
            self._lines.append(line)
        except (TypeError, ValueError) as exc:  # a field JSON cannot hold: that line is lost, not the caller
            self.dropped += 1
            self._warn(type(exc).__name__, f"metrics line not written: {exc}")

    __call__ = write  # a Metrics sink

    def write_info(self, **fields: Any) -> None:
        """The `info` line: what runs (a robot's `role="robot"` and `hz`; the server's deadline and cache
        plan), with both clocks, wall and monotonic, at one instant, which the dashboard uses to place
        the records on one time line. Repeated at the start of every rotated file."""
        self.write({"kind": "info", "t": time.time(), "monotonic": time.monotonic(), **self.labels, **fields})

    def _record_line(self, record: Any) -> bytes:
        """{"kind": .., the labels the record lacks, its fields}: msgspec writes the record (a
        Struct; non-finite floats as null) after a prefix made once per record class."""
        prefix = self._prefixes.get(type(record))
        if prefix is None:
            fields = set(record.__struct_fields__)
            if not fields:
                raise ValueError(f"{type(record).__name__} has no fields to write")
            head = {"kind": record.kind, **{k: v for k, v in self.labels.items() if k not in fields}}
            prefix = self._prefixes[type(record)] = self._encoder.encode(head)[:-1] + b","  # '{"kind":..,'
        return prefix + self._encoder.encode(record)[1:]

    def close(self) -> None:
        """Write what is left and close the file."""
        self._closing.set()
        self._thread.join(timeout=10)

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Closed however the block ends: the writer thread is a daemon, so lines still gathered when
        an interrupted robot's process exits (Ctrl-C) would be lost."""
        self.close()

    def _run(self) -> None:
        while not self._closing.wait(self.flush_s):
            self._write_gathered()
        self._write_gathered()
        try:  # its buffer's last write: a full disk fails here too (a traceback out of this thread, said as such)
            self._file.close()
        except (OSError, ValueError) as exc:
            self._warn("write", f"metrics lines not written to {self.path} as it closed: {exc}")
        filelock.release(self._lock_path(), self._lock)  # the next writer may take the file
        if self.dropped:  # what a run's reader of the file should know, said once at the end
            log.warning("%d metrics line%s not written to %s (see the warnings above)", self.dropped,
                        "" if self.dropped == 1 else "s", self.path)

    def _write_gathered(self) -> None:
        """The gathered lines, one write per file they go to (the interpreter lock is held while
        they are gathered and released in the write, so the recording thread waits little)."""
        while self._lines:
            batch, size, full = [], self._size, False
            while self._lines:
                length = len(self._lines[0]) + 1
                # full; a file holding nothing yet but its repeated info line takes any one line
                if size > self._head_size and size + length > self.max_bytes:
                    full = True
                    break
                batch.append(self._lines.popleft())
                size += length
            try:
                if batch:
                    self._file.write(b"\n".join(batch) + b"\n")
                    self._size, batch = size, []  # written: a failed rotation below loses none of it
                # only when the next line did not fit: lines that arrived during the write go on
                # into this file at the next turn (rotating for them cut files at a few KB under load)
                if full:
                    self._rotate()
            except (OSError, ValueError) as exc:  # a full disk, a removed directory: lost lines, not a dead writer
                self.dropped += len(batch)
                self._warn("write", f"{len(batch)} metrics lines not written to {self.path}: {exc}")
                self._reopen()
                return  # the rest at the next flush
        try:
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._warn("write", f"metrics lines not written to {self.path}: {exc}")
            self._reopen()

    def _reopen(self) -> None:
        """A fresh handle on the file after a failed write (the next flush tries again if this fails)."""
        try:
            self._file.close()
        except OSError:
            pass
        try:
            self._open()
        except OSError:
            pass

    def _open(self) -> None:
        """Append to the file on a line of its own: a line cut off (a killed run, a failed write)
        is not glued to the next."""
        self._file = open(self.path, "ab")
        if self._file.tell() and not _ends_with_newline(self.path):
            self._file.write(b"\n")
        self._size = self._file.tell()
        self._head_size = 0

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._file = open(self.path, "ab")
        self._size = self._head_size = 0
        if self._info:
            self._file.write(self._info + b"\n")
            self._size = self._head_size = len(self._info) + 1


def _builtin_scalar(value: Any) -> Any:
    """msgspec's hook for what it does not write itself: numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write a {type(value).__name__} into a metrics line")
