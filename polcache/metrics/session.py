"""Metrics for one run of a command: in process always, a file and an HTTP endpoint on request."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from polcache.metrics.http import serve_prometheus
from polcache.metrics.jsonl import JsonlWriter
from polcache.metrics.registry import Metrics


@contextmanager
def collect_metrics(path: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                    robot: str = "", info: dict[str, Any] | None = None, window: int = 10_000,
                    kinds: tuple[type, ...] = ()) -> Iterator[Metrics]:
    """`robot` names the robot whose records carry no name (the robot side's); `info` is written
    as the file's first line, kind `info` (what runs: the server's backend and cache plan, the
    robot's rate; and both clocks, wall and monotonic, at one instant), so a dashboard or report can
    draw deadlines and cache schedules; the endpoint exposes its rate and deadline. `window`,
    `kinds`: as Metrics (0: no in-process distributions; the record classes the endpoint shows
    before their first record).
    `port` 0 takes a free port; the endpoint's address is printed."""
    writer = JsonlWriter(path, robot=robot) if path else None
    if writer is not None and info is not None:
        writer.write_info(**info)
    metrics = Metrics(window, sink=writer, robot=robot, kinds=kinds, info=info)
    http = serve_prometheus(metrics, port, host) if port is not None else None
    if http is not None:  # where to scrape (with port 0, the one the system picked: nothing could know it)
        print(f"metrics on http://{host}:{http.server_address[1]}/metrics", flush=True)
    try:
        yield metrics
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if writer is not None:
            writer.close()
