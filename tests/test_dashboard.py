"""The dashboard's data path: following rotated and truncated files, views from records of
several robots, Prometheus scrapes as records, the live page's JSON, the static report."""

from __future__ import annotations

import json
import os
import re
import time
import types
import urllib.request

import numpy as np
import pytest

from polcache.cli import main
from polcache.dashboard import Dashboard, RunState, write_report
from polcache.dashboard.scrape import PrometheusScraper, scrape_url
from polcache.dashboard.tail import JsonlTail
from polcache.dashboard.views import VIEWS
from polcache.errors import PolcacheError
from polcache.metrics import JsonlWriter, Metrics, serve_prometheus
from test_metrics_prometheus import chunk, request, tick


def line(**fields) -> str:
    return json.dumps(fields) + "\n"


# ------------------------------------------------------------ following files


def test_tail_holds_back_a_half_written_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="tick", t=1.0) + '{"kind": "tick", "t"')
    tail = JsonlTail(path)
    assert [r["t"] for r in tail.poll()] == [1.0]
    with open(path, "a") as f:
        f.write(': 2.0}\n')
    assert [r["t"] for r in tail.poll()] == [2.0] and tail.bad_lines == 0


def test_a_last_line_never_completed_is_said_on_the_page(tmp_path, monkeypatch):
    """A robot killed mid-write: its file ends in half a record (its final safe stop), held back for
    a newline that never comes; the page said nothing and looked complete (the report counted it)."""
    from polcache.dashboard import tail as tail_module

    clock = [100.0]
    monkeypatch.setattr(tail_module.time, "monotonic", lambda: clock[0])
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="info", t=100.0, monotonic=0.0, role="robot", robot="arm", hz=50.0)
                    + line(kind="tick", t=1.0, robot="arm") + '{"kind": "tick", "t": 2.0, "safe_st')
    dashboard = Dashboard([path])
    dashboard.poll()
    assert not dashboard.data()["_meta"]["notes"]  # a line being written: not yet
    clock[0] = 106.0
    dashboard.poll()
    [note] = dashboard.data()["_meta"]["notes"]
    assert note == f"{path} ends in an incomplete line (35 bytes without a newline for 6 s: its writer stopped " \
                   f"mid-line?), not shown"
    with open(path, "a") as f:
        f.write('ops": 1}\n')
    dashboard.poll()
    assert not dashboard.data()["_meta"]["notes"]


def test_tail_survives_truncation_mid_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="tick", t=1.0) + line(kind="tick", t=2.0) + '{"kind": "ti')
    tail = JsonlTail(path)
    assert len(tail.poll()) == 2
    path.write_text(line(kind="tick", t=3.0))  # truncated and rewritten, shorter than before
    assert [r["t"] for r in tail.poll()] == [3.0]
    with open(path, "a") as f:
        f.write("not json\n" + line(kind="chunk", t=4.0))
    assert [r["t"] for r in tail.poll()] == [4.0] and tail.bad_lines == 1


def test_tail_drops_a_line_longer_than_it_holds(tmp_path, monkeypatch):
    """A file without newlines (not JSON lines) would grow the held-back line without bound: past
    MAX_LINE_BYTES it is one unreadable line, dropped up to its newline, and reading goes on."""
    from polcache.dashboard import tail as tail_module

    monkeypatch.setattr(tail_module, "MAX_LINE_BYTES", 100)
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="tick", t=1.0) + "x" * 150)
    tail = JsonlTail(path)
    assert [r["t"] for r in tail.poll()] == [1.0] and tail.bad_lines == 1
    with open(path, "a") as f:
        f.write("y" * 150)  # still the same line
    assert tail.poll() == [] and tail.bad_lines == 1 and tail._partial == b""  # noqa: SLF001
    with open(path, "a") as f:
        f.write("z\n" + line(kind="tick", t=2.0))
    assert [r["t"] for r in tail.poll()] == [2.0] and tail.bad_lines == 1


def test_tail_notices_a_file_rewritten_longer_between_two_polls(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="info", t=1.0) + line(kind="tick", t=2.0))
    tail = JsonlTail(path)
    assert [r["t"] for r in tail.poll()] == [1.0, 2.0]
    path.write_text("".join(line(kind="tick", t=10.0 + i) for i in range(5)))  # a new run, same inode, longer
    assert [r["t"] for r in tail.poll()] == [10.0 + i for i in range(5)]
    with open(path, "a") as f:
        f.write(line(kind="tick", t=20.0))
    assert [r["t"] for r in tail.poll()] == [20.0] and tail.bad_lines == 0


def test_tail_reads_a_file_replaced_by_a_rename_with_the_same_start_on_where_it_was(tmp_path):
    """rsync, cp + mv and sed -i put a file in place by a rename: a new inode, read as a rotation, so
    every record was counted again (an outside probe: a 50 Hz robot's rate shown as 93 Hz). Another
    file renamed into place is still a rotation's new file, read from its start."""
    path, tmp = tmp_path / "m.jsonl", tmp_path / "m.tmp"
    records = [line(kind="tick", t=float(i)) for i in range(6)]
    path.write_text("".join(records[:3]) + records[3][:9])  # the last line caught half-written
    tail = JsonlTail(path)
    assert [r["t"] for r in tail.poll()] == [0.0, 1.0, 2.0]
    tmp.write_text("".join(records))
    os.replace(tmp, path)
    assert [r["t"] for r in tail.poll()] == [3.0, 4.0, 5.0] and tail.bad_lines == 0
    with open(path, "a") as f:
        f.write(line(kind="tick", t=6.0))
    assert [r["t"] for r in tail.poll()] == [6.0]
    tmp.write_text("".join(records[:2]))  # cut shorter (sed -i deleting lines): as a truncation, read anew
    os.replace(tmp, path)
    assert [r["t"] for r in tail.poll()] == [0.0, 1.0] and tail.rewritten
    tmp.write_text(records[0])  # a rotation's new file holding only the run's first (info) line so far
    os.replace(tmp, path)
    assert [r["t"] for r in tail.poll()] == [0.0] and not tail.rewritten
    tmp.write_text(line(kind="tick", t=100.0))  # another file: a rotation's
    os.replace(tmp, path)
    assert [r["t"] for r in tail.poll()] == [100.0] and tail.bad_lines == 0


def test_tail_follows_the_writers_rotation_without_losing_records(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path, max_bytes=1500, backups=3, flush_s=0.005)
    tail = JsonlTail(path)
    seen = []
    for i in range(120):
        writer(tick(float(i)))
        if i % 7 == 0:
            time.sleep(0.02)  # the writer's thread writes and rotates meanwhile
            seen += tail.poll()
    writer.close()
    seen += tail.poll()
    assert os.path.exists(f"{path}.3")  # it did rotate, several times
    errors = [r["period_error_ms"] for r in seen]
    assert errors == [float(i) for i in range(120)] and tail.bad_lines == 0


