"""In-process metrics built from runtime records: counters that accumulate and distributions
over a bounded recent window, readable as a dict, and the same records as Prometheus
histograms and counters (polcache.metrics.prometheus) for scraping.

A record is a msgspec Struct with `kind`, `counters` and `summaries` class attributes (see
polcache_client.records). Recording is a few deque appends and histogram increments under
locks, cheap enough for every control tick (benchmarks/bench_dashboard.py measures it);
percentiles are computed only when someone reads them.
"""

from __future__ import annotations

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
    """`window` bounds each distribution (most recent values) of `snapshot()`; 0 keeps none, for a
    process that never reports one (`polcache serve`: its distributions are read from the file or
    the Prometheus endpoint). `sink` also receives every record (e.g. a JsonlWriter); `robot`
    labels the Prometheus series of records that do not name their robot themselves (the robot
    side's tick and chunk records); `kinds`: record classes exposed before their first record;
    `info`: the run's info line, whose rate and deadline the endpoint exposes too."""

    def __init__(self, window: int = 10_000, sink: Callable[[Any], None] | None = None, robot: str = "",
                 kinds: tuple[type, ...] = (), info: dict[str, Any] | None = None):
        self.window = window
        self.sink = sink
        self.registry = CollectorRegistry()  # one per Metrics: several in one process never collide
        self._prometheus = PrometheusRecorder(self.registry, robot, kinds, info)
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[dict[str, float], dict[str, _Summary]]] = {}  # kind: counters, summaries

    def record(self, record: Any) -> None:
        with self._lock:
            kind = self._kinds.get(record.kind)
            if kind is None:
                kind = self._kinds[record.kind] = (dict.fromkeys(record.counters, 0), {
                    name: _Summary(self.window) for name in (record.summaries if self.window else ())})
            counters, summaries = kind
            for name in counters:
                counters[name] += getattr(record, name)
            for name, summary in summaries.items():
                summary.add(float(getattr(record, name)))
        self._prometheus.record(record)
        if self.sink is not None:
            self.sink(record)

    def forget_robot(self, robot: str) -> None:
        """A robot left: its Prometheus gauges (queue depth, batch size) show no value until its name
        records again; its counters and histograms stay for DEPARTED_KEPT_S (scraped: totals a fleet
        adds up), then go (a server seeing many names over its life does not grow)."""
        self._prometheus.departed(robot)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{kind: {counter: total, summary: {p50, p95, p99, max, mean, n}}}"""
        with self._lock:
            return {kind: {**counters, **{name: s.describe() for name, s in summaries.items()}}
                    for kind, (counters, summaries) in self._kinds.items()}

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of every series recorded so far."""
        return generate_latest(self.registry).decode()
