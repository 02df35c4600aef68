"""Prometheus exposition through prometheus_client: histograms per robot, counters, gauges, and
the shipped Grafana dashboard only asks for series the registry exposes."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from polcache.metrics import Metrics
from polcache.metrics.prometheus import LATENCY_BUCKETS, PERIOD_ERROR_BUCKETS
from polcache.serve.records import ErrorRecord, RequestRecord
from polcache_client.records import ChunkRecord, TickRecord

GRAFANA = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "polcache.json"


def tick(error_ms=0.1, **kw):
    return TickRecord(t=1.0, epoch=0, seq=1, period_error_ms=error_ms, state="fresh", queue_depth=kw.pop("depth", 3), **kw)


def chunk(latency_ms, **kw):
    return ChunkRecord(t=1.0, epoch=0, seq=1, latency_ms=latency_ms, inference_ms=kw.pop("inference_ms", 5.0),
                       server_ms=6.0, **kw)


def request(robot, inference_ms=5.0, **kw):
    return RequestRecord(t=1.0, robot=robot, epoch=0, seq=1, decode_ms=0.1, preprocess_ms=0.05, queue_ms=0.2,
                         inference_ms=inference_ms, postprocess_ms=0.05, encode_ms=0.1, total_ms=inference_ms + 0.5,
                         queue_depth=kw.pop("queue_depth", 1), **kw)


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.prometheus_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposed_names(metrics: Metrics) -> set[str]:
    return {name for name, _ in samples(metrics)}


def every_kind(robot: str = "arm") -> Metrics:
    m = Metrics(robot=robot)
    m.record(tick())
    m.record(chunk(12.0))
    m.record(request(robot))
    m.record(ErrorRecord(t=1.0, robot=robot, code="bad_shape"))
    return m


def test_histograms_count_into_buckets_around_the_control_period():
    m = Metrics(robot="arm")
    for latency in (3.0, 12.0, 18.0, 25.0, 700.0):  # ms; a 50 Hz period is 20 ms
        m.record(chunk(latency))
    s = samples(m)
    bucket = lambda le: s[("polcache_chunk_latency_seconds_bucket", (("le", le), ("robot", "arm")))]
    assert bucket("0.005") == 1 and bucket("0.015") == 2 and bucket("0.02") == 3 and bucket("0.03") == 4
    assert bucket("1.0") == 5 and bucket("+Inf") == 5
    assert s[("polcache_chunk_latency_seconds_sum", (("robot", "arm"),))] == pytest.approx(0.758)
    assert 0.02 in LATENCY_BUCKETS and 0.001 in PERIOD_ERROR_BUCKETS


def test_a_healthy_loops_period_error_reads_as_microseconds():
    """A loop jittering 3-20 us: with a first bucket at 50 us its p99 read as 50 us (a probe's
    Grafana panel said 0.050 ms where the robot measured 0.018)."""
    m = Metrics(robot="arm")
    for error_ms in (0.003, 0.006, 0.009, 0.018):
        m.record(tick(error_ms))
    s = samples(m)
    bucket = lambda le: s[("polcache_tick_period_error_seconds_bucket", (("le", le), ("robot", "arm")))]
    assert bucket("5e-06") == 1 and bucket("1e-05") == 3 and bucket("2.5e-05") == 4


def test_series_are_labelled_per_robot_and_errors_per_code():
    m = Metrics()  # a server: requests and errors name their robot themselves
    for _ in range(3):
        m.record(request("left", deadline_miss=True))
    m.record(request("right", superseded=2, queue_depth=4))
    m.record(ErrorRecord(t=1.0, robot="left", code="bad_shape"))
    m.record(ErrorRecord(t=1.0, robot="left", code="bad_shape"))
    m.record(ErrorRecord(t=1.0, robot="right", code="non_finite"))
    s = samples(m)
    assert s[("polcache_request_requests_total", (("robot", "left"),))] == 3
    assert s[("polcache_request_deadline_miss_total", (("robot", "left"),))] == 3
    assert s[("polcache_request_deadline_miss_total", (("robot", "right"),))] == 0
    assert s[("polcache_request_superseded_total", (("robot", "right"),))] == 2
    assert s[("polcache_request_queue_depth", (("robot", "right"),))] == 4  # a gauge: the newest value
    assert s[("polcache_error_errors_total", (("code", "bad_shape"), ("robot", "left")))] == 2
    assert s[("polcache_error_errors_total", (("code", "non_finite"), ("robot", "right")))] == 1


def test_non_finite_values_are_not_observed():
    m = Metrics(robot="arm")
    m.record(chunk(10.0, inference_ms=float("nan")))
    s = samples(m)
    assert s[("polcache_chunk_inference_seconds_count", (("robot", "arm"),))] == 0
    assert s[("polcache_chunk_latency_seconds_count", (("robot", "arm"),))] == 1


def test_grafana_dashboard_asks_only_for_exposed_series():
    dashboard = json.loads(GRAFANA.read_text())
    names = exposed_names(every_kind())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(p["targets"] for p in dashboard["panels"])
    used = set()
    for expr in exprs:
        found = set(re.findall(r"polcache_[a-z_]+", expr))
        assert found, f"panel expression names no polcache metric: {expr}"
        used |= found
    assert used <= names, f"not exposed: {sorted(used - names)}"
    # the robot picker lists robots known to the server alone too (a robot without metrics of its own)
    [picker] = [v["query"] for v in dashboard["templating"]["list"] if v["name"] == "robot"]
    assert {"polcache_tick_ticks_total", "polcache_request_requests_total"} <= set(re.findall(r"polcache_[a-z_]+",
                                                                                              picker)) <= names
    for metric in ("polcache_chunk_latency_seconds_bucket", "polcache_tick_period_error_seconds_bucket",
                   "polcache_tick_deadline_miss_total", "polcache_tick_queue_depth", "polcache_error_errors_total",
                   "polcache_chunk_stale_chunks_total", "polcache_tick_safe_stops_total"):
        assert metric in used


def reference_samples(records) -> dict[tuple[str, tuple], float]:
    """The same records through prometheus_client's own Counter/Histogram/Gauge objects."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from polcache.metrics.prometheus import LABEL_FIELDS, buckets_for, metric_name

    registry, metrics = CollectorRegistry(), {}
    for r in records:
        labelnames = ("robot",) + tuple(f for f in LABEL_FIELDS if hasattr(r, f))
        labels = (r.robot,) + tuple(str(getattr(r, f)) for f in LABEL_FIELDS if hasattr(r, f))
        for field in (*r.counters, *r.summaries):
            name = metric_name(r.kind, field)
            if name not in metrics:
                metrics[name] = (Counter(name, "", labelnames, registry=registry) if field in r.counters else
                                 Histogram(name, "", labelnames, buckets=buckets_for(field), registry=registry)
                                 if field.endswith("_ms") else Gauge(name, "", labelnames, registry=registry))
            child, value = metrics[name].labels(*labels), getattr(r, field)
            if field in r.counters:
                child.inc(value)
            elif field.endswith("_ms"):
                if math.isfinite(value):
                    child.observe(value / 1e3)
            else:
                child.set(value)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_equals_prometheus_clients_own_metrics():
    """polcache counts into its own buckets (cheaper per record); a scrape must read exactly what
    prometheus_client's Histogram, Counter and Gauge would have exposed for the same records."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(400):
        robot = ["left", "right", "spare"][i % 3]
        total = float(rng.choice([rng.lognormal(0, 2), 0.02, 20.0, 1000.0, 5e3, np.nan, np.inf]))  # bucket edges too
        records.append(request(robot, inference_ms=float(rng.exponential(10.0)), queue_depth=int(rng.integers(0, 5)),
                               superseded=int(rng.integers(0, 3)), deadline_miss=bool(rng.random() < 0.2)))
        records[-1] = msgspec.structs.replace(records[-1], total_ms=total)
        if i % 7 == 0:
            records.append(ErrorRecord(t=1.0, robot=robot, code=["bad_shape", "non_finite"][i % 2]))
    m = Metrics()
    for r in records:
        m.record(r)
    ours = {k: v for k, v in samples(m).items() if not k[0].endswith("_created")}
    assert ours == reference_samples(records)


def test_declared_kinds_are_exposed_before_their_first_record():
    """A server that has served no one yet still shows what it will export (a scrape of it used to
    be an empty body, which reads as a broken endpoint)."""
    metrics = Metrics(0, kinds=(RequestRecord, ErrorRecord))
    families = {f.name: f for f in text_string_to_metric_families(metrics.prometheus_text())}
    assert families["polcache_request_total_seconds"].type == "histogram"
    assert families["polcache_error_errors"].type == "counter"
    assert families["polcache_request_queue_depth"].type == "gauge"
    assert not any(f.samples for f in families.values())
    metrics.record(request("arm"))
    after = {f.name: f for f in text_string_to_metric_families(metrics.prometheus_text())}
    assert set(after) == set(families)  # the same families, no duplicate, now with the robot's samples
    assert after["polcache_request_total_seconds"].samples and not after["polcache_error_errors"].samples


def test_a_metrics_port_in_use_is_refused_naming_the_option_and_port(tmp_path):
    """serve and sim-robot said only "error: Address already in use" (an outside probe)."""
    import socket

    from polcache.errors import PolcacheError
    from polcache.metrics import Metrics, collect_metrics, serve_prometheus

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PolcacheError, match=rf"^--metrics-port {port}: cannot serve Prometheus metrics on "
                                                rf"127.0.0.1:{port}: Address already in use$"):
            serve_prometheus(Metrics(), port)
        # the whole run's metrics: refused before its file is written or its writer thread started
        with pytest.raises(PolcacheError, match=f"--metrics-port {port}"):
            with collect_metrics(tmp_path / "m.jsonl", port=port, info={"role": "server"}):
                pass
        assert not (tmp_path / "m.jsonl").exists()
        assert not [t for t in threading.enumerate() if t.name == "polcache-metrics-writer"]