def test_tail_reads_every_file_the_writer_rotated_between_two_polls(tmp_path):
    """The page's process stopped or starved while the writer rotated twice or more: the file in between
    (FILE.1, its first rotation's new file) was never opened, and its records were not on the page."""
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path, max_bytes=1500, backups=20, flush_s=0.005)
    writer(tick(-1.0))
    writer.close()
    tail = JsonlTail(path)
    seen = tail.poll()
    writer = JsonlWriter(path, max_bytes=1500, backups=20, flush_s=0.005)
    for i in range(100):
        writer(tick(float(i)))
    writer.close()
    assert os.path.exists(f"{path}.3")  # rotated several times since the last poll
    seen += tail.poll()
    assert [r["period_error_ms"] for r in seen if r["kind"] == "tick"] == [float(i) for i in range(-1, 100)]
    assert tail.bad_lines == 0


def test_tail_reads_a_large_file_over_several_polls_and_a_rotated_one_to_its_end(tmp_path):
    """A poll reads at most its limit (the page's memory stays bounded on a huge foreign file);
    the lines cut at a poll's end are read whole by the next, and a file rotated away with bytes
    still unread is read to its end before the new one."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(line(kind="tick", t=float(i), pad="x" * 40) for i in range(200)))
    tail = JsonlTail(path)
    polls = [tail.poll(limit=1000) for _ in range(3)]
    assert all(0 < len(got) < 30 for got in polls)
    os.rename(path, f"{path}.1")
    path.write_text(line(kind="tick", t=1000.0))
    rest = tail.poll(limit=1000)
    assert [r["t"] for got in (*polls, rest) for r in got] == [*map(float, range(200)), 1000.0]
    assert tail.bad_lines == 0


# ------------------------------------------------------------ views


def test_tail_says_when_its_file_is_gone_and_when_it_is_back(tmp_path, monkeypatch):
    """A deleted file was taken for one between the writer's rename and its new file, forever:
    the page said nothing. Past a rotation's gap it is reported, until it is back."""
    monkeypatch.setattr("polcache.dashboard.tail.GONE_AFTER_S", 0.2)
    path = tmp_path / "m.jsonl"
    path.write_text(line(kind="tick", t=1.0))
    tail = JsonlTail(path)
    assert len(tail.poll()) == 1
    path.unlink()
    assert tail.poll() == [] and tail.problem is None  # as during a rotation
    time.sleep(0.3)
    tail.poll()
    assert re.fullmatch(rf"{re.escape(str(path))}: gone \(deleted\?\) since \d\d:\d\d:\d\d; waiting for it to come "
                        r"back", tail.problem)
    path.write_text(line(kind="tick", t=2.0))
    assert [r["t"] for r in tail.poll()] == [2.0] and tail.problem is None
    tail.close()


def two_robot_run(tmp_path, seconds: float = 4.0, hz: float = 50.0):
    """Records as the server and two robots write them (robots on the monotonic clock)."""
    server, robots = [], {}
    wall0, mono0 = 1_000_000.0, 500.0
    server.append({"kind": "info", "t": wall0, "monotonic": mono0, "role": "server", "deadline_ms": None,
                   "policy": {"n_action_steps": 8},
                   "backend": {"cache": {"plan": [[0, 0, 0], [1, 0, 1]], "block_names": ["a", "b", "c"],
                                         "compute_limit": 1.5, "block_evals": 4, "block_evals_uncached": 6}}})
    for name, latency in (("left", 10.0), ("right", 30.0)):
        rows = robots[name] = [{"kind": "info", "t": wall0, "monotonic": mono0, "role": "robot", "robot": name,
                                "hz": hz}]
        for i in range(int(seconds * hz)):
            t = mono0 + i / hz
            rows.append({"kind": "tick", "t": t, "robot": name, "period_error_ms": 0.01 * (i % 5), "queue_depth": 5,
                         "ticks": 1, "missed_ticks": 0, "deadline_miss": i % 50 == 0, "safe_stops": 0,
                         "obs_dropped": 0})
            if i % 4 == 0:
                rows.append({"kind": "chunk", "t": t, "robot": name, "latency_ms": latency + i % 3,
                             "inference_ms": 5.0, "server_ms": 6.0, "chunks": 1, "dropped_actions": 1,
                             "stale_chunks": 0})
                server.append({"kind": "request", "t": wall0 + i / hz, "robot": name, "decode_ms": 0.1,
                               "preprocess_ms": 0.1, "queue_ms": 0.3, "inference_ms": 5.0, "postprocess_ms": 0.1,
                               "encode_ms": 0.2, "total_ms": 6.0, "queue_depth": 1, "requests": 1,
                               "superseded": 0, "deadline_miss": False})
    server.append({"kind": "error", "t": wall0 + 1, "robot": "left", "code": "bad_shape", "errors": 1})
    paths = []
    for name, rows in [("server", server), *robots.items()]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def state_of(paths) -> RunState:
    state = RunState()
    for path in paths:
        tail = JsonlTail(path)
        state.add(tail.poll(), {})
    return state


def test_views_tell_robots_apart_and_align_clocks(tmp_path):
    views = state_of(two_robot_run(tmp_path)).views(interval_s=1.0)
    assert set(VIEWS) <= set(views) and views["_meta"]["robots"] == ["left", "right"]
    assert views["_meta"]["span_s"] == pytest.approx(3.98, abs=0.01)  # wall and monotonic records on one axis
    p50 = {s["name"]: s["y"] for s in views["latency"]["series"] if s["name"].endswith("p50")}
    assert set(p50) == {"left p50", "right p50"}
    assert all(10 <= v <= 12 for v in p50["left p50"]) and all(30 <= v <= 32 for v in p50["right p50"])
    # (8 - 1) / 50 Hz for both robots: one line, not two drawn on top of each other
    assert views["latency"]["hlines"] == [{"name": "deadline left, right", "y": 140.0}]
    assert views["latency_hist"]["vlines"] == [{"name": "deadline left, right", "x": 140.0}]
    assert views["rate"]["hlines"] == [{"name": "target left, right", "y": 50.0}]
    rates = [v for s in views["rate"]["series"] for v in s["y"]]
    assert rates and all(v == pytest.approx(50.0, rel=1e-6) for v in rates)
    misses = {s["name"]: s["y"][-1] for s in views["deadline"]["series"]}
    assert misses["left ticks without fresh action"] == 4 and misses["right requests over budget"] == 0
    stages = views["stages"]
    assert stages["categories"] == ["left", "right"]
    network = next(s for s in stages["stacks"] if s["name"] == "network + tick wait")["values"]
    assert network == [pytest.approx(4.98), pytest.approx(24.98)]  # mean latency (10 or 30, + 0.98) - server time 6
    assert views["cache"]["z"] == [[0, 1], [0, 0], [0, 1]] and views["cache"]["rows"] == ["a", "b", "c"]
    assert "compute limit 1.5x" in views["cache"]["note"]
    assert views["_meta"]["errors"] == {"left: bad_shape": 1}
    assert sum(views["latency_hist"]["series"][0]["counts"]) == 50
    # the whole run per robot, in one row each: does it get its chunks in time
    summary = views["_meta"]["summary"]
    assert summary["columns"][:6] == ("robot", "chunks", "latency p50 ms", "p95 ms", "p99 ms", "deadline ms (newest run)")
    assert summary["rows"] == [["left", 50, 11.0, 12.0, 12.0, 140.0, 200, 4, 0, 0, pytest.approx(0.04)],
                               ["right", 50, 31.0, 32.0, 32.0, 140.0, 200, 4, 0, 0, pytest.approx(0.04)]]


