"""The metrics file of polcache's commands: polcache_client's MetricsFile (the robot side writes
the same file with polcache-client alone), with every output check polcache's commands make (a path
inside a checkpoint or dataset, a read-only or full disk) and polcache's one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polcache.errors import PolcacheError
from polcache.outputs import check_output
from polcache_client.metrics_file import FLUSH_S, METRICS_FILE, MetricsFile, MetricsFileError, is_metrics_file


def check_metrics_input(path: str | Path, flag: str | None = None) -> None:
    """Refuse, in one line, a metrics file to read that a writer would not append to (a folder, a
    robot.json or README given by mistake): the dashboard served an empty page for it. A path not
    there yet passes: the server or robot writing it creates it."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise PolcacheError(f"{name}: is a folder; expected {METRICS_FILE}")
    if path.exists() and not is_metrics_file(path):
        raise PolcacheError(f"{name}: is not {METRICS_FILE}")


class JsonlWriter(MetricsFile):
    """MetricsFile, its path checked as every polcache output is (polcache.outputs)."""

    def __init__(self, path: str | Path, max_bytes: int = 10 * 2**20, backups: int = 3, queue_size: int = 10_000,
                 labels: dict[str, Any] | None = None, flush_s: float = FLUSH_S, robot: str = ""):
        # a folder, a path under a file, an empty name, a file of another kind (a schedule, a result):
        # one line naming it; an existing metrics file is appended to
        check_output(path, METRICS_FILE, folder=False, ours=is_metrics_file, flag="metrics file", error=PolcacheError)
        try:
            super().__init__(path, max_bytes, backups, queue_size, labels, flush_s, robot)
        except MetricsFileError as exc:
            raise PolcacheError(str(exc)) from None
