"""Metrics for one run of a command: in process always, a file and an HTTP endpoint on request."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
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
    with ExitStack() as opened:  # a port in use (or a file not writable) leaves nothing open or written
        metrics = Metrics(window, robot=robot, kinds=kinds, info=info)
        if port is not None:
            http = serve_prometheus(metrics, port, host)
            opened.callback(http.server_close)
            opened.callback(http.shutdown)  # first: the callbacks run last in, first out
            # where to scrape (with port 0, the one the system picked: nothing could know it)
            print(f"metrics on http://{host}:{http.server_address[1]}/metrics", flush=True)
        if path:
            writer = JsonlWriter(path, robot=robot)
            opened.callback(writer.close)
            if info is not None:
                writer.write_info(**info)
            metrics.sink = writer
        yield metrics