def test_a_servers_records_alone_say_where_the_robot_views_come_from(tmp_path):
    """A workstation's dashboard reads the server's file; the robot writes its own on the robot
    computer: six views were blank axes without a word (the cache view alone said why)."""
    from polcache.dashboard.views import NO_ROBOT_RECORDS, ROBOT_VIEWS

    server, *robots = two_robot_run(tmp_path)
    alone = state_of([server]).views(interval_s=1.0)
    assert {view for view in VIEWS if alone[view].get("note") == NO_ROBOT_RECORDS} == ROBOT_VIEWS
    assert alone["stages"]["categories"] == ["left", "right"]  # the server's own views are drawn
    with_robots = state_of([server, *robots]).views(interval_s=1.0)
    assert not any(view.get("note") == NO_ROBOT_RECORDS for view in with_robots.values())


def test_robots_sharing_a_name_in_two_files_are_kept_apart_and_named(tmp_path):
    """Two robots left at their default name: the second file's robot is "NAME (2)", not merged
    into the first one's series (whose rate read negative and whose counts ran back in time), and
    the page and the report say which files share the name."""
    server, left, right = two_robot_run(tmp_path)
    for path in (server, right):
        path.write_text(path.read_text().replace('"right"', '"left"'))
    state = RunState()
    tails = [(JsonlTail(p), {"name": str(p)}) for p in (server, left, right)]
    for _ in range(100):  # a few lines of each file in turn, as the live page reads them
        for tail, context in tails:
            state.add(tail.poll(2000), context)
    views = state.views(interval_s=1.0)
    assert views["_meta"]["robots"] == ["left", "left (2)"]
    rates = [v for s in views["rate"]["series"] for v in s["y"]]
    assert rates and all(v == pytest.approx(50.0, rel=1e-6) for v in rates)
    misses = {s["name"]: s for s in views["deadline"]["series"]}
    assert misses["left (2) ticks without fresh action"]["y"][-1] == 4
    assert all(s["x"] == sorted(s["x"]) for s in misses.values())
    [note] = views["_meta"]["notes"]
    assert f"({left}, {right})" in note and "shown as left, left (2)" in note and "--name" in note
    # its stages and inference: the server's file was given, but its records of left (2) are under left
    for view in ("stages", "inference"):
        assert "the server's records of left (2) are under 'left' with those of the robot of that name" in \
            views[view]["note"] and "give the server's metrics file too" not in views[view]["note"], view
    html = write_report([server, left, right], tmp_path / "report").read_text()
    assert "shown as left, left (2)" in html
    assert "<th>latency p50 ms</th>" in html and "<td>left (2)</td><td>50</td><td>31</td>" in html


def test_a_robot_really_named_like_anothers_second_label_is_not_merged_with_it(tmp_path):
    """Robots named arm-1, arm-1 and "arm-1 (2)": the second arm-1 was shown as "arm-1 (2)" and merged
    with the robot of that name (one series at twice the rate, the misses of both)."""
    _, left, right = two_robot_run(tmp_path)
    third = tmp_path / "third.jsonl"
    third.write_text(right.read_text().replace('"right"', '"left (2)"'))
    right.write_text(right.read_text().replace('"right"', '"left"'))
    state = RunState()
    for path in (left, right, third):
        state.add(JsonlTail(path).poll(100000), {"name": str(path)})
    views = state.views(interval_s=1.0)
    # the second "left" took "left (2)" first: the robot of that name is shown as "left (2) (2)"
    assert sorted(views["_meta"]["robots"]) == ["left", "left (2)", "left (2) (2)"]
    rates = [v for s in views["rate"]["series"] for v in s["y"]]
    assert rates and all(v == pytest.approx(50.0, rel=1e-6) for v in rates)


def test_series_are_in_time_order_whatever_order_records_came_in():
    """A rate from records out of order (a wall clock stepped back) read negative, and a
    cumulative count ran back in time."""
    state = RunState()
    state.add([{"kind": "tick", "t": float(t), "robot": "r", "ticks": 1, "deadline_miss": True}
               for t in [*range(50, 100), *range(50)]])
    views = state.views(interval_s=10.0)
    assert [y for s in views["rate"]["series"] for y in s["y"]] == [pytest.approx(1.0)] * 10
    assert views["deadline"]["series"][0]["x"] == sorted(views["deadline"]["series"][0]["x"])


def test_the_live_pages_counts_stay_whole_run_totals_once_it_lets_old_records_go():
    """The page keeps the newest `keep` records per robot and kind: its cumulative counts summed only
    those, so a long run's deadline misses read 20,000 where the run had 30,000 (the report, 30,000)."""
    records = [{"kind": "tick", "t": i / 50, "robot": "r", "ticks": 1, "deadline_miss": True, "safe_stops": i % 2}
               for i in range(300)]
    live, whole = RunState(keep=100), RunState(keep=None)
    live.add(records)
    whole.add(records)
    for state in (live, whole):
        views = state.views(interval_s=1.0)
        [misses] = views["deadline"]["series"]
        [stops] = [s for s in views["starvation"]["series"] if s["name"].endswith("safe stops")]
        assert misses["y"][-1] == 300 and stops["y"][-1] == 150
    assert any("keeps the newest 100 records of each kind per robot: the plots and the whole-run table's "
               "percentiles of r cover those" in note for note in live.views()["_meta"]["notes"])
    assert not whole.views()["_meta"]["notes"]


def test_records_without_info_lines_say_why_the_deadline_and_target_are_missing(tmp_path):
    """Files without their info lines (copied in part, older): the deadline and target lines were
    simply not drawn, nothing said."""
    server, left, right = two_robot_run(tmp_path)
    for path in (server, left, right):
        path.write_text("".join(row + "\n" for row in path.read_text().splitlines()[1:]))
    views = state_of([server, left, right]).views(interval_s=1.0)
    assert views["latency"]["hlines"] == [] and views["rate"]["hlines"] == []
    assert views["latency"]["note"] == ("no deadline line: none of the files holds the server's info line (give the "
                                        "server's file)")
    assert views["rate"]["note"] == "no target rate for left, right: no info line in its file (polcache writes one first)"
    server, left, right = two_robot_run(tmp_path)  # the server's info line, but not the robots'
    left.write_text("".join(row + "\n" for row in left.read_text().splitlines()[1:]))
    views = state_of([server, left, right]).views(interval_s=1.0)
    assert views["latency"]["note"] == "no deadline line for left: its rate is unknown (no info line in its file)"
    assert "note" not in state_of(two_robot_run(tmp_path)).views(interval_s=1.0)["latency"]


