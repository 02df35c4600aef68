"""Records as Prometheus histograms, counters and gauges (prometheus_client), labelled by robot.

Histograms, not client-side quantiles: bucket counts add up across robots and servers, so a
fleet's p99 is one `histogram_quantile` over the sum. Buckets sit around the control period
(20 ms at 50 Hz) for latencies and around a millisecond for loop jitter and server stages.
Names follow the records: a `<field>_ms` distribution of kind K is `polcache_K_<field>_seconds`,
a counter `polcache_K_<counter>_total`, any other distribution (queue depths) a gauge holding
the newest value. Every series carries `robot`; refused messages also carry `code`.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily,
                                    Metric)
from prometheus_client.utils import floatToGoString

# Seconds. Jitter of a fixed-rate loop: a few to tens of microseconds when healthy (3-40 us measured
# under launch's placement; a first bucket at 50 us read a p99 of 18 us as 50), a period when not.
PERIOD_ERROR_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
# Whole requests: a few ms to several control periods (a deadline is (n_action_steps - 1) periods).
LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# One server stage (decode, queue, encode, ...): tens of microseconds to a few periods.
STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
WHOLE_REQUEST_FIELDS = ("latency_ms", "inference_ms", "server_ms", "total_ms")
LABEL_FIELDS = ("code",)  # record fields that become labels (beside robot)
RUN_INFO = "polcache_run"  # exposed as polcache_run_info{role, robot, hz, ...} 1, prometheus_client's Info
# What a dashboard draws from a scrape besides the records: the robot's target rate, the server's deadline
# and chunk length (n_action_steps: with the robots' rates, the deadline where none is set).
RUN_INFO_FIELDS = ("role", "task", "hz", "deadline_ms", "n_action_steps")
# A departed robot's series are exposed this long (many scrape intervals: its last increments are
# scraped), then dropped, so a server that sees many robot names over its life does not grow without
# bound; one back under its name starts its series again (a counter reset, which rate() handles).
DEPARTED_KEPT_S = 600.0


def metric_name(kind: str, field: str) -> str:
    """The exposed name of a record field (counters without the `_total` prometheus_client adds)."""
    if field.endswith("_ms"):
        return f"polcache_{kind}_{field[:-3]}_seconds"
    return f"polcache_{kind}_{field}"


def run_info_labels(info: dict[str, Any]) -> dict[str, str]:
    """The labels of the run's Info metric: the scalar facts of its info line in RUN_INFO_FIELDS (a
    server's `n_action_steps` is in its `policy`)."""
    facts = {**info, **(info.get("policy") or {})}
    return {field: str(facts[field]) for field in RUN_INFO_FIELDS if facts.get(field) is not None}


def buckets_for(field: str) -> tuple[float, ...]:
    if field == "period_error_ms":
        return PERIOD_ERROR_BUCKETS
    return LATENCY_BUCKETS if field in WHOLE_REQUEST_FIELDS else STAGE_BUCKETS


class _Kind:
    """One record class's exposed fields, by role, and its metric names (built once per kind)."""

    def __init__(self, record: Any):
        """`record`: a record or its class (every attribute read is the class's)."""
        kind = record.kind
        self.names_robot = hasattr(record, "robot")  # server records do; the robot side's do not
        self.label_fields = tuple(f for f in LABEL_FIELDS if hasattr(record, f))
        self.labelnames = ("robot", *self.label_fields)
        self.counters = tuple(record.counters)
        self.histograms = tuple((f, buckets_for(f)) for f in record.summaries if f.endswith("_ms"))
        self.gauges = tuple(f for f in record.summaries if not f.endswith("_ms"))
        self.docs = {f: f"{kind} records: {f}" for f in self.counters}
        self.docs.update({f: f"{kind} records: {f[:-3]} in seconds" for f, _ in self.histograms})
        self.docs.update({f: f"{kind} records: newest {f}" for f in self.gauges})
        self.names = {f: metric_name(kind, f) for f in self.docs}

    def labels(self, record: Any, robot: str) -> tuple[str, ...]:
        """The label values of one record (`robot`: for records that do not name one)."""
        if self.names_robot and record.robot:
            robot = record.robot
        return (robot, *(str(getattr(record, f)) for f in self.label_fields)) if self.label_fields else (robot,)


class _Series:
    """The numbers of one (kind, labels): counter totals, per histogram its bucket counts (not
    cumulative; the last one is +Inf) and sum, gauge values."""

    def __init__(self, kind: _Kind, labels: tuple[str, ...]):
        self.kind = kind
        self.labels = labels
        self.counters = dict.fromkeys(kind.counters, 0.0)
        self.buckets = {f: [0] * (len(bounds) + 1) for f, bounds in kind.histograms}
        self.sums = dict.fromkeys(self.buckets, 0.0)
        self.gauges = dict.fromkeys(kind.gauges, math.nan)


