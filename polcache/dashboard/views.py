"""What the dashboard and the report show, computed once from metrics records.

`RunState` takes records (the lines of the server's and robots' metrics files, or records
made from a Prometheus scrape) and `views()` turns them into plain JSON-ready plot specs of
four types: `line` (series of x/y, optional horizontal reference lines), `hist` (bin edges and
counts per series, optional vertical reference lines), `bars` (stacked values per robot) and
`heatmap` (rows x columns). The live page draws them in the browser and `polcache report` with
matplotlib, so both show exactly the same numbers.

Clocks: `tick` and `chunk` records carry the robot's monotonic clock, `request` and `error`
records wall time. A file's `info` line holds both clocks at one instant; without one we use
this machine's offset (the same machine's monotonic clock is shared by all its processes).

A robot's ticks pausing for over PAUSE_S and over PAUSE_PERIODS of its periods (a run stopped, and the
next appended to its file) break its series: no rate is computed across the pause, and every line
view of the robot gets a null point in it, where the page and the report draw no segment.

Robots are told apart by name. A robot's own records (ticks, chunks, its info line) from a second
source (file or scraped endpoint) under a name an earlier source already used are shown as
"NAME (2)" (then "(3)"...) rather than merged into one series, and `_meta.notes` says so. The
server's records name only the robot, so those of robots sharing a name stay under NAME.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import defaultdict, deque
from typing import Any, Iterable, NamedTuple

import numpy as np

from polcache.policy.ops import OP_NAMES
from polcache.serve.records import NO_HANDSHAKE
from polcache_client.protocol import MAX_TIME_S, default_deadline_ms

log = logging.getLogger("polcache.dashboard")

MONOTONIC_KINDS = ("tick", "chunk")
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "encode")
SERVER_TOTAL = "server (total)"  # a robot's chunks' server time, for robots the server's records do not cover
QUANTILES = (50, 95, 99)
LIVE_SLACK_S = 1.0  # load samples this long after the newest record still belong to a run (records arrive late)
PAUSE_S, PAUSE_PERIODS = 1.0, 10  # a gap in a robot's ticks longer than both breaks its series


class Ticks(NamedTuple):
    """A robot's ticks, as the views break its series at pauses (RunState._ticks_of)."""

    t: np.ndarray  # seconds since the run's start, in order
    counts: np.ndarray  # the ticks each record stands for: 1 from a file, all since the last from a scrape
    periods: np.ndarray  # np.diff(t)
    paused: np.ndarray  # per period: a pause, not a period
    pauses: np.ndarray  # (start, end) of each pause: the ticks on either side


# Every view, in page order: id -> (title, type). The page and the report iterate this table.
VIEWS = {
    "latency": ("observation-to-action latency (ms): p50/p95/p99 per interval vs deadline", "line"),
    "latency_hist": ("observation-to-action latency histogram (ms)", "hist"),
    "stages": ("per-stage mean (ms): server stages, then network + wait for the tick", "bars"),
    "rate": ("control loop achieved rate (Hz) vs target", "line"),
    "period_error": ("period error (ms): p50/p99 per interval", "line"),
    "period_error_hist": ("period error histogram (ms)", "hist"),
    "deadline": ("deadline misses (cumulative): robot ticks without a fresh action, server requests over budget",
                 "line"),
    "queue": ("action queue depth (actions left in the newest chunk), mean per interval", "line"),
    "starvation": ("starvation: safe stops and missed ticks (cumulative)", "line"),
    "drops": ("dropped actions (each chunk's actions past due on arrival: chunks overlap, so they outnumber ticks), "
              "stale chunks, observations not sent, superseded (cumulative)", "line"),
    "inference": ("inference time per chunk (ms), server side: p50 and max per interval", "line"),
    "cache": ("cache schedule (block x denoising step)", "heatmap"),
    "system": ("CPU load (%) and GPU utilisation (%) of this machine", "line"),
}
TICK_VALUES = ("period_error_ms", "queue_depth")  # what a tick measured, not counted
SUMMARY_COLUMNS = ("robot", "chunks", "latency p50 ms", "p95 ms", "p99 ms", "deadline ms (newest run)", "ticks",
                   "ticks without fresh action", "safe stops", "missed ticks", "period error p99 ms")
COUNT_VIEWS = {"latency_hist", "period_error_hist", "deadline", "starvation", "drops"}  # whole-number axes
# Drawn from the robot's own records only (its ticks and chunks), which a robot on another computer writes there
ROBOT_VIEWS = {"latency", "latency_hist", "rate", "period_error", "period_error_hist", "queue", "starvation"}
NO_ROBOT_RECORDS = ("no robot records (yet): a robot writes these to its own metrics file (sim-robot --metrics-file, "
                    "the client's MetricsFile); for a robot on another computer, copy its file here and give it with "
                    "another --metrics")