def test_robot_records_placed_without_an_info_line_say_their_clock_was_guessed(tmp_path):
    """A robot file whose info line was damaged: its monotonic times were placed on this machine's clock,
    and the report read "45947605.9 s of records" with only "unreadable lines: 1" to say anything."""
    server, left, right = two_robot_run(tmp_path)
    left.write_text("{damaged\n" + "".join(row + "\n" for row in left.read_text().splitlines()[1:]))
    notes = state_of([server, left, right]).views()["_meta"]["notes"]
    assert notes == []  # state_of gives no source names: a file's name is what the note names
    state = RunState()
    for path in (server, left, right):
        state.add(JsonlTail(path).poll(), {"name": str(path)})
    [note] = state.views()["_meta"]["notes"]
    assert note.startswith(f"{left}: robot records before any info line (missing or damaged), placed on this "
                           f"machine's monotonic clock")


def test_the_loops_own_safe_stop_is_counted_but_is_no_tick():
    """The loop's safe stop at a run's end is a tick record of no tick (ticks 0): counted among the
    safe stops, but taken for a tick it made a last period of a few microseconds, and the last
    interval's rate read high."""
    state = RunState()
    state.add([{"kind": "tick", "t": i / 50, "robot": "r", "ticks": 1, "safe_stops": 0} for i in range(100)]
              + [{"kind": "tick", "t": 99 / 50 + 1e-4, "robot": "r", "ticks": 0, "safe_stops": 1,
                  "period_error_ms": None}])
    views = state.views(interval_s=0.5)
    rates = [y for s in views["rate"]["series"] for y in s["y"]]
    assert rates and all(y == pytest.approx(50.0, rel=1e-6) for y in rates)
    [stops] = [s for s in views["starvation"]["series"] if s["name"].endswith("safe stops")]
    assert stops["y"][-1] == 1
    state.add([{"kind": "tick", "t": 2.0 + i / 50, "robot": "q", "ticks": 1, "queue_depth": 4} for i in range(9)]
              + [{"kind": "tick", "t": 2.0 + 9 / 50, "robot": "q", "ticks": 0, "safe_stops": 1, "queue_depth": 0}])
    [queue] = [s for s in state.views(interval_s=10.0)["queue"]["series"] if s["name"] == "q"]
    assert queue["y"] == [4.0]  # the stop's queue of 0 is no tick's: it read 3.6


def test_runs_appended_to_one_robot_file_are_apart_in_every_line_view(tmp_path):
    """A second run appended to a robot's metrics file: the rate view took the 80 s between the
    runs for a tick period (a rate of 0.8 Hz), and the lines ran straight across the gap."""
    server, robot, _ = two_robot_run(tmp_path, seconds=2.0)
    first = robot.read_text()
    later = [dict(json.loads(row), t=json.loads(row)["t"] + 80.0) for row in first.splitlines()]  # 80 s on
    robot.write_text(first + "".join(json.dumps(row) + "\n" for row in later))
    views = state_of([server, robot]).views(interval_s=1.0)
    [rate] = views["rate"]["series"]
    assert None in rate["y"] and all(v == pytest.approx(50.0, rel=1e-6) for v in rate["y"] if v is not None)
    for view, name in (("rate", "left"), ("latency", "left p50"), ("queue", "left"),
                       ("deadline", "left ticks without fresh action")):
        [series] = [s for s in views[view]["series"] if s["name"] == name]
        [gap] = [x for x, y in zip(series["x"], series["y"]) if y is None]
        assert max(x for x in series["x"] if x < gap) < 2.0 and min(x for x in series["x"] if x > gap) > 80.0, view
    assert write_report([server, robot], tmp_path / "report").exists()  # the report draws the break


def test_runs_with_other_settings_in_one_file_are_each_held_to_their_own_deadline_and_rate(tmp_path):
    """Two runs appended to the files, the second with --deadline-ms 150 and the robot at 25 Hz: every
    run was drawn against the newest run's deadline and target rate (the first run's 50 Hz under a
    25 Hz target line)."""
    server, left, right = two_robot_run(tmp_path, seconds=2.0)
    later = [json.loads(row) for row in server.read_text().splitlines()]
    later[0]["deadline_ms"] = 150.0
    server.write_text(server.read_text() + "".join(json.dumps(dict(r, t=r["t"] + 80.0)) + "\n" for r in later))
    for robot, hz in ((left, 25.0), (right, 50.0)):
        rows = [json.loads(row) for row in robot.read_text().splitlines()]
        rows[0]["hz"] = hz
        robot.write_text(robot.read_text() + "".join(json.dumps(dict(r, t=r["t"] + 80.0)) + "\n" for r in rows))
    views = state_of([server, left, right]).views(interval_s=1.0)
    assert views["latency"]["hlines"] == [
        {"name": "deadline left, right (until 80 s)", "y": 140.0, "x1": 80.0},  # the first run's default: 7 / 50 Hz
        {"name": "deadline left, right (from 80 s)", "y": 150.0, "x0": 80.0}]
    assert views["rate"]["hlines"] == [{"name": "target left (from 80 s)", "y": 25.0, "x0": 80.0},
                                       {"name": "target left (until 80 s)", "y": 50.0, "x1": 80.0},
                                       {"name": "target right", "y": 50.0}]
    assert [v["x"] for v in views["latency_hist"]["vlines"]] == [140.0, 150.0]
    assert write_report([server, left, right], tmp_path / "report").exists()  # the report draws them in their spans
    (tmp_path / "one").mkdir()
    one_run = state_of(two_robot_run(tmp_path / "one")).views(interval_s=1.0)
    assert one_run["rate"]["hlines"] == [{"name": "target left, right", "y": 50.0}]  # one run: across the whole axis


@pytest.mark.parametrize("names", [("a", "b"), ("arm", "arm")], ids=["renamed", "same"])
def test_a_robots_run_is_held_to_the_server_run_it_started_under(names):
    """Two runs, each robot starting 5 s after its server (50 Hz with 8-step chunks, then 20 Hz with 16): every
    server start was also taken as a change of each robot's deadline, so a robot got a line no run had (the second
    run's chunk at the first run's rate, 300 ms), and a robot of the first run only the second run's deadline."""
    records = []
    for (start, hz, steps), name in zip(((0.0, 50.0, 8), (80.0, 20.0, 16)), names):
        records += [{"kind": "info", "t": 1000.0 + start, "role": "server", "policy": {"n_action_steps": steps}},
                    {"kind": "info", "t": 1005.0 + start, "monotonic": 5.0 + start, "role": "robot", "robot": name,
                     "hz": hz}]
        records += [{"kind": "chunk", "t": 5.0 + start + i / 10, "robot": name, "latency_ms": 100.0, "chunks": 1}
                    for i in range(50)]
    state = RunState()
    state.add(records, {})
    views = state.views(interval_s=1.0)
    deadlines = sorted((line["y"], line.get("x0"), line.get("x1")) for line in views["latency"]["hlines"])
    if names[0] != names[1]:
        assert deadlines == [(140.0, None, None), (750.0, None, None)]  # each robot's own run, across the axis
    else:
        assert deadlines == [(140.0, None, 80.0), (750.0, 80.0, None)]  # its first run's, then its second's
    assert {row[0]: row[5] for row in views["_meta"]["summary"]["rows"]} == (
        {"a": 140.0, "b": 750.0} if names[0] != names[1] else {"arm": 750.0})


