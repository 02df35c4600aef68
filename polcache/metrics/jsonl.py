"""The metrics file of polcache's commands: polcache_client's MetricsFile (the robot side writes
the same file with polcache-client alone), with every output check polcache's commands make (a path
inside a checkpoint or dataset, a read-only or full disk) and polcache's one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from polcache.errors import PolcacheError
from polcache.outputs import check_output
from polcache_client.metrics_file import (FLUSH_S, METRICS_FILE, MetricsFile, MetricsFileError, check_metrics_path,
                                          is_metrics_file)


@contextmanager
def _polcache_error() -> Iterator[None]:
    """polcache_client's MetricsFileError (it cannot import polcache) as polcache's one-line error."""
    try:
        yield
    except MetricsFileError as exc:
        raise PolcacheError(str(exc)) from None


def check_metrics_input(path: str | Path, flag: str | None = None) -> None:
    """Refuse, in one line, a metrics file to read that a writer would not append to (a folder, a
    robot.json or README given by mistake), in the writer's words (check_metrics_path): the dashboard
    served an empty page for it. A path not there yet passes: the server or robot writing it creates it."""
    with _polcache_error():
        check_metrics_path(path, flag)


class JsonlWriter(MetricsFile):
    """MetricsFile, its path checked as every polcache output is (polcache.outputs)."""

    def __init__(self, path: str | Path, max_bytes: int = 10 * 2**20, backups: int = 3, queue_size: int = 10_000,
                 labels: dict[str, Any] | None = None, flush_s: float = FLUSH_S, robot: str = ""):
        with _polcache_error():
            super().__init__(path, max_bytes, backups, queue_size, labels, flush_s, robot)

    def _checked(self, path: str | Path) -> Path:
        """A folder, a trailing slash, a path under a file, a file of another kind (a schedule, a result):
        MetricsFile's check, the reader's words; then what only polcache checks, once: a path inside a
        checkpoint or dataset, a read-only or full disk. An existing metrics file is appended to."""
        checked = super()._checked(path)
        check_output(path, METRICS_FILE, folder=False, ours=is_metrics_file, flag="metrics file",
                     error=PolcacheError)
        return checked
