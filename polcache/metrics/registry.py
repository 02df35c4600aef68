"""In-process metrics built from runtime records: counters that accumulate and distributions
over a bounded recent window, readable as a dict, and the same records as Prometheus
histograms and counters (polcache.metrics.prometheus) for scraping.

A record is any dataclass with `kind`, `counters` and `summaries` class attributes (see
polcache_client.records). Recording is a few deque appends and histogram increments under
locks, cheap enough for every control tick (benchmarks/bench_dashboard.py measures it);
percentiles are computed only when someone reads them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from polcache.metrics.prometheus import PrometheusRecorder

QUANTILES = (0.5, 0.95, 0.99)  # of the in-process snapshot


class _Summary:
    def __init__(self, window: int):
        self.recent: deque[float] = deque(maxlen=window)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.recent.append(value)
            self.count += 1
            self.total += value

    def describe(self) -> dict[str, float]:
        values = np.fromiter(self.recent, dtype=np.float64)
        if not len(values):
            return {"n": self.count}
        p50, p95, p99 = np.percentile(values, [q * 100 for q in QUANTILES])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(values.max()),
                "mean": float(values.mean()), "n": self.count}


class Metrics:
    """`window` bounds each distribution (most recent values); `sink` also receives every
    record (e.g. a JsonlWriter); `robot` labels the Prometheus series of records that do not
    name their robot themselves (the robot side's tick and chunk records)."""

    def __init__(self, window: int = 10_000, sink: Callable[[Any], None] | None = None, robot: str = ""):
        self.window = window
        self.sink = sink
        self.registry = CollectorRegistry()  # one per Metrics: several in one process never collide
        self._prometheus = PrometheusRecorder(self.registry, robot)
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = {}
        self._summaries: dict[tuple[str, str], _Summary] = {}

    def record(self, record: Any) -> None:
        kind = record.kind
        with self._lock:
            for name in record.counters:
                key = (kind, name)
                self._counters[key] = self._counters.get(key, 0) + getattr(record, name)
            for name in record.summaries:
                key = (kind, name)
                if key not in self._summaries:
                    self._summaries[key] = _Summary(self.window)
                self._summaries[key].add(float(getattr(record, name)))
        self._prometheus.record(record)
        if self.sink is not None:
            self.sink(record)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{kind: {counter: total, summary: {p50, p95, p99, max, mean, n}}}"""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for (kind, name), value in self._counters.items():
                out.setdefault(kind, {})[name] = value
            for (kind, name), summary in self._summaries.items():
                out.setdefault(kind, {})[name] = summary.describe()
        return out

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of every series recorded so far."""
        return generate_latest(self.registry).decode()


def record_fields(record: Any) -> dict[str, Any]:
    """A record as a flat JSON-ready dict: its kind plus every field, non-finite floats as None."""
    fields = {"kind": record.kind}
    for key, value in dataclasses.asdict(record).items():
        fields[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return fields