@pytest.mark.parametrize("pause_s, interval_s", [(2.0, 0.25), (1.3, 1.0)])
def test_a_gap_in_a_robots_file_alone_does_not_break_the_servers_series(tmp_path, pause_s, interval_s):
    """The robot's metrics file cut short mid-run (truncated under the dashboard): the robot's lines
    break there, the server's, which went on, did not need to (they had a gap in their middle),
    also where the pause is short against the bins (a probe: 1.3 s at 1 s bins)."""
    server, robot, _ = two_robot_run(tmp_path, seconds=8.0)
    rows = [json.loads(row) for row in robot.read_text().splitlines()]
    robot.write_text("".join(json.dumps(r) + "\n" for r in rows if not 503.0 < r["t"] < 503.0 + pause_s))
    views = state_of([server, robot]).views(interval_s=interval_s)
    if pause_s > 2 * interval_s:  # bins left empty: the robot's own line breaks
        [rate] = [s for s in views["rate"]["series"] if s["name"] == "left"]
        assert None in rate["y"]
    server_series = ([s for s in views["deadline"]["series"] if s["name"] == "left requests over budget"]
                     + [s for s in views["inference"]["series"] if s["name"].startswith("left ")])
    assert len(server_series) == 3 and all(None not in s["y"] for s in server_series), server_series


def test_a_histogram_says_what_its_last_bar_holds():
    """The bars span the values up to their 99.5th percentile, so outliers land in the last bar:
    the note says how many and how far they reach."""
    state = RunState()
    state.add([{"kind": "chunk", "t": float(i), "robot": "r", "latency_ms": 10.0 + i % 5} for i in range(999)]
              + [{"kind": "chunk", "t": 999.0, "robot": "r", "latency_ms": 240.0}])
    hist = state.views()["latency_hist"]
    assert sum(hist["series"][0]["counts"]) == 1000
    assert hist["note"] == "1 value above 14 (up to 240) counted in the last bar"


def test_machine_samples_before_the_first_record_are_left_out():
    """The CPU view's axis started below 0 with samples taken before the run's first record."""
    state = RunState()
    state.add_system(95.0, 10.0, None)
    state.add([{"kind": "request", "t": 100.0, "robot": "r", "inference_ms": 5.0}])
    state.add_system(101.0, 20.0, None)
    assert state.views()["system"]["series"] == [{"name": "CPU %", "x": [1.5], "y": [20.0]}]  # its second's middle


def test_the_load_view_is_a_mean_per_interval_not_every_sample():
    """Two samples a second, each sent: the page's answer grew with the run (the load view alone 21 KB
    after ten minutes), where every other view has about a hundred points."""
    state = RunState()
    state.add([{"kind": "request", "t": 0.0, "robot": "r", "inference_ms": 5.0},
               {"kind": "request", "t": 3600.0, "robot": "r", "inference_ms": 5.0}])
    for i in range(7200):
        state.add_system(i / 2, 40.0 + 20.0 * (i % 2), 80.0 if i < 3600 else None)
    cpu, gpu = state.views()["system"]["series"]
    assert len(cpu["x"]) == 100 and set(cpu["y"]) == {50.0}  # 36 s intervals
    assert len(gpu["x"]) == 50 and max(gpu["x"]) < 1800 and set(gpu["y"]) == {80.0}  # no GPU samples after 30 min


def test_a_finished_runs_files_opened_later_show_no_load_of_today_as_theirs():
    """The load is sampled live: a run that ended before the page started drew today's load at its
    own time line's end, as if the run had had it."""
    state = RunState()
    state.add([{"kind": "request", "t": 100.0, "robot": "r", "inference_ms": 5.0},
               {"kind": "request", "t": 110.0, "robot": "r", "inference_ms": 5.0}])
    state.add_system(110.5, 30.0, None)  # just after the newest record: a live run's, whose records come late
    state.add_system(5000.0, 20.0, None)  # long after: not the run's
    assert state.views()["system"]["series"] == [{"name": "CPU %", "x": [10.5], "y": [30.0]}]
    assert "no GPU utilisation: nvidia-smi is not on this machine" in state.views()["system"]["note"]
    later = RunState()
    later.add([{"kind": "request", "t": 100.0, "robot": "r", "inference_ms": 5.0}])
    later.add_system(5000.0, 20.0, None)
    view = later.views()["system"]
    assert view["series"] == [] and "records ended before this page started" in view["note"]


def test_refusals_of_connections_without_a_handshake_are_counted_but_are_no_robot():
    state = RunState()
    state.add([{"kind": "request", "t": 1.0, "robot": "arm", "inference_ms": 5.0},
               {"kind": "error", "t": 1.5, "robot": "(no handshake)", "code": "malformed", "errors": 1}])
    meta = state.views()["_meta"]
    assert meta["robots"] == ["arm"] and meta["errors"] == {"(no handshake): malformed": 1}


def test_views_without_records_are_empty_not_broken():
    views = RunState().views()
    assert views["latency"]["series"] == [] and views["cache"]["rows"] == []
    json.dumps(views, allow_nan=False)


# ------------------------------------------------------------ live page and scrapes


def test_a_file_truncated_under_the_page_is_shown_as_it_is_now_not_counted_twice(tmp_path, caplog):
    """A robot file cut down (not emptied) was read again from its start on top of what was shown:
    its first seconds counted twice (a 50 Hz loop drawn at 100 Hz, drops and misses doubled)."""
    server, left, right = two_robot_run(tmp_path)
    dashboard = Dashboard([server, left, right], poll_s=60)
    dashboard.poll()
    assert len(dashboard.state.records[("left", "tick")]) == 200
    lines = left.read_text().splitlines(keepends=True)
    left.write_text("".join(lines[:126]))  # its info line and 100 ticks and their 25 chunks, the same first bytes
    dashboard.poll()
    state = dashboard.state
    assert len(state.records[("left", "tick")]) == 100 and len(state.records[("left", "chunk")]) == 25
    assert len(state.records[("right", "tick")]) == 200 and len(state.records[("left", "request")]) == 50
    assert state.robot_hz == {"left": 50.0, "right": 50.0} and state.system  # labels kept, load samples kept
    assert f"{left} was truncated or rewritten" in caplog.text
    with open(left, "a") as f:  # it goes on growing: read on from there, once
        f.write(line(kind="tick", t=600.0, robot="left", ticks=1, period_error_ms=0.5, queue_depth=2))
    dashboard.poll()
    assert len(dashboard.state.records[("left", "tick")]) == 101


