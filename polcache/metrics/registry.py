"""In-process metrics built from runtime records: counters that accumulate and distributions
over a bounded recent window, readable as a dict or as Prometheus text.

A record is any dataclass with `kind`, `counters` and `summaries` class attributes (see
polcache_client.records). Recording is a few deque appends under a lock, cheap enough for
every control tick; percentiles are computed only when someone reads them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

QUANTILES = (0.5, 0.95, 0.99)


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
    record (e.g. a JsonlWriter)."""

    def __init__(self, window: int = 10_000, sink: Callable[[Any], None] | None = None):
        self.window = window
        self.sink = sink
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
        """Prometheus exposition format: counters as `_total`, distributions as summaries whose
        quantiles cover the recent window and whose sum and count are cumulative."""
        lines = []
        with self._lock:
            for (kind, name), value in sorted(self._counters.items()):
                metric = f"polcache_{kind}_{name}_total"
                lines += [f"# TYPE {metric} counter", f"{metric} {float(value):g}"]
            for (kind, name), summary in sorted(self._summaries.items()):
                metric = f"polcache_{kind}_{name}"
                lines.append(f"# TYPE {metric} summary")
                values = np.fromiter(summary.recent, dtype=np.float64)
                if len(values):
                    for q, v in zip(QUANTILES, np.percentile(values, [q * 100 for q in QUANTILES])):
                        lines.append(f'{metric}{{quantile="{q:g}"}} {v:.6g}')
                lines += [f"{metric}_sum {summary.total:.6g}", f"{metric}_count {summary.count}"]
        return "\n".join(lines) + "\n"


def record_fields(record: Any) -> dict[str, Any]:
    """A record as a flat JSON-ready dict: its kind plus every field, non-finite floats as None."""
    fields = {"kind": record.kind}
    for key, value in dataclasses.asdict(record).items():
        fields[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return fields
