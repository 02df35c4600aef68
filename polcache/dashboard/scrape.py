"""`polcache dashboard --connect ADDR`: records from a running process's Prometheus endpoint.

ADDR is `HOST:PORT` or a URL (`http://HOST:PORT/metrics`) of a `--metrics-port` endpoint of
`polcache serve` or `sim-robot`. Each scrape is turned back into records so the views are the
same as from files: counter increases become counter fields (a scrape's tick record stands for
all the ticks since the last), gauges their newest value, a histogram's new observations become
values at their bucket's midpoint, and the run's Info metric (a robot's rate, a server's
deadline) an info record. So from a scrape, distributions have bucket resolution and times
have the scrape interval's.
"""

from __future__ import annotations

import math
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from polcache.dashboard.views import MONOTONIC_KINDS
from polcache.errors import PolcacheError
from polcache.metrics.prometheus import RUN_INFO

PREFIX = "polcache_"


def scrape_url(addr: str) -> str:
    expected = f"--connect {addr!r}: expected HOST:PORT (port 1-65535) or http://HOST:PORT/metrics"
    if "://" in addr:
        url = urllib.parse.urlsplit(addr)
        try:
            port = url.port
        except ValueError:  # out of range or not a number
            port = None
        if url.scheme not in ("http", "https") or not url.hostname or not port:
            raise PolcacheError(expected)
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PolcacheError(expected)
    return f"http://{host or '127.0.0.1'}:{port}/metrics"


class PrometheusScraper:
    """`poll()` returns the records that happened since the previous poll (none on the first:
    it sets the baseline, so a long-running process's history is not replayed at one instant)."""

    def __init__(self, addr: str, timeout_s: float = 2.0):
        self.url = scrape_url(addr)
        self.timeout_s = timeout_s
        self._last: dict[tuple, float] | None = None
        self._first_seen: dict[frozenset, float] = {}  # per run Info sample: when first scraped (its run's start)
        self.failures = 0
        self.problem: str | None = None  # why the last scrape gave nothing (shown on the page), None if it did

    def poll(self) -> list[dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                current, infos = parse_exposition(response.read().decode())
        except OSError as exc:  # the process may be starting or gone; keep trying
            return self._failed(f"cannot reach it ({getattr(exc, 'reason', None) or exc})")
        except ValueError as exc:  # not UTF-8, not the Prometheus text format: another service on that port?
            return self._failed(f"not a Prometheus endpoint ({str(exc)[:80]})")
        self.problem = None
        last, self._last = self._last, current
        # an Info sample is the same run's at every scrape: stamped when first seen, it is one run, not one per scrape
        stamped = [info_record(labels, self._first_seen.setdefault(frozenset(labels.items()), time.time()))
                   for labels in infos]
        return stamped + ([] if last is None else records_between(last, current))

    def _failed(self, why: str) -> list[dict[str, Any]]:
        self.failures += 1
        self.problem = f"{self.url}: {why}"
        return []


def parse_exposition(text: str) -> tuple[dict[tuple, float], list[dict[str, str]]]:
    """{(kind, field, role, robot, code, le): value} for polcache's series, and the labels of each
    run Info sample."""
    out, infos = {}, []
    for family in text_string_to_metric_families(text):
        if family.name == f"{RUN_INFO}_info":
            infos += [sample.labels for sample in family.samples]
            continue
        if not family.name.startswith(PREFIX) or family.type not in ("counter", "histogram", "gauge"):
            continue
        kind, _, field = family.name[len(PREFIX):].partition("_")
        for sample in family.samples:
            labels = sample.labels
            if family.type == "counter" and sample.name.endswith("_total"):
                key = (kind, field, "counter", labels.get("robot", ""), labels.get("code"), None)
            elif family.type == "histogram" and sample.name.endswith("_bucket"):
                key = (kind, field.removesuffix("_seconds") + "_ms", "bucket", labels.get("robot", ""), None,
                       float(labels["le"]))
            elif family.type == "gauge" and sample.name == family.name:
                key = (kind, field, "gauge", labels.get("robot", ""), None, None)
            else:
                continue
            out[key] = sample.value
    return out, infos


def info_record(labels: dict[str, str], t: float) -> dict[str, Any]:
    """A run Info sample as a metrics file's info line holds it (numbers as numbers, the server's
    n_action_steps in its policy), at wall time `t`; a number that is none (another exporter's
    labels) is left out."""
    record: dict[str, Any] = {"kind": "info", "t": t, "role": labels.get("role"), "robot": labels.get("robot")}
    numbers = {}
    for field in ("hz", "deadline_ms", "n_action_steps"):
        try:
            value = float(labels[field])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            numbers[field] = value
    if "n_action_steps" in numbers:
        record["policy"] = {"n_action_steps": int(numbers.pop("n_action_steps"))}
    return {**record, **numbers}


def records_between(last: dict[tuple, float], current: dict[tuple, float]) -> list[dict[str, Any]]:
    now = {"wall": time.time(), "monotonic": time.monotonic()}
    records: list[dict[str, Any]] = []
    counters: dict[tuple, dict[str, Any]] = defaultdict(dict)
    buckets: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for key, value in current.items():
        kind, field, role, robot, code, le = key
        if role == "counter":
            delta = value - last.get(key, 0.0)
            if delta > 0:
                counters[(kind, robot, code)][field] = delta
        elif role == "gauge":
            counters[(kind, robot, None)][field] = value
        else:
            buckets[(kind, field, robot)].append((le, value - last.get(key, 0.0)))
    for (kind, robot, code), fields in counters.items():
        extra = {"code": code} if code is not None else {}
        records.append({"kind": kind, "t": _clock(kind, now), "robot": robot, **extra, **fields})
    for (kind, field, robot), cumulative in buckets.items():
        cumulative.sort()
        below, lower = 0.0, 0.0
        for le, count in cumulative:
            n = int(round(count - below))
            value_s = lower if math.isinf(le) else (lower + le) / 2
            records += [{"kind": kind, "t": _clock(kind, now), "robot": robot, field: value_s * 1e3}] * max(n, 0)
            below, lower = count, (le if not math.isinf(le) else lower)
    return records


def _clock(kind: str, now: dict[str, float]) -> float:
    return now["monotonic"] if kind in MONOTONIC_KINDS else now["wall"]