def test_a_robot_file_alone_shows_its_chunks_server_time_and_inference(tmp_path):
    """polcache_client's MetricsFile alone (no server file): the stages were one 'network' bar as if
    that were the whole latency, and the inference view said no data, though every chunk carries both."""
    _, left, _ = two_robot_run(tmp_path)
    views = state_of([left]).views()
    stages = {s["name"]: s["values"] for s in views["stages"]["stacks"]}
    assert views["stages"]["categories"] == ["left"] and stages["server (total)"] == [6.0]
    assert stages["network + tick wait"][0] == pytest.approx(10.0 + 1 - 6.0, abs=0.1)
    assert "inference" not in stages  # no bar and no legend entry for stages nothing measured
    assert "no server records of left" in views["stages"]["note"]
    assert views["inference"]["series"] and all(y == 5.0 for s in views["inference"]["series"] for y in s["y"] if y)
    assert "left: from the robot's chunk records" in views["inference"]["note"]
    both = state_of(two_robot_run(tmp_path)).views()  # with the server's file: its stages, nothing in their place
    assert "server (total)" not in {s["name"] for s in both["stages"]["stacks"]} and "note" not in both["stages"]
    assert "note" not in both["inference"] and {s["name"].split()[0] for s in both["inference"]["series"]} == {
        "left", "right"}
    assert both["cache"]["legend"] == {0: "compute", 1: "reuse"}  # the ops the plan uses: no forecast, no gate


def test_dashboard_serves_the_page_and_live_data(tmp_path):
    paths = two_robot_run(tmp_path)
    dashboard = Dashboard(paths, poll_s=0.05)
    url = dashboard.serve(port=0)
    try:
        page = urllib.request.urlopen(url, timeout=5).read().decode()
        assert '<script src="/app.js">' in page and "http" not in page.replace('http-equiv', '')
        script = urllib.request.urlopen(url + "app.js", timeout=5).read().decode()
        assert "/data.json" in script and "data-received" in script
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = json.loads(urllib.request.urlopen(url + "data.json", timeout=5).read())
            if data["_meta"]["robots"]:
                break
            time.sleep(0.05)
        assert data["_meta"]["robots"] == ["left", "right"] and data["latency"]["series"]
        with open(paths[1], "a") as f:  # the robot keeps writing: the page sees it
            f.write(line(kind="tick", t=510.0, robot="left", ticks=1, period_error_ms=0.5, queue_depth=2))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and data["_meta"]["span_s"] < 9:
            data = json.loads(urllib.request.urlopen(url + "data.json", timeout=5).read())
            time.sleep(0.05)
        assert data["_meta"]["span_s"] == pytest.approx(10.0, abs=0.01)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "elsewhere", timeout=5)
    finally:
        dashboard.stop()


def test_scrape_turns_histogram_increases_into_values():
    m = Metrics(robot="arm")
    http = serve_prometheus(m, 0)
    try:
        scraper = PrometheusScraper(f"127.0.0.1:{http.server_address[1]}")
        assert scraper.poll() == []  # the baseline
        for _ in range(3):
            m.record(tick(0.3, deadline_miss=True))
        m.record(chunk(12.0))
        m.record(request("arm", inference_ms=7.0))
        records = scraper.poll()
    finally:
        http.shutdown()
        http.server_close()
    ticks = [r for r in records if r["kind"] == "tick"]
    assert sum(r.get("ticks", 0) for r in ticks) == 3 and sum(r.get("deadline_miss", 0) for r in ticks) == 3
    errors = sorted(r["period_error_ms"] for r in ticks if "period_error_ms" in r)
    assert errors == [pytest.approx(0.375)] * 3  # the middle of the (0.25, 0.5] ms bucket
    assert [r["latency_ms"] for r in records if "latency_ms" in r] == [pytest.approx(12.5)]  # (10, 15] ms
    state = RunState()
    state.add(records)
    assert state.views()["latency"]["series"] and state.views()["_meta"]["robots"] == ["arm"]


def test_a_scraped_robot_shows_its_control_rate_and_target_not_the_scrape_rate(monkeypatch):
    """Each scrape's tick record stands for every tick since the last: the rate is ticks per second,
    whatever the scrape interval, and the run's Info metric gives the target line."""
    clock = {"now": 100.0}
    monkeypatch.setattr("polcache.dashboard.scrape.time",
                        types.SimpleNamespace(time=lambda: clock["now"], monotonic=lambda: clock["now"]))
    m = Metrics(robot="arm", info={"role": "robot", "hz": 50, "task": "reach-v3"})
    http = serve_prometheus(m, 0)
    state = RunState()
    try:
        scraper = PrometheusScraper(f"127.0.0.1:{http.server_address[1]}")
        state.add(scraper.poll())  # the baseline, and the info
        for step in range(12):
            clock["now"] += 0.5 if step != 6 else 5.5  # a 5 s pause before the seventh scrape's 25 ticks
            for _ in range(25):
                m.record(tick(0.1))
            state.add(scraper.poll())
    finally:
        http.shutdown()
        http.server_close()
    views = state.views(interval_s=1.0)
    assert views["rate"]["hlines"] == [{"name": "target arm", "y": 50.0}]
    rates = [v for s in views["rate"]["series"] for v in s["y"] if v is not None]
    assert rates and all(v == pytest.approx(50.0) for v in rates)  # not 2 Hz (the scrapes), not 25/5.5 Hz
    assert None in views["rate"]["series"][0]["y"]  # the pause breaks the line


def test_a_servers_scraped_info_gives_the_deadline_line():
    m = Metrics(window=0, info={"role": "server", "deadline_ms": None, "policy": {"n_action_steps": 8}})
    robot = Metrics(robot="arm", info={"role": "robot", "hz": 50})
    endpoints = [serve_prometheus(m, 0), serve_prometheus(robot, 0)]
    state = RunState()
    try:
        for http in endpoints:
            state.add(PrometheusScraper(f"127.0.0.1:{http.server_address[1]}").poll())
    finally:
        for http in endpoints:
            http.shutdown()
            http.server_close()
    assert state.views()["latency"]["hlines"] == [{"name": "deadline arm", "y": 140.0}]  # (8 - 1) / 50 Hz


def test_scrape_address_forms():
    assert scrape_url("127.0.0.1:9100") == "http://127.0.0.1:9100/metrics"
    assert scrape_url(":9100") == "http://127.0.0.1:9100/metrics"
    assert scrape_url("http://robot:9100/metrics") == "http://robot:9100/metrics"
    for bad in ("robot", "127.0.0.1:99999", "127.0.0.1:0", "ftp://robot:21/metrics", "http://robot:99999/metrics",
                "http:///metrics"):
        with pytest.raises(PolcacheError, match="HOST:PORT"):
            scrape_url(bad)


# ------------------------------------------------------------ report and command line


def test_report_writes_a_page_with_one_png_per_view(tmp_path):
    paths = two_robot_run(tmp_path)
    rotated = tmp_path / "server.jsonl.1"  # the server's older records, rotated away
    rotated.write_text(line(kind="error", t=999_999.0, robot="right", code="non_finite", errors=1))
    with open(paths[1], "a") as f:
        f.write('{"kind": "tick", "t": 5')  # the robot was killed mid-line
    page = write_report(paths, tmp_path / "report")
    html = page.read_text()
    for view in VIEWS:
        if view != "system":
            assert (tmp_path / "report" / f"{view}.png").stat().st_size > 1000, view
            assert f'src="{view}.png"' in html
    assert "unreadable lines: 1" in html and "right: non_finite 1" in html
    views = json.loads((tmp_path / "report" / "views.json").read_text())
    assert views["latency"]["series"]
    assert views["_meta"]["summary"]["rows"]  # the numbers behind the page's table too, not only its plots