# The per-stage bars' colours by name: a page without server records has no stage bars before the
# network's, which took the first stage's colour there and another here.
BAR_ORDER = (*STAGES, SERVER_TOTAL, "network + tick wait")


class Columns:
    """One robot's records of one kind as columns (wall time, and each numeric field; NaN where
    a record lacks it): stored once on arrival, so a page poll converts deques, not dicts."""

    def __init__(self, keep: int | None):
        self.keep = keep
        self.t: deque[float] = deque(maxlen=keep)
        self.fields: dict[str, deque[float]] = {}
        # per field, the sum of the records no longer kept (past `keep`): cumulative counts stay whole-run totals
        self.dropped: dict[str, float] = defaultdict(float)
        self.dropped_records = 0

    def __len__(self) -> int:
        return len(self.t)

    def append(self, wall: float, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name != "t" and name not in self.fields and (value is None or isinstance(value, (int, float))):
                self.fields[name] = deque([math.nan] * len(self.t), maxlen=self.keep)
        if len(self.t) == self.keep:  # the oldest record makes room
            self.dropped_records += 1
            for name, column in self.fields.items():
                if math.isfinite(column[0]):
                    self.dropped[name] += column[0]
        self.t.append(wall)
        for name, column in self.fields.items():
            column.append(_number(record.get(name)))

    def column(self, field: str) -> np.ndarray:
        """"" is the time; an unknown field is all NaN."""
        if not field:
            return np.array(self.t, dtype=np.float64)
        if field not in self.fields:
            return np.full(len(self.t), math.nan)
        return np.array(self.fields[field], dtype=np.float64)


class RunState:
    """Records of any number of robots and servers, `keep` newest per robot and kind."""

    def __init__(self, keep: int | None = 20_000):
        self.keep = keep
        self.records: dict[tuple[str, str], Columns] = defaultdict(lambda: Columns(self.keep))
        self.server: dict[str, Any] | None = None  # the newest server info line
        self.robot_hz: dict[str, float] = {}  # the newest
        # Each run's, for the reference lines: (wall time of its info line, its deadline setting and chunk length),
        # and per robot (wall time, hz), in time order. A file holding two runs judged the first by the second's.
        self.server_runs: list[tuple[float, tuple[float | None, int | None]]] = []
        self.robot_runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.system: deque = deque(maxlen=keep)  # (wall time, cpu %, gpu % or None)
        self._local_offset = time.time() - time.monotonic()
        self.t0: float | None = None
        self.bad_records = 0
        self._columns: dict[tuple[str, str, str], np.ndarray] = {}
        self._ticks: dict[str, Ticks] = {}  # per views() call: robot -> its tick times, periods and pauses
        self._unnamed: dict[str, Any] = {}  # the source of records added without one
        self._owners: dict[str, list[dict[str, Any]]] = {}  # robot name -> the sources of its own records, in order
        self._labels: set[str] = set()  # every name a robot's own records are shown under
        self._guessed: set[str] = set()  # sources whose robot records came before any info line: clock guessed

    def add(self, records: Iterable[dict[str, Any]], source: dict[str, Any] | None = None) -> None:
        """`source` carries per-source context (one dict per file or endpoint, the same at each call):
        its "name" (shown in notes), its info line's clock offset once seen, the names its robots are
        shown under. A record whose fields have the wrong types is counted in `bad_records` and skipped."""
        source = source if source is not None else self._unnamed
        for r in records:
            try:
                self._add(r, source)
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # checked before anything is stored
                if not self.bad_records:  # the first one's reason: a bug here would otherwise only be counted
                    log.warning("dashboard: a record of kind %r skipped as unreadable (%s: %s); more are only counted",
                                r.get("kind") if isinstance(r, dict) else type(r).__name__, type(exc).__name__, exc)
                self.bad_records += 1

    def _add(self, r: dict[str, Any], source: dict[str, Any]) -> None:
        kind, t = r.get("kind"), r.get("t")
        if kind == "info":
            if "monotonic" in r:
                source["offset"] = float(t) - float(r["monotonic"])
            since = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else -math.inf
            if r.get("role") == "server":
                _check_plan(((r.get("backend") or {}).get("cache") or {}).get("plan"))
                self.server = r
                steps = (r.get("policy") or {}).get("n_action_steps")
                _noted(self.server_runs, since, (float(r["deadline_ms"]) if r.get("deadline_ms") else None,
                                                 int(steps) if steps else None))
            elif r.get("role") == "robot" and r.get("robot") and r.get("hz"):
                robot = self._robot(str(r["robot"]), source)
                self.robot_hz[robot] = float(r["hz"])
                _noted(self.robot_runs[robot], since, float(r["hz"]))
            return
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -MAX_TIME_S <= t <= MAX_TIME_S:
            raise ValueError("t")  # NaN, or a time no clock gives, which would stretch every view's span
        if kind in MONOTONIC_KINDS and "offset" not in source and "name" in source:
            self._guessed.add(str(source["name"]))
        wall = t + source.get("offset", self._local_offset) if kind in MONOTONIC_KINDS else t
        robot = str(r.get("robot") or "robot")
        if kind in MONOTONIC_KINDS:  # the robot's own records
            robot = self._robot(robot, source)
        if kind == "error":
            self.errors[(robot, str(r.get("code")))] += int(r.get("errors", 1))
        self.records[(robot, kind)].append(wall, r)
        self.t0 = wall if self.t0 is None else min(self.t0, wall)

    def _robot(self, name: str, source: dict[str, Any]) -> str:
        """The name `source`'s robot `name` is shown under: NAME for the first source using it, then
        "NAME (2)", "NAME (3)": two robots' records in one series would mix their rates and counts."""
        shown = source.setdefault("robots", {})
        if name not in shown:
            owners = self._owners.setdefault(name, [])
            owners.append(source)
            k = len(owners)
            label = name if k == 1 else f"{name} ({k})"
            while label in self._labels:  # a robot really named "NAME (2)" is not another's second
                k = max(k, 1) + 1
                label = f"{name} ({k})"
            self._labels.add(label)
            shown[name] = label
        return shown[name]

    def notes(self) -> list[str]:
        """One line per robot name that several sources use; one where records were let go (`keep`)."""
        notes = [f"{len(owners)} sources name their robot {name!r} "
                 f"({', '.join(str(o.get('name', 'unnamed')) for o in owners)}): shown as "
                 f"{', '.join(o['robots'][name] for o in owners)}; the server's records of them cannot be told apart "
                 f"and are all under {name!r}; give each robot its own name (sim-robot --name)"
                 for name, owners in sorted(self._owners.items()) if len(owners) > 1]
        if self._guessed:  # a damaged or missing info line: the run read as 46 million seconds long, unsaid
            notes.append(f"{', '.join(sorted(self._guessed))}: robot records before any info line (missing or "
                         f"damaged), placed on this machine's monotonic clock: right only where the robot ran here")
        trimmed = sorted({robot for (robot, _), rows in self.records.items() if rows.dropped_records})
        if trimmed:
            notes.append(f"this page keeps the newest {self.keep:,} records of each kind per robot: the plots and "
                         f"the whole-run table's percentiles of {', '.join(trimmed)} cover those, from the oldest kept "
                         f"on (the counts include the older ones; `polcache report` reads the whole file)")
        return notes

    def add_system(self, wall: float, cpu: float | None, gpu: float | None) -> None:
        self.system.append((wall, cpu, gpu))

    # ------------------------------------------------------------ views

    def views(self, interval_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Every view of VIEWS as {"title", "type", ...data}; `interval_s` is the width of the
        per-interval statistics (default: about 100 intervals over the whole run, at least 1 s)."""
        span = self._span()
        interval = interval_s or max(1.0, span / 100)
        self._columns = {}  # per call: records change between calls
        # a record of no tick (the loop's own safe stop, a scrape interval without ticks) is no tick time
        self._ticks = {robot: self._ticks_of(robot, t[n > 0], n[n > 0])
                       for robot, (t, n) in self._series("tick", "ticks").items()}
        out = {}
        robot_records = bool(self._ticks) or bool(self._series("chunk", "latency_ms"))
        for view, (title, kind) in VIEWS.items():
            out[view] = {"title": title, "type": kind, **getattr(self, f"_view_{view}")(interval)}
            if view in COUNT_VIEWS:
                out[view]["integer"] = True
            if view in ROBOT_VIEWS and not robot_records:  # blank axes said nothing (a workstation's server alone)
                out[view].setdefault("note", NO_ROBOT_RECORDS)
        out["_meta"] = {"robots": self.robots(), "interval_s": interval, "span_s": span, "bad_records": self.bad_records,
                        "notes": self.notes(), "summary": self._summary(),
                        "errors": {f"{robot}: {code}": n for (robot, code), n in sorted(self.errors.items())}}
        return out

    def robots(self) -> list[str]:
        """The robots with records; not the server's label for refused connections that never shook
        hands (their refusals are counted under it with the others')."""
        return sorted({robot for robot, _ in self.records} - {NO_HANDSHAKE})

    def _span(self) -> float:
        ends = [c.t[-1] for c in self.records.values() if len(c)]
        return max(ends) - self.t0 if ends and self.t0 is not None else 0.0

    def _series(self, kind: str, field: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per robot: (seconds since the run's start, values) of one field in time order (records
        need not arrive in it: a wall clock stepped back), non-finite dropped. Rates and cumulative
        counts rely on the order."""
        out = {}
        for (robot, k), rows in self.records.items():
            if k != kind or not rows:
                continue
            t = self._column(robot, kind, "") - (self.t0 or 0.0)
            v = self._column(robot, kind, field)
            order = np.argsort(t, kind="stable")
            t, v = t[order], v[order]
            keep = np.isfinite(v)
            if kind == "tick" and field in TICK_VALUES:  # the loop's own stop record (ticks 0) is no tick: its
                keep &= self._column(robot, kind, "ticks")[order] != 0  # queue of 0 pulled the last mean down
            if keep.any():
                out[robot] = (t[keep], v[keep])
        return out

    def _column(self, robot: str, kind: str, field: str) -> np.ndarray:
        """One field of a robot's records as floats; "" is the time. Cached for one views() call."""
        key = (robot, kind, field)
        if key not in self._columns:
            self._columns[key] = self.records[(robot, kind)].column(field)
        return self._columns[key]

    def _ticks_of(self, robot: str, t: np.ndarray, counts: np.ndarray) -> Ticks:
        """A robot's tick records' times, the periods between them, which of those are pauses, and the
        pauses' middles (where its series break), found once per views() call for every view. A pause
        is a period longer than its ticks take by both PAUSE_S and PAUSE_PERIODS of the robot's period:
        its info line's, else its ticks' median (a robot ticking slower than 1 Hz is no pause)."""
        periods = np.diff(t)
        hz = self.robot_hz.get(robot)
        period = 1 / hz if hz else float(np.median(periods / counts[1:])) if len(periods) else 0.0
        paused = periods - counts[1:] * period > max(PAUSE_S, PAUSE_PERIODS * period)
        gaps = np.flatnonzero(paused)
        return Ticks(t, counts, periods, paused, np.stack([t[gaps], t[gaps + 1]], axis=1))

    def _broken(self, robot: str, series: dict[str, Any]) -> dict[str, Any]:
        """`series` with a null point in each pause of the robot's ticks that it spans with a gap of its
        own (its points around the pause's middle further apart than 1.5 of its usual spacing, a bin,
        and half the pause): without it the line ran straight from one run's last point to the next
        run's first. A series that went on through the pause (the server's, while the robot's file was
        cut short) is not broken, however short the pause against the bins."""
        x, y = list(series["x"]), list(series["y"])
        pauses = self._ticks[robot].pauses if robot in self._ticks else ()
        spacing = float(np.median(np.diff(x))) if len(x) > 2 else 0.0
        for start, end in pauses:
            middle = (start + end) / 2
            i = bisect.bisect_left(x, middle)
            if 0 < i < len(x) and x[i] - x[i - 1] > max(1.5 * spacing, (end - start) / 2):
                x.insert(i, _round(middle))
                y.insert(i, None)
        return {**series, "x": x, "y": y}

    def _binned(self, kind: str, field: str, interval: float, stats: dict[str, str | float]) -> list[dict[str, Any]]:
        series = []
        for robot, (t, v) in sorted(self._series(kind, field).items()):
            series += [self._broken(robot, s) for s in _binned_values(robot, t, v, interval, stats)]
        return series

    def _cumulative(self, kind: str, field: str, label: str) -> list[dict[str, Any]]:
        """Running totals from the run's start: the records no longer kept (the live page's) included."""
        series = []
        for robot, (t, v) in sorted(self._series(kind, field).items()):
            x, y = _thin(t, self.records[(robot, kind)].dropped[field] + np.cumsum(v))
            series.append(self._broken(robot, {"name": f"{robot} {label}", "x": x, "y": y}))
        return series

    def _deadlines_ms(self) -> list[dict[str, Any]]:
        """The deadline the server held each robot's chunks to, run by run: its --deadline-ms (one line
        for every robot), else the default for its policy's chunk at the robot's rate."""
        if all(deadline for _, (deadline, _) in self.server_runs):  # none, or every run's set
            return self._reference_lines("deadline", {"": [(since, d) for since, (d, _) in self.server_runs]})
        # per robot, run by run: a robot's run (its info line) is served by the server's run in effect when it
        # starts (the robot starts after its server; taking every server start as a change too paired one run's
        # chunk with another's rate, and a robot's first run with a server run from before it existed)
        return self._reference_lines("deadline", {robot: [(since, self._deadline_ms(since, hz)) for since, hz in rates]
                                                  for robot, rates in self.robot_runs.items()})

    def _deadline_ms(self, since: float, hz: float | None) -> float | None:
        """The deadline of a robot's run at `hz` that started at `since`: the server's --deadline-ms
        then, else the default for its policy's chunk at that rate."""
        if not self.server_runs:
            return None
        deadline, steps = _in_effect(self.server_runs, since)
        return deadline or (_round(default_deadline_ms(steps, hz)) if steps and hz else None)

    def _reference_lines(self, label: str, runs: dict[str, list[tuple[float, float | None]]]) -> list[dict[str, Any]]:
        """Horizontal reference lines from values that hold from a time on (per robot, or "" for all):
        one line per value and span, named by the robots at it ("deadline armA, armB"; a line per
        robot drew equal ones on top of each other, their labels overprinted). A value held for part
        of the run only (a file holding two runs with other settings) spans that part ("x0", "x1",
        seconds since the run's start) and says so in its name."""
        lines: dict[tuple[float, float | None, float | None], list[str]] = defaultdict(list)
        for robot, changes in sorted(runs.items()):
            kept = [(since, value) for i, (since, value) in enumerate(changes) if i == 0 or value != changes[i - 1][1]]
            for i, (since, value) in enumerate(kept):
                if value is None:
                    continue
                x0 = _round(since - (self.t0 or 0.0)) if i > 0 else None
                x1 = _round(kept[i + 1][0] - (self.t0 or 0.0)) if i + 1 < len(kept) else None
                lines[(_round(value), x0, x1)].append(robot)
        out = []
        for (value, x0, x1), robots in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or -math.inf)):
            part = ("" if x0 is None and x1 is None else f" (from {x0:g} s)" if x1 is None
                    else f" (until {x1:g} s)" if x0 is None else f" ({x0:g}-{x1:g} s)")
            named = ", ".join(r for r in robots if r)
            out.append({"name": f"{label}{' ' + named if named else ''}{part}", "y": value,
                        **({} if x0 is None else {"x0": x0}), **({} if x1 is None else {"x1": x1})})
        return out

    def _view_latency(self, interval: float) -> dict[str, Any]:
        stats = {f"p{q}": q for q in QUANTILES}
        series = self._binned("chunk", "latency_ms", interval, stats)
        view: dict[str, Any] = {"series": series, "hlines": self._deadlines_ms()}
        robots = sorted(self._series("chunk", "latency_ms"))
        if not self.server_runs:  # files without info lines (copied in part, another program's) drew no line unsaid
            unknown = "no deadline line: none of the files holds the server's info line (give the server's file)"
        elif all(deadline for _, (deadline, _) in self.server_runs):
            unknown = ""
        else:
            unknown = ", ".join(r for r in robots if r not in self.robot_runs)
            unknown = unknown and f"no deadline line for {unknown}: its rate is unknown (no info line in its file)"
        if robots and unknown:
            view["note"] = unknown
        return view

    def _view_latency_hist(self, interval: float) -> dict[str, Any]:
        # a robot stamps a chunk's arrival at its next tick: latencies sit a control period apart, and
        # bars narrower than that alternated with empty ones
        rates = {self.robot_hz.get(robot) for robot in self._series("chunk", "latency_ms")}
        period_ms = 1e3 / rates.pop() if len(rates) == 1 and None not in rates else None
        return {**self._histograms("chunk", "latency_ms", step=period_ms),
                "vlines": [{"name": d["name"], "x": d["y"]} for d in self._deadlines_ms()]}

    def _view_stages(self, interval: float) -> dict[str, Any]:
        requests = {robot: [self._mean("request", robot, f"{s}_ms") for s in STAGES] for robot in self.robots()
                    if self.records.get((robot, "request"))}
        network = {}
        for robot in self.robots():
            if self.records.get((robot, "chunk")):
                gaps = self._column(robot, "chunk", "latency_ms") - self._column(robot, "chunk", "server_ms")
                gaps = gaps[np.isfinite(gaps)]
                network[robot] = _round(float(gaps.mean())) if len(gaps) else None
        robots = sorted(set(requests) | set(network))
        stacks = [{"name": s, "values": [requests.get(r, [None] * len(STAGES))[i] for r in robots]}
                  for i, s in enumerate(STAGES)]
        unstaged = [r for r in robots if r not in requests]  # no server records of it: its chunks' server time
        if unstaged:
            stacks.append({"name": SERVER_TOTAL, "values": [self._mean("chunk", r, "server_ms") if r in unstaged
                                                            else None for r in robots]})
        stacks.append({"name": "network + tick wait", "values": [network.get(r) for r in robots]})
        stacks = [{**stack, "color": BAR_ORDER.index(stack["name"])} for stack in stacks
                  if any(v is not None for v in stack["values"])]  # no legend for none
        view = {"categories": robots, "stacks": stacks}
        if unstaged:
            view["note"] = (f"no server records of {', '.join(unstaged)}: its server time is one bar, "
                            f"{SERVER_TOTAL!r}, from the robot's own records ({self._why_unserved(unstaged)})")
        return view

    def _why_unserved(self, robots: list[str]) -> str:
        """Why robots' own records have no server records beside them: a robot shown as "NAME (2)" shares
        its name with another, whose server records hold both robots' (the server's name only them)."""
        second = {label: name for name, owners in self._owners.items() for owner in owners[1:]
                  if (label := owner["robots"][name]) in robots}
        if not second:
            return "give the server's metrics file too for its stages"
        return (f"the server's records of {', '.join(sorted(second))} are under "
                f"{', '.join(repr(n) for n in sorted(set(second.values())))} with those of the robot of that name: "
                f"give each robot its own name")

    def _view_rate(self, interval: float) -> dict[str, Any]:
        series = []  # ticks / their periods' time per interval: a partly covered interval reads right too
        for robot, ticks in sorted(self._ticks.items()):
            within = ~ticks.paused  # a pause is no period: it read as a rate near 0
            if within.any():
                series += [self._broken(robot, s) for s in _binned_values(
                    robot, ticks.t[1:][within], ticks.periods[within], interval, {"": "rate"},
                    events=ticks.counts[1:][within])]
        view: dict[str, Any] = {"series": series, "hlines": self._reference_lines("target", self.robot_runs)}
        if unknown := [robot for robot in sorted(self._ticks) if robot not in self.robot_runs]:
            view["note"] = f"no target rate for {', '.join(unknown)}: no info line in its file (polcache writes one first)"
        return view

    def _view_period_error(self, interval: float) -> dict[str, Any]:
        return {"series": self._binned("tick", "period_error_ms", interval, {"p50": 50, "p99": 99}), "hlines": []}

    def _view_period_error_hist(self, interval: float) -> dict[str, Any]:
        return {**self._histograms("tick", "period_error_ms"), "vlines": []}

    def _view_deadline(self, interval: float) -> dict[str, Any]:
        return {"series": self._cumulative("tick", "deadline_miss", "ticks without fresh action")
                + self._cumulative("request", "deadline_miss", "requests over budget"), "hlines": []}

    def _view_queue(self, interval: float) -> dict[str, Any]:
        return {"series": self._binned("tick", "queue_depth", interval, {"": "mean"}), "hlines": []}

    def _view_starvation(self, interval: float) -> dict[str, Any]:
        return {"series": self._cumulative("tick", "safe_stops", "safe stops")
                + self._cumulative("tick", "missed_ticks", "missed ticks"), "hlines": []}

    def _view_drops(self, interval: float) -> dict[str, Any]:
        return {"series": self._cumulative("chunk", "dropped_actions", "dropped actions")
                + self._cumulative("chunk", "stale_chunks", "stale chunks")
                + self._cumulative("tick", "obs_dropped", "observations not sent")
                + self._cumulative("request", "superseded", "superseded"), "hlines": []}

    def _view_inference(self, interval: float) -> dict[str, Any]:
        """The server's records of each inference; for a robot the server's records do not cover (only the
        robot's file given), the inference time its chunks carry, said in a note."""
        stats: dict[str, str | float] = {"p50": 50, "max": "max"}
        served = {robot for robot, kind in self.records if kind == "request" and self.records[(robot, kind)]}
        series = self._binned("request", "inference_ms", interval, stats)
        robot_side = {robot: tv for robot, tv in self._series("chunk", "inference_ms").items() if robot not in served}
        for robot, (t, v) in sorted(robot_side.items()):
            series += [self._broken(robot, s) for s in _binned_values(robot, t, v, interval, stats)]
        view: dict[str, Any] = {"series": series, "hlines": []}
        if robot_side:
            view["note"] = (f"{', '.join(sorted(robot_side))}: from the robot's chunk records, the inference time "
                            f"each chunk's server reported (no server records of it: "
                            f"{self._why_unserved(sorted(robot_side))})")
        return view

    def _view_cache(self, interval: float) -> dict[str, Any]:
        cache = ((self.server.get("backend") or {}).get("cache") or {}) if self.server else {}
        plan = cache.get("plan")
        if not plan:
            note = "no cache plan (uncached policy, or no server info line)" if self.server else "no server info yet"
            return {"rows": [], "cols": [], "z": [], "note": note}
        names = cache.get("block_names") or [f"block {i}" for i in range(len(plan[0]))]
        limit = cache.get("compute_limit")
        note = (f"{cache.get('method', '')} {cache.get('source', '')}: {cache.get('block_evals')} of "
                f"{cache.get('block_evals_uncached')} block evaluations, compute limit "
                f"{limit if limit is not None else 'n/a'}x")
        return {"rows": names, "cols": list(range(len(plan))), "z": [list(col) for col in zip(*plan)],
                "legend": {op: name for op, name in OP_NAMES.items() if any(op in step for step in plan)},
                "note": note}

    def _view_system(self, interval: float) -> dict[str, Any]:
        """Samples from the run's first record on: earlier ones (a dashboard started before the run)
        put the axis below 0, and moving the origin to them would shift every other view. And up to a
        second past its last record: the load is sampled now, so a finished run's files opened
        later drew today's load on the run's time line, as if it were the run's."""
        t0 = self.t0 if self.t0 is not None else (self.system[0][0] if self.system else 0.0)
        end = t0 + self._span() + LIVE_SLACK_S if self.t0 is not None else math.inf
        rows = [row for row in self.system if t0 <= row[0] <= end]
        if not rows:
            note = ("this machine's load is sampled live, and the records ended before this page started: "
                    "no load of theirs to show" if self.system and self.t0 is not None else None)
            return {"series": [], "hlines": [], **({"note": note} if note else {})}
        t = np.array([w for w, _, _ in rows]) - t0
        series = []
        for i, name in ((1, "CPU %"), (2, "GPU %")):  # the mean per interval, as the other views: every sample (two
            values = np.array([np.nan if row[i] is None else row[i] for row in rows], dtype=np.float64)  # a second)
            sampled = np.isfinite(values)  # made the page's answer grow with the run, 350 KB after three hours
            if sampled.any():
                series += _binned_values(name, t[sampled], values[sampled], interval, {"": "mean"})
        view: dict[str, Any] = {"series": series, "hlines": [{"name": "100%", "y": 100.0}]}
        if all(row[2] is None for row in rows):  # said, or an empty GPU line reads as an idle GPU
            view["note"] = "no GPU utilisation: nvidia-smi is not on this machine or reports no GPU"
        return view

    def _histograms(self, kind: str, field: str, bins: int = 40, step: float | None = None) -> dict[str, Any]:
        """{"series": one histogram per robot} over the values up to their 99.5th percentile (a few
        outliers must not squash the picture); the last bar also counts those above, which the
        "note" says. `step`: values that come `step` apart (a control period) get bars a whole
        number of steps wide, each value in a bar's middle."""
        series = self._series(kind, field)
        if not series:
            return {"series": []}
        every = np.concatenate([v for _, v in series.values()])
        lo, hi = np.percentile(every, [0, 99.5])
        if step and hi - lo > step:
            width = step * math.ceil((hi - lo) / (bins * step))
            edges = lo - width / 2 + width * np.arange(math.floor((hi - lo) / width + 0.5) + 2)  # the last over hi
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        out = []
        for robot, (_, v) in sorted(series.items()):
            counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), edges)
            out.append({"name": robot, "edges": [_round(e) for e in edges], "counts": counts.tolist()})
        above = int((every > edges[-1]).sum())
        if not above:
            return {"series": out}
        return {"series": out, "note": f"{above} value{'s' if above > 1 else ''} above {edges[-1]:.3g} (up to "
                                       f"{every.max():.3g}) counted in the last bar"}

    def _summary(self) -> dict[str, Any]:
        """Per robot with records of its own, the whole run's figures (the plots give them per interval):
        its chunks' latency percentiles beside the deadline of its newest run, and its loop's totals.
        The question a team asks first, whether the robot gets its actions in time, in one row."""
        rows = []
        for robot in self.robots():
            latency = self._column(robot, "chunk", "latency_ms") if self.records.get((robot, "chunk")) else np.array([])
            latency = latency[np.isfinite(latency)]
            ticks = self.records.get((robot, "tick"))
            if not len(latency) and not ticks:
                continue  # the server's records alone: the stages and inference views have them
            errors = self._column(robot, "tick", "period_error_ms") if ticks else np.array([])
            errors = errors[np.isfinite(errors)]
            rows.append([robot, self._total(robot, "chunk", "chunks"),
                         *(_round(np.percentile(latency, q)) if len(latency) else None for q in QUANTILES),
                         self._deadline_now(robot), self._total(robot, "tick", "ticks"),
                         self._total(robot, "tick", "deadline_miss"), self._total(robot, "tick", "safe_stops"),
                         self._total(robot, "tick", "missed_ticks"),
                         _round(np.percentile(errors, 99)) if len(errors) else None])
        return {"columns": SUMMARY_COLUMNS, "rows": rows}

    def _total(self, robot: str, kind: str, field: str) -> int:
        """A counter's whole-run total, the records no longer kept included."""
        rows = self.records.get((robot, kind))
        if not rows:
            return 0
        values = self._column(robot, kind, field)
        return int(rows.dropped[field] + values[np.isfinite(values)].sum())

    def _deadline_now(self, robot: str) -> float | None:
        """The deadline of the robot's newest run (without an info line of its own: the server's newest)."""
        rates = self.robot_runs.get(robot)
        return self._deadline_ms(*rates[-1]) if rates else self._deadline_ms(math.inf, None)

    def _mean(self, kind: str, robot: str, field: str) -> float | None:
        if not self.records.get((robot, kind)):
            return None
        values = self._column(robot, kind, field)
        values = values[np.isfinite(values)]
        return _round(float(values.mean())) if len(values) else None


