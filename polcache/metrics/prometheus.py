"""Records as Prometheus histograms, counters and gauges (prometheus_client), labelled by robot.

Histograms, not client-side quantiles: bucket counts add up across robots and servers, so a
fleet's p99 is one `histogram_quantile` over the sum. Buckets sit around the control period
(20 ms at 50 Hz) for latencies and around a millisecond for loop jitter and server stages.
Names follow the records: a `<field>_ms` distribution of kind K is `polcache_K_<field>_seconds`,
a counter `polcache_K_<counter>_total`, any other distribution (queue depths) a gauge holding
the newest value. Every series carries `robot`; refused messages also carry `code`.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds. Jitter of a fixed-rate loop: tens of microseconds when healthy, a period when not.
PERIOD_ERROR_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
# Whole requests: a few ms to several control periods (a deadline is (n_action_steps - 1) periods).
LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# One server stage (decode, queue, encode, ...): microseconds to a few periods.
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
WHOLE_REQUEST_FIELDS = ("latency_ms", "inference_ms", "server_ms", "total_ms")
LABEL_FIELDS = ("code",)  # record fields that become labels (beside robot)


def metric_name(kind: str, field: str) -> str:
    """The exposed name of a record field (counters without the `_total` prometheus_client adds)."""
    if field.endswith("_ms"):
        return f"polcache_{kind}_{field[:-3]}_seconds"
    return f"polcache_{kind}_{field}"


def buckets_for(field: str) -> tuple[float, ...]:
    if field == "period_error_ms":
        return PERIOD_ERROR_BUCKETS
    return LATENCY_BUCKETS if field in WHOLE_REQUEST_FIELDS else STAGE_BUCKETS


class PrometheusRecorder:
    """Turns records into observations on `registry`. Metrics are created the first time a kind
    is seen (from its record class's `counters` and `summaries`); each (kind, labels) keeps its
    bound children, so a tick costs a dict lookup and a few locked additions."""

    def __init__(self, registry: CollectorRegistry, robot: str = ""):
        self.registry = registry
        self.robot = robot
        self._lock = threading.Lock()
        self._families: dict[str, dict[str, Any]] = {}
        self._children: dict[tuple, list[tuple[str, str, Any]]] = {}

    def record(self, record: Any) -> None:
        kind = record.kind
        labels = (getattr(record, "robot", None) or self.robot,) + tuple(
            str(getattr(record, f)) for f in LABEL_FIELDS if hasattr(record, f))
        key = (kind, labels)
        children = self._children.get(key)
        if children is None:
            children = self._bind(record, labels)
        for field, role, child in children:
            value = getattr(record, field)
            if role == "counter":
                if value:
                    child.inc(value)
            elif role == "histogram":
                if value == value and value not in (float("inf"), float("-inf")):  # NaN: not measured
                    child.observe(value / 1e3)
            else:
                child.set(value)

    def _bind(self, record: Any, labels: tuple[str, ...]) -> list[tuple[str, str, Any]]:
        kind = record.kind
        with self._lock:
            families = self._families.get(kind)
            if families is None:
                families = self._families[kind] = self._create(record)
            children = []
            for field, family in families.items():
                role = "counter" if field in record.counters else "histogram" if field.endswith("_ms") else "gauge"
                children.append((field, role, family.labels(*labels)))
            self._children[(kind, labels)] = children
            return children

    def _create(self, record: Any) -> dict[str, Any]:
        kind = record.kind
        labelnames = ("robot",) + tuple(f for f in LABEL_FIELDS if hasattr(record, f))
        out: dict[str, Any] = {}
        for field in record.counters:
            out[field] = Counter(metric_name(kind, field), f"{kind} records: {field}", labelnames,
                                 registry=self.registry)
        for field in record.summaries:
            name = metric_name(kind, field)
            if field.endswith("_ms"):
                out[field] = Histogram(name, f"{kind} records: {field[:-3]} in seconds", labelnames,
                                       buckets=buckets_for(field), registry=self.registry)
            else:
                out[field] = Gauge(name, f"{kind} records: newest {field}", labelnames, registry=self.registry)
        return out