def test_report_pngs_say_what_they_show_and_count_in_whole_numbers(tmp_path):
    """A PNG pasted alone had no title, and the histograms no unit or 'count' on either axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polcache.dashboard.report import _draw

    views = state_of(two_robot_run(tmp_path)).views()
    fig, ax = plt.subplots()
    assert _draw(ax, views["latency_hist"], 10.0)
    assert ax.get_title(loc="left") == VIEWS["latency_hist"][0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("ms", "count")
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_yticks())
    plt.close(fig)
    fig, ax = plt.subplots()  # values past the last bar, counted in it: the PNG says so too, not only the page
    clipped = {**views["latency_hist"], "note": "12 values above 0.1 (up to 17.2) counted in the last bar"}
    assert _draw(ax, clipped, 10.0)
    assert ax.get_xlabel() == "ms; 12 values above 0.1 (up to 17.2) counted in the last bar"
    plt.close(fig)


def test_report_stages_legend_is_below_the_bars_and_their_label(tmp_path):
    """The legend sat inside the axes, on top of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polcache.dashboard.report import _bars

    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    assert _bars(ax, state_of(two_robot_run(tmp_path)).views()["stages"])
    fig.tight_layout()
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 < ax.xaxis.label.get_window_extent().y0
    plt.close(fig)