class PrometheusRecorder:
    """Counts records into histograms, counters and gauges per (kind, labels), exposed through
    `registry` as a prometheus_client collector: the families are built when scraped, so a
    record costs plain additions under one lock (prometheus_client's own metric objects take a
    lock per bucket, sum and counter: several times the cost, paid on every request;
    BENCHMARKS.md, "Metrics off the reply path"). The exposition is prometheus_client's."""

    def __init__(self, registry: CollectorRegistry, robot: str = "", kinds: tuple[type, ...] = (),
                 info: dict[str, Any] | None = None):
        """`kinds`: record classes exposed before their first record (their families with no series),
        so a scrape of a process that has served nothing yet shows what it will export. `info`: the
        run's info line, exposed as RUN_INFO."""
        self.robot = robot
        self._info = {**run_info_labels(info), **({"robot": robot} if robot else {})} if info else None
        self._lock = threading.Lock()
        self._kinds: dict[type, _Kind] = {cls: _Kind(cls) for cls in kinds}  # per record class
        self._series: dict[tuple, _Series] = {}
        self._departed: dict[str, float] = {}  # robot label -> when its session ended (time.monotonic())
        registry.register(self)

    def record(self, record: Any) -> None:
        kind = self._kinds.get(type(record))
        if kind is None:
            with self._lock:
                kind = self._kinds.setdefault(type(record), _Kind(record))
        labels = kind.labels(record, self.robot)
        with self._lock:
            if self._departed:
                self._departed.pop(labels[0], None)  # back, or another session of its name
            series = self._series.get((kind, labels))
            if series is None:
                series = self._series[(kind, labels)] = _Series(kind, labels)
            counters = series.counters
            for field in counters:
                counters[field] += getattr(record, field)
            for field, bounds in series.kind.histograms:
                value = getattr(record, field)
                if math.isfinite(value):  # NaN: not measured
                    seconds = value / 1e3
                    series.buckets[field][bisect_left(bounds, seconds)] += 1  # the first bucket with le >= it
                    series.sums[field] += seconds
            gauges = series.gauges
            for field in gauges:
                gauges[field] = getattr(record, field)

    def departed(self, robot: str) -> None:
        """`robot`'s session ended: its gauges no longer show its last value (a departed robot's queue
        depth is no reading), and its series go DEPARTED_KEPT_S later unless it records again."""
        with self._lock:
            self._departed[robot] = time.monotonic()
            for series in self._series.values():
                if series.labels[0] == robot:
                    series.gauges = dict.fromkeys(series.gauges, math.nan)

    def _drop_departed(self) -> None:
        """Forget the series of robots departed DEPARTED_KEPT_S ago (under the lock)."""
        now = time.monotonic()
        gone = {robot for robot, at in self._departed.items() if now - at > DEPARTED_KEPT_S}
        if gone:
            self._series = {key: s for key, s in self._series.items() if s.labels[0] not in gone}
            for robot in gone:
                del self._departed[robot]

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: every family, from a consistent copy."""
        with self._lock:
            self._drop_departed()
            copies = [(s.kind, s.labels, dict(s.counters), {f: list(b) for f, b in s.buckets.items()}, dict(s.sums),
                       dict(s.gauges)) for s in self._series.values()]
            kinds = list(self._kinds.values())
        families: dict[str, Metric] = {}
        if self._info:
            families[RUN_INFO] = InfoMetricFamily(RUN_INFO, "what runs: a robot's control rate, a server's deadline "
                                                            "and actions per chunk", value=self._info)

        def family(kind: _Kind, field: str, cls: type) -> Metric:
            name = kind.names[field]
            if name not in families:
                families[name] = cls(name, kind.docs[field], labels=kind.labelnames)
            return families[name]

        for kind, labels, counters, buckets, sums, gauges in copies:
            for field, value in counters.items():
                family(kind, field, CounterMetricFamily).add_metric(labels, value)
            for field, bounds in kind.histograms:
                cumulative = list(itertools.accumulate(buckets[field]))
                family(kind, field, HistogramMetricFamily).add_metric(
                    labels, [*zip(map(floatToGoString, bounds), cumulative), ("+Inf", cumulative[-1])], sums[field])
            for field, value in gauges.items():
                if not math.isnan(value):  # forgotten (its robot left), or never measured
                    family(kind, field, GaugeMetricFamily).add_metric(labels, value)
        for kind in kinds:  # a kind without records yet: its families, empty
            for field in kind.counters:
                family(kind, field, CounterMetricFamily)
            for field, _ in kind.histograms:
                family(kind, field, HistogramMetricFamily)
            for field in kind.gauges:
                family(kind, field, GaugeMetricFamily)
        return iter(families.values())
