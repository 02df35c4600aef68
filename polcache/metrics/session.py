"""Metrics for one run of a command: in process always, a file and an HTTP endpoint on request."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from polcache.metrics.http import serve_prometheus
from polcache.metrics.jsonl import JsonlWriter
from polcache.metrics.registry import Metrics


@contextmanager
def collect_metrics(path: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1") -> Iterator[Metrics]:
    writer = JsonlWriter(path) if path else None
    metrics = Metrics(sink=writer)
    http = serve_prometheus(metrics, port, host) if port is not None else None
    try:
        yield metrics
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if writer is not None:
            writer.close()