def test_report_draws_more_than_ten_robots_apart():
    """The eleventh robot's line took the first one's colour, and read as its (an outside probe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from polcache.dashboard.report import _hist, _line

    fig, ax = plt.subplots()
    assert _line(ax, {"series": [{"x": [0.0, 1.0], "y": [i, i], "name": f"arm{i}"} for i in range(25)]})
    pens = {(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in ax.lines}
    assert len(pens) == 25
    ax.clear()
    assert _hist(ax, {"series": [{"counts": [1, 2], "edges": [0.0, 1.0, 2.0], "name": f"arm{i}"} for i in range(12)]})
    pens = {(matplotlib.colors.to_hex(p.get_facecolor()), p.get_linestyle()) for p in ax.patches}
    assert len(pens) == 12
    plt.close(fig)


def test_rotated_files_whose_first_is_gone_still_have_the_server_info_and_count_each_record_once(tmp_path):
    """The writer repeats the info line at the start of every rotated file: with the first file
    rotated away, the report and the page still draw the deadline (they said "no server info
    yet"), and the repeated line counts nothing twice."""
    from polcache.dashboard.report import load_runs, run_files

    path = tmp_path / "server.jsonl"
    writer = JsonlWriter(path, max_bytes=1500, backups=2, flush_s=0.005)
    writer.write({"kind": "info", "t": 1.0, "monotonic": 0.5, "role": "server", "deadline_ms": 50.0})
    for i in range(60):
        writer(request("arm", inference_ms=float(i)))
    writer.close()
    files = run_files(path)
    lines = [json.loads(text) for p in files for text in p.read_text().splitlines()]
    assert len(files) == 3 and lines[0]["kind"] == "info" and lines[-1]["inference_ms"] == 59.0
    assert [r["kind"] for r in lines].count("info") == 3  # one per file: the first file's requests are gone
    kept = [r["inference_ms"] for r in lines if r["kind"] == "request"]
    state, bad = load_runs([path])
    assert bad == 0 and list(state.records[("arm", "request")].column("inference_ms")) == kept
    assert state.views()["latency"]["hlines"] == [{"name": "deadline", "y": 50.0}]
    dashboard = Dashboard([path])  # the live page follows the newest file only
    dashboard.poll()
    dashboard.stop()
    assert dashboard.data()["latency"]["hlines"] == [{"name": "deadline", "y": 50.0}]


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert main(["dashboard"]) == 2
    assert "--metrics FILE" in capsys.readouterr().err
    assert main(["dashboard", "--connect", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no such file; expected a metrics file" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is a folder; expected a polcache metrics file" in capsys.readouterr().err
    run = tmp_path / "run.jsonl"
    run.write_text(line(kind="tick", t=1.0, robot="r", ticks=1))
    assert main(["report", str(run), str(run), "--out", str(tmp_path / "r")]) == 2
    assert "given twice" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no metrics records" in capsys.readouterr().err


def test_dashboard_refuses_a_file_that_is_not_a_metrics_file_as_report_and_writer_do(tmp_path, capsys):
    """`dashboard --metrics robot.json` (or README.md) started and served an empty page: it is refused
    in one line, exit status 2, nothing left running; a file not there yet is still followed."""
    import subprocess
    import sys

    from polcache.dashboard import run_dashboard

    result, readme = tmp_path / "robot.json", tmp_path / "README.md"
    result.write_text('{"format": "polcache-eval", "episodes": 1}\n')
    readme.write_text("# notes\n")
    what = 'is not a polcache metrics file (lines of {"kind": ...} records)'
    for other in (result, readme):
        command = [sys.executable, "-m", "polcache.cli", "dashboard", "--metrics", str(other), "--port", "0"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)  # the whole process: it exits
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr == f"polcache dashboard: error: --metrics {other}: {what}\n"
        assert main(["report", str(other), "--out", str(tmp_path / "r")]) == 2
        assert capsys.readouterr().err == f"polcache report: error: {other}: {what}\n"
    run_dashboard([str(tmp_path / "later.jsonl")], port=0, seconds=0.1)  # the server creates it later
    assert "dashboard on http://127.0.0.1:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["folder", "robot.json", "fifo"])
def test_readers_and_writers_refuse_a_bad_metrics_path_in_the_same_words(tmp_path, capsys, bad):
    """The reader's check (dashboard, report) and the writer's (polcache's JsonlWriter, the robot
    side's MetricsFile) worded the same mistake differently: one check, one message after the name
    each gives the path ("metrics file", --metrics, the report's argument)."""
    from polcache.dashboard import run_dashboard
    from polcache.metrics.jsonl import check_metrics_input
    from polcache_client.metrics_file import MetricsFile, MetricsFileError

    path = tmp_path / bad
    if bad == "folder":
        path.mkdir()
    elif bad == "fifo":
        os.mkfifo(path)  # opening it to look would block: refused before
    else:
        path.write_text('{"format": "polcache-eval", "episodes": 1}\n')
    messages = []
    for check, error in ((JsonlWriter, PolcacheError), (MetricsFile, MetricsFileError),
                         (lambda p: check_metrics_input(p, "metrics file"), PolcacheError),
                         (lambda p: run_dashboard([str(p)], port=0, seconds=0.1), PolcacheError)):
        with pytest.raises(error) as refused:
            check(path)
        messages.append(str(refused.value))
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 2
    report = capsys.readouterr().err
    assert report.startswith("polcache report: error: ") and report.count("\n") == 1
    messages.append(report.removeprefix("polcache report: error: ").rstrip("\n"))
    why = messages[0].removeprefix(f"metrics file {path}: ")
    assert why.endswith('expected a polcache metrics file (lines of {"kind": ...} records)') or \
        why == 'is not a polcache metrics file (lines of {"kind": ...} records)'
    assert messages == [f"metrics file {path}: {why}"] * 3 + [f"--metrics {path}: {why}", f"{path}: {why}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad]  # nothing written: no report, no metrics file


def test_records_with_wrong_types_are_counted_not_fatal(caplog):
    state = RunState()
    state.add([{"kind": "info", "t": 1.0, "monotonic": "soon"}, {"kind": "tick", "t": "late"},
               {"kind": "error", "t": 1.0, "robot": "r", "code": "x", "errors": "many"},
               {"kind": "info", "role": "robot", "robot": "r", "hz": "fast", "t": 1.0},
               {"kind": "tick", "t": 2.0, "robot": "r", "ticks": 1, "period_error_ms": "?", "queue_depth": None},
               {"kind": "info", "t": 1.0, "role": "server", "backend": {"cache": {"plan": [[0, 1], [7]]}}}])
    assert state.bad_records == 5 and state.server is None
    # the first one's reason is said once (a bug in reading them was only counted, as bad data)
    assert [r.getMessage() for r in caplog.records] == [
        "dashboard: a record of kind 'info' skipped as unreadable (ValueError: could not convert string to float: "
        "'soon'); more are only counted"]
    views = state.views()
    assert views["_meta"]["robots"] == ["r"] and views["period_error"]["series"] == []
    json.dumps(views, allow_nan=False)


def test_lines_too_big_or_too_deep_for_a_float_or_the_parser_are_counted_not_fatal(tmp_path, caplog):
    """A 400-digit integer (no float holds it), a line nested 200,000 deep, a time no clock gives:
    each one unreadable line, and every view (and the report) still built from the good ones."""
    run = tmp_path / "run.jsonl"
    run.write_text(line(kind="tick", t=1.0, robot="r", ticks=1, period_error_ms=0.2)
                   + '{"kind": "tick", "t": 2.0, "robot": "r", "ticks": 1' + "0" * 400 + "}\n"
                   + '{"kind": "tick", "t": 1' + "0" * 400 + ', "robot": "r"}\n'
                   + "[" * 200_000 + "\n"
                   + line(kind="tick", t=1e308, robot="r", ticks=1)  # no clock says that: it would stretch the span
                   + line(kind="tick", t=3.0, robot="r", ticks=1, period_error_ms=0.4))
    tail = JsonlTail(run)
    state = RunState()
    state.add(tail.poll())
    assert tail.bad_lines == 1 and state.bad_records == 2
    views = state.views()
    assert views["_meta"]["span_s"] == 2.0 and views["period_error"]["series"]
    json.dumps(views, allow_nan=False)
    assert write_report([run], tmp_path / "report").is_file()
    assert "report: 3 unreadable lines skipped (damaged or cut short)" in caplog.text  # not only on the page


def test_a_source_that_cannot_be_read_says_why_and_the_others_are_still_read(tmp_path):
    """A metrics path that is a folder, one not there (yet), an address serving something other than
    Prometheus: each named on the page; the good file's records still arrive."""
    good, folder = tmp_path / "good.jsonl", tmp_path / "folder"
    folder.mkdir()
    good.write_text(line(kind="tick", t=1.0, robot="r", ticks=1))
    page = serve_prometheus(Metrics(robot="arm"), 0)  # a real server, asked for a path it does not serve
    try:
        dashboard = Dashboard([folder, tmp_path / "typo.jsonl", good],
                              [f"http://127.0.0.1:{page.server_address[1]}/nothing-here"])
        dashboard.poll()
        with open(good, "a") as f:
            f.write(line(kind="tick", t=2.0, robot="r", ticks=1))
        dashboard.poll()
    finally:
        page.shutdown()
        page.server_close()
    meta = dashboard.data()["_meta"]
    assert meta["span_s"] == 1.0
    problems = " | ".join(meta["source_problems"])
    assert f"{folder}: cannot read it" in problems and "typo.jsonl: no such file (yet)" in problems
    assert "nothing-here: cannot reach it" in problems, problems


def test_a_scrape_of_something_that_is_not_prometheus_is_named(tmp_path):
    import http.server
    import threading

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>hello</html>\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scraper = PrometheusScraper(f"127.0.0.1:{server.server_address[1]}")
        assert scraper.poll() == [] and "not a Prometheus endpoint" in scraper.problem and scraper.failures == 1
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")
def test_system_sampler_reads_proc_stat_and_nvidia_smi(tmp_path, monkeypatch):
    from polcache.dashboard.system import SystemSampler

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '37\\n41\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = SystemSampler()
    sampler._psutil = None  # the /proc/stat path, whether or not psutil is installed here
    sampler.sample_cpu()
    time.sleep(0.05)  # a few jiffies pass
    assert 0.0 <= sampler.sample_cpu() <= 100.0
    assert sampler.sample_gpu() == 39.0  # the mean over the GPUs listed


def test_a_metrics_path_behind_a_folder_this_user_may_not_enter_is_one_line(tmp_path, monkeypatch):
    """Path.exists raises PermissionError for a path under a folder the user may not enter (mode
    000; root never meets it, so the error is raised here as the OS would): it was a traceback."""
    from pathlib import Path

    from polcache.metrics.jsonl import check_metrics_input

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", denied)
    path = tmp_path / "locked" / "m.jsonl"
    with pytest.raises(PolcacheError, match=r"^--metrics .*m\.jsonl: permission denied \(.*\); expected a polcache"):
        check_metrics_input(path, "--metrics")


def test_latencies_a_control_period_apart_fill_every_bar():
    """A robot stamps a chunk's arrival at its next tick, so latencies sit 20 ms apart at 50 Hz:
    bars of 6 ms alternated with empty ones (an outside probe's report)."""
    state = RunState()
    state.add([{"kind": "info", "t": 0.0, "monotonic": 0.0, "role": "robot", "robot": "r", "hz": 50.0}]
              + [{"kind": "chunk", "t": i / 10, "robot": "r", "latency_ms": 150.0 + 20.0 * (i % 13) + 0.3 * (i % 3)}
                 for i in range(1000)])
    [series] = state.views()["latency_hist"]["series"]
    counts, edges = series["counts"], np.asarray(series["edges"])
    assert sum(counts) == 1000 and all(c > 0 for c in counts)
    assert np.allclose(np.diff(edges) % 20.0, 0.0, atol=1e-6)  # a whole number of periods wide


def test_a_stage_keeps_its_colour_whether_or_not_the_server_records_are_there():
    """Without the server's records the network bar came first and took the first stage's colour
    (pink with them, orange without)."""
    from polcache.dashboard.views import BAR_ORDER

    robot = [{"kind": "chunk", "t": i / 10, "robot": "arm", "latency_ms": 50.0, "server_ms": 20.0} for i in range(20)]
    server = [{"kind": "request", "t": i / 10, "robot": "arm", **{f"{s}_ms": 1.0 for s in BAR_ORDER[:6]}}
              for i in range(20)]
    colours = []
    for records in (robot, robot + server):
        state = RunState()
        state.add(records)
        colours.append({s["name"]: s["color"] for s in state.views()["stages"]["stacks"]})
    network = BAR_ORDER.index("network + tick wait")
    assert colours[0]["network + tick wait"] == colours[1]["network + tick wait"] == network
    assert colours[1]["inference"] == BAR_ORDER.index("inference") and colours[0]["server (total)"] == 6
