"""Follow a metrics JSON-lines file while its writer appends, rotates and truncates it.

The writer (polcache.metrics.jsonl) renames a full file to FILE.1 and starts a new FILE; a
user may also truncate it or start a new run over it. We keep the open handle (so the rest of
a rotated file is still read), notice a new inode at the path and switch to it (read on from our
offset where it starts with everything we read: the same file copied into place), notice a file
shorter than our offset or whose first bytes changed (rewritten, even longer than before, between
two polls: every run's first line is its info record with a timestamp) and start again from its
beginning, and hold back a last line until its newline arrives, so a line caught half-written is
read whole on the next poll. A poll reads at most READ_BYTES, so a large file already there (one
polcache did not write: its own rotate at 10 MiB) is read over several polls, not held whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

HEAD_BYTES = 256  # compared at every poll to notice a file rewritten from its start
MAX_LINE_BYTES = 1 << 20  # a longer line (a file that is not JSON lines) is one unreadable line, not held in memory
READ_BYTES = 16 << 20  # the most one poll reads
COMPARE_BYTES = 1 << 20  # a file replaced by a rename is compared with the old one this much at a time
MAX_BACKUPS = 100  # rotated files looked through for one rotated on while unread (the writer keeps 3 by default)
HELD_NOTE_S = 5.0  # a last line held back this long for its newline is said on the page (a writer killed mid-line)
GONE_AFTER_S = 5.0  # a path missing longer than this was deleted: a rotation's rename-then-create takes far less


class JsonlTail:
    """`poll()` returns the records appended since the last call; lines that are not JSON
    objects (a torn write after truncation, a foreign file) are counted in `bad_lines`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bad_lines = 0
        self.problem: str | None = None  # why nothing is read now (shown on the page), None while it is
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self._partial = b""
        self._skipping = False  # inside a line over MAX_LINE_BYTES: dropped up to its newline
        self._head = b""  # the file's first bytes as we read them: a rewrite changes them
        self._missing_since: tuple[float, float] | None = None  # (monotonic, wall) time its path went missing
        self._held_since: float | None = None  # monotonic time since which a last line waits for its newline
        self.rewritten = False  # the last poll found the file truncated or rewritten: it read it from its start

    def poll(self, limit: int | None = READ_BYTES) -> list[dict[str, Any]]:
        """The records appended since the last call, from at most `limit` bytes (None: to the end)."""
        records: list[dict[str, Any]] = []
        self.rewritten = False
        if self._file is None and not self._open():
            return records
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:  # between the writer's rename and its new file, or deleted
            stat = None
        self._check_gone(stat is None)
        if stat is not None and stat.st_ino == self._inode and self._rewritten(stat.st_size):
            self.rewind()  # truncated under us: whatever we held back belonged to the old content
            self.rewritten = True
        records += self._read(limit)
        if stat is not None and stat.st_ino != self._inode and (same := self._same_run_replaced()) is not None:
            self._file.close()  # the same content put in place by a rename: read on where we were
            self._file, self._inode = same, os.fstat(same.fileno()).st_ino
            if same.tell() == 0:  # cut shorter (sed -i deleting lines): as a truncation, read again from its start
                self.rewind()
                self.rewritten = True
            records += self._read(limit)
        elif stat is not None and stat.st_ino != self._inode:  # rotated: the old file is finished
            records += self._read(None) + self.finish()
            self._file.close()
            self._file = None
            self._head, self._skipping = b"", False
            for between in self._rotated_after(self._inode):
                records += self._read_whole(between)
            if self._open():
                records += self._read(limit)
        if not self._partial:
            self._held_since = None
        elif self._held_since is None:
            self._held_since = time.monotonic()
        return records

    @property
    def held_line(self) -> str | None:
        """Said once a last line has waited HELD_NOTE_S for its newline: a file whose writer was killed
        mid-line ends in one, never completed, and the page looked complete where it lacked that record
        (a final safe stop); `polcache report` counts it as an unreadable line."""
        if self._held_since is None or time.monotonic() - self._held_since < HELD_NOTE_S:
            return None
        return (f"{self.path} ends in an incomplete line ({len(self._partial)} bytes without a newline for "
                f"{time.monotonic() - self._held_since:.0f} s: its writer stopped mid-line?), not shown")

    def _rotated_after(self, inode: int | None) -> list[Path]:
        """The files the writer rotated after the one with `inode`, oldest first: where it rotated more
        than once between two polls (the page's process stopped or starved a while), FILE.k is ours and
        FILE.k-1 .. FILE.1 were written in between; they are read whole rather than skipped."""
        backups = []
        for k in range(1, MAX_BACKUPS + 1):
            backup = self.path.with_name(f"{self.path.name}.{k}")
            try:
                if os.stat(backup).st_ino == inode:
                    return backups[::-1]
            except OSError:  # FileNotFoundError past the last backup
                return []
            backups.append(backup)
        return []

    def _read_whole(self, path: Path) -> list[dict[str, Any]]:
        try:
            data = path.read_bytes()
        except OSError:  # rotated on out of reach meanwhile: what it held is not on the page
            return []
        return self._parse(data.split(b"\n"))

    def rewind(self) -> None:
        """Read the file again from its start at the next poll (what was held back is dropped)."""
        if self._file is not None:
            self._file.seek(0)
        self._partial, self._skipping, self._head = b"", False, b""

    def finish(self) -> list[dict[str, Any]]:
        """The held-back last line as a record, for a file that will not grow any more (a run
        killed mid-write leaves half a line: counted in `bad_lines`)."""
        lines, self._partial = [self._partial], b""
        return self._parse(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _check_gone(self, missing: bool) -> None:
        """Say on the page that the path is gone once it has been missing for longer than a rotation
        leaves it (until then, and once it is back, say nothing)."""
        if not missing:
            if self._missing_since is not None:
                self._missing_since = self.problem = None
            return
        if self._missing_since is None:
            self._missing_since = (time.monotonic(), time.time())
        elif time.monotonic() - self._missing_since[0] > GONE_AFTER_S:
            since = time.strftime("%H:%M:%S", time.localtime(self._missing_since[1]))
            self.problem = f"{self.path}: gone (deleted?) since {since}; waiting for it to come back"

    def _open(self) -> bool:
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            self.problem = f"{self.path}: no such file (yet)"
            return False
        except OSError as exc:  # a folder, no permission: the other sources are still read
            self.problem = f"{self.path}: cannot read it ({exc.strerror or exc})"
            return False
        self.problem = None
        self._inode = os.fstat(self._file.fileno()).st_ino
        return True

    def _same_run_replaced(self) -> BinaryIO | None:
        """The file now at the path where it is the same run's, put in place by a rename (rsync,
        cp + mv, sed -i), which read as a rotation counted every record again: at our offset where it
        starts with all we read of the old one, at 0 where it is a shorter start of it; None for
        another file (a rotation's new one)."""
        offset = self._file.tell()
        try:
            new = open(self.path, "rb")
        except OSError:
            return None
        old_fd, new_fd = self._file.fileno(), new.fileno()
        common = min(offset, os.fstat(new_fd).st_size)
        # past the first line: a rotated file starts with the run's info line again, so a new one still
        # holding only that line (or a first file read no further) is a start of the old one too
        first_line = os.pread(new_fd, min(common, MAX_LINE_BYTES), 0).find(b"\n") + 1
        spans = [(at, min(COMPARE_BYTES, common - at)) for at in range(0, common, COMPARE_BYTES)]
        if 0 < first_line < common and all(os.pread(old_fd, n, at) == os.pread(new_fd, n, at) for at, n in spans):
            new.seek(common if common == offset else 0)
            return new
        new.close()
        return None

    def _rewritten(self, size: int) -> bool:
        if size < self._file.tell():
            return True
        return bool(self._head) and os.pread(self._file.fileno(), len(self._head), 0) != self._head

    def _read(self, limit: int | None) -> list[dict[str, Any]]:
        start = self._file.tell()
        chunk = self._file.read(-1 if limit is None else limit)
        if start < HEAD_BYTES:
            self._head = (self._head + chunk)[:HEAD_BYTES]
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # empty after a complete last line
        if self._skipping:  # the rest of an over-long line: up to its newline, if it came
            if lines:
                lines.pop(0)
                self._skipping = False
            else:
                self._partial = b""
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial, self._skipping = b"", True
            self.bad_lines += 1
        return self._parse(lines)

    def _parse(self, lines: list[bytes]) -> list[dict[str, Any]]:
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
                self.bad_lines += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("kind"), str):
                out.append(record)
            else:
                self.bad_lines += 1
        return out