def _binned_values(robot: str, t: np.ndarray, v: np.ndarray, interval: float, stats: dict[str, str | float],
                   events: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One series per statistic, a point per interval (at its middle). A statistic is a
    percentile (a number, numpy's linear interpolation), "mean", "max", or "rate" (v holds the
    time each point's `events` took, default one each: events per second). Vectorised: a page poll
    computes hundreds."""
    bins = np.floor(t / interval).astype(np.int64)
    order = np.lexsort((v, bins))
    b, sv = bins[order], v[order]
    starts = np.flatnonzero(np.r_[True, np.diff(b) != 0])
    counts = np.diff(np.r_[starts, len(b)])
    x = [round(float((k + 0.5) * interval), 3) for k in b[starts]]
    series = []
    for label, stat in stats.items():
        if stat == "mean":
            y = np.add.reduceat(sv, starts) / counts
        elif stat == "max":
            y = np.maximum.reduceat(sv, starts)
        elif stat == "rate":
            y = (counts if events is None else np.add.reduceat(events[order], starts)) / np.add.reduceat(sv, starts)
        else:
            pos = starts + float(stat) / 100 * (counts - 1)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, starts + counts - 1)
            y = sv[lo] + (sv[hi] - sv[lo]) * (pos - lo)
        series.append({"name": f"{robot} {label}".strip(), "x": x, "y": [_round(value) for value in y]})
    return series


def _noted(runs: list[tuple[float, Any]], since: float, value: Any) -> None:
    """Note a run's setting from its info line, in time order; the same line again (a rotated file's copy
    of it, a scrape's repeat, a file read again) once, so the list grows with runs, not with time."""
    if (since, value) not in runs:
        bisect.insort(runs, (since, value), key=lambda run: run[0])


def _in_effect(runs: list[tuple[float, Any]], at: float) -> Any:
    """The value noted last at or before `at` (the first one's before it: it was the run's from its start)."""
    before = [value for since, value in runs if since <= at]
    return before[-1] if before else runs[0][1]


def _check_plan(plan: Any) -> None:
    """A server info line's cache plan must be a table of op codes (the heatmap draws it)."""
    if plan is None:
        return
    if not (isinstance(plan, list) and plan and all(isinstance(row, list) and len(row) == len(plan[0]) for row in plan)
            and all(op in OP_NAMES for row in plan for op in row)):
        raise ValueError("backend.cache.plan: expected equal-length rows of op codes 0-3")


def _number(value: Any) -> float:
    """A field's value as a float, NaN where it is none (or an int too large for a float)."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def _round(value: float) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def _thin(t: np.ndarray, y: np.ndarray, points: int = 200) -> tuple[list[float], list[float]]:
    """At most `points` samples of a monotone curve, always keeping the last."""
    idx = np.unique(np.r_[np.linspace(0, len(t) - 1, min(points, len(t))).astype(int), len(t) - 1])
    return [_round(x) for x in t[idx]], [_round(v) for v in y[idx]]
