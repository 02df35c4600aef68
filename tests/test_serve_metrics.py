"""Metrics: in-process summaries, rotated JSON lines, Prometheus text over HTTP."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import numpy as np
import pytest

from fakes import FakeBackend, StepRobot, free_port
from polcache.metrics import JsonlWriter, Metrics, collect_metrics
from polcache.serve.server import PolicyServer
from polcache_client import ControlLoop, PolicyClient
from polcache_client.records import ChunkRecord, TickRecord


def tick(error_ms: float, miss: bool = False) -> TickRecord:
    return TickRecord(t=1.0, epoch=0, seq=1, period_error_ms=error_ms, state="fresh", queue_depth=3, deadline_miss=miss)


def test_counters_accumulate_and_summaries_are_windowed():
    m = Metrics(window=100)
    for i in range(1000):
        m.record(tick(float(i % 100), miss=i % 10 == 0))
    m.record(ChunkRecord(t=1.0, epoch=0, seq=1, latency_ms=5.0, inference_ms=float("nan"), server_ms=1.0, dropped_actions=2))
    snap = m.snapshot()
    assert snap["tick"]["ticks"] == 1000 and snap["tick"]["deadline_miss"] == 100
    assert snap["tick"]["period_error_ms"]["p50"] == pytest.approx(49.5) and snap["tick"]["period_error_ms"]["n"] == 1000
    assert snap["chunk"]["dropped_actions"] == 2 and snap["chunk"]["inference_ms"] == {"n": 0}  # NaN not counted


def test_window_zero_keeps_counters_and_prometheus_but_no_distributions():
    m = Metrics(window=0)  # as `polcache serve` runs it: nothing reads its snapshot
    for i in range(10):
        m.record(tick(float(i), miss=i == 3))
    assert m.snapshot() == {"tick": {"ticks": 10, "missed_ticks": 0, "waiting": 0, "deadline_miss": 1,
                                     "safe_stops": 0, "obs_dropped": 0}}
    assert 'polcache_tick_period_error_seconds_count{robot=""} 10.0' in m.prometheus_text()


def test_prometheus_text_over_http():
    with collect_metrics(port=0, robot="arm") as m:
        m.record(tick(0.25, miss=True))
        text = m.prometheus_text()
        assert "# TYPE polcache_tick_deadline_miss_total counter" in text
        assert 'polcache_tick_deadline_miss_total{robot="arm"} 1.0' in text
        assert 'polcache_tick_period_error_seconds_bucket{le="0.0005",robot="arm"} 1.0' in text
        assert 'polcache_tick_period_error_seconds_count{robot="arm"} 1.0' in text


def test_a_fixed_port_is_printed_too(capsys):
    port = free_port()
    with collect_metrics(port=port, robot="arm"):
        assert capsys.readouterr().out == f"metrics on http://127.0.0.1:{port}/metrics\n"


def test_port_zero_prints_the_port_it_took(capsys):
    with collect_metrics(port=0, robot="arm") as m:
        m.record(tick(0.25))
        line = capsys.readouterr().out.strip()
        assert line.startswith("metrics on http://127.0.0.1:") and line.endswith("/metrics")
        body = urllib.request.urlopen(line.removeprefix("metrics on "), timeout=5).read().decode()
        assert 'polcache_tick_ticks_total{robot="arm"} 1.0' in body


def test_http_endpoint_serves_metrics_only():
    from polcache.metrics import serve_prometheus

    m = Metrics()
    m.record(tick(0.1))
    http = serve_prometheus(m, 0)
    try:
        port = http.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'polcache_tick_ticks_total{robot=""} 1.0' in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        http.shutdown()
        http.server_close()


def test_jsonl_file_is_rotated_and_bounded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, max_bytes=2000, backups=2)
    for i in range(200):
        writer(tick(float(i)))
    writer.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["metrics.jsonl", "metrics.jsonl.1", "metrics.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    last = [json.loads(line) for line in path.read_text().splitlines()][-1]
    assert last["kind"] == "tick" and last["period_error_ms"] == 199.0


def test_a_second_process_writing_the_same_metrics_file_is_refused(tmp_path):
    """Two servers given one --metrics-file both appended to it (the dashboard saw two servers as
    one) and rotated it on their own counts, losing lines; the second is refused, naming the first."""
    import subprocess
    import sys

    from polcache.errors import PolcacheError

    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    try:
        other = subprocess.run([sys.executable, "-c", f"from polcache.metrics import JsonlWriter; "
                                                      f"JsonlWriter({str(path)!r})"], capture_output=True, text=True)
        assert other.returncode == 1 and f"metrics file {path}: another process (pid {os.getpid()}) writes it; " \
               f"give each writer its own file" in other.stderr, other.stderr
    finally:
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # its lock went with it
    JsonlWriter(path).close()  # closed: the next writer takes it
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(PolcacheError, match="another writer in this process writes it"):  # one process, two writers
        with JsonlWriter(path):
            JsonlWriter(link)  # through a link to it: the same file, the same lock


def test_jsonl_line_longer_than_a_file_gets_a_file_of_its_own(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, max_bytes=100, backups=2, flush_s=0.01)
    writer.write({"kind": "info", "note": "x" * 300})
    writer(tick(1.0))
    writer.close()
    assert not writer._thread.is_alive()  # noqa: SLF001 - it finished instead of rotating forever
    assert json.loads((tmp_path / "metrics.jsonl.1").read_text())["note"] == "x" * 300
    info, last = [json.loads(line) for line in path.read_text().splitlines()]  # the info line starts every file
    assert info["note"] == "x" * 300 and last["period_error_ms"] == 1.0


def test_jsonl_every_rotated_file_starts_with_the_latest_info_line(tmp_path):
    """Once the first file is rotated away, the files left must still say what ran (deadline,
    target rate): a report or dashboard reading them said "no server info yet"."""
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, max_bytes=1000, backups=2, flush_s=1000)  # the test drives the flushes
    writer.write({"kind": "info", "role": "server", "deadline_ms": 50.0})
    writer._write_gathered()  # noqa: SLF001 - a flush, as the writer's thread does
    writer.write({"kind": "info", "role": "server", "deadline_ms": 70.0})  # e.g. restarted with another budget
    for i in range(100):
        writer(tick(float(i)))
    writer.close()
    files = [path.with_name(f"metrics.jsonl.{i}") for i in (2, 1)] + [path]
    assert all(p.exists() for p in files) and not path.with_name("metrics.jsonl.3").exists()
    for p in files:
        first = json.loads(p.read_text().splitlines()[0])
        assert first == {"kind": "info", "role": "server", "deadline_ms": 70.0}, p
        assert p.stat().st_size <= 1000
    ticks = [json.loads(line)["period_error_ms"] for p in files for line in p.read_text().splitlines()[1:]]
    assert ticks == [float(i) for i in range(100 - len(ticks), 100)]  # the newest, each once


def test_jsonl_file_rotates_only_when_full_while_records_keep_arriving(tmp_path):
    """A record that arrives while the writer writes goes into the same file at the next turn:
    rotating for it (whenever any had arrived) cut files at a few KB under load, not at max_bytes."""
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, max_bytes=10_000, backups=3, flush_s=1000)  # the test drives the flushes

    class Busy:  # the file, with a record recorded by another thread during each of the first writes
        def __init__(self, real):
            self.real, self.busy = real, 5

        def write(self, data):
            if self.busy:
                self.busy -= 1
                writer(tick(2.0))
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

    writer._file = Busy(writer._file)  # noqa: SLF001 - records arrive while the writer thread writes
    writer(tick(1.0))
    writer._write_gathered()  # noqa: SLF001 - a flush, as the writer's thread does
    writer._file = writer._file.real  # noqa: SLF001
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # far from 10 kB: no rotation
    assert len(path.read_text().splitlines()) == 6


def test_jsonl_files_under_load_are_rotated_near_their_limit(tmp_path):
    path = tmp_path / "metrics.jsonl"
    limit = 32 * 1024
    writer = JsonlWriter(path, max_bytes=limit, backups=3, flush_s=0.001)
    rotated_at, rotate = [], writer._rotate  # noqa: SLF001 - the size of every file the writer rotates

    def counted_rotate():
        rotated_at.append(writer._size)  # noqa: SLF001
        rotate()

    writer._rotate = counted_rotate  # noqa: SLF001
    line = {"kind": "error", "t": 1.0, "robot": "x", "code": "malformed", "errors": 1}
    width = len(json.dumps(line, separators=(",", ":"))) + 1
    for i in range(20 * limit // width):  # about 20 files' worth, recorded while the writer writes
        writer.write(line)
        if i % 200 == 0:
            time.sleep(0.0002)
    writer.close()
    assert writer.dropped == 0 and all(path.with_name(f"metrics.jsonl.{i}").exists() for i in (1, 2, 3))
    assert len(rotated_at) >= 19 and all(limit - width < size <= limit for size in rotated_at), rotated_at


def test_jsonl_writer_appends_after_a_cut_off_line_and_names_a_path_it_cannot_write(tmp_path):
    from polcache.errors import PolcacheError

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "tick", "period_error_ms": 1.0}\n{"kind": "ti')  # the last run was killed mid-line
    writer = JsonlWriter(path)
    writer(tick(2.0))
    writer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["period_error_ms"] == 2.0
    (tmp_path / "a_file").write_text("")
    for bad, why in ((tmp_path / "a_file" / "m.jsonl", "a_file is a file, not a folder"),
                     (tmp_path, "is a folder; expected a polcache metrics file")):
        with pytest.raises(PolcacheError, match=f"metrics file {bad}: .*{why}"):
            JsonlWriter(bad)
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PolcacheError, match="not writable by this user|cannot write it"):
            JsonlWriter(tmp_path / "locked" / "m.jsonl")


def test_an_empty_metrics_path_is_named_empty_not_the_current_folder():
    """Path("") is ".": the writers and the dashboard said "metrics file .: is a folder" (JsonlWriter
    said "empty path" while check_output ran before the metrics file's own check)."""
    from polcache.errors import PolcacheError
    from polcache.metrics.jsonl import check_metrics_input
    from polcache_client.metrics_file import MetricsFile, MetricsFileError

    what = 'empty path; expected a polcache metrics file (lines of {"kind": ...} records)'
    for writer, error in ((JsonlWriter, PolcacheError), (MetricsFile, MetricsFileError)):
        with pytest.raises(error) as refused:
            writer("")
        assert str(refused.value) == f"metrics file: {what}"
    with pytest.raises(PolcacheError) as refused:
        check_metrics_input(" ", "--metrics")
    assert str(refused.value) == f"--metrics: {what}"


@pytest.mark.parametrize("writer_class", ["polcache", "polcache_client"])
def test_jsonl_writer_refuses_a_file_of_another_kind(tmp_path, writer_class):
    """`serve --metrics-file sched.json` appended records to a schedule (and rotation moved it away).
    The robot-side package's writer (a robot with polcache-client alone) refuses the same."""
    from polcache.errors import PolcacheError
    from polcache_client.metrics_file import MetricsFile, MetricsFileError

    writer, error = (JsonlWriter, PolcacheError) if writer_class == "polcache" else (MetricsFile, MetricsFileError)
    with pytest.raises(error, match=f"metrics file {tmp_path}: is a folder; expected a polcache metrics file"):
        writer(tmp_path)

    schedule = tmp_path / "sched.json"
    schedule.write_text('{"format": "polcache-schedule", "budget": 4}\n')
    for other in (schedule, tmp_path / "notes.txt"):
        other.write_text(other.read_text() if other.exists() else "robot notes\n")
        before = other.read_text()
        with pytest.raises(error, match=f"metrics file {other}: is not a polcache metrics file"):
            writer(other)
        assert other.read_text() == before
    (tmp_path / "empty.jsonl").write_text("")
    writer(tmp_path / "empty.jsonl").close()  # empty, or a metrics file's first line: appended to


@pytest.mark.parametrize("bad", ["slash", "under a file", "fifo", "locked folder", "unreadable"])
def test_metrics_file_alone_checks_its_path_as_polcache_does(tmp_path, monkeypatch, bad):
    """A robot with polcache-client alone: `MetricsFile("runs/")` wrote a file named runs, one under a
    file said "cannot write it (File exists)", and the reader called a file it may not read "not a
    polcache metrics file". One line naming the path, the words of polcache's writer and reader.
    Root reads and enters anything: the OS's PermissionError is raised here as it would be."""
    from pathlib import Path

    import polcache_client.metrics_file as metrics_file
    from polcache.errors import PolcacheError
    from polcache.metrics.jsonl import check_metrics_input
    from polcache_client.metrics_file import MetricsFile, MetricsFileError

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    (tmp_path / "a_file").write_text("")
    path = {"slash": f"{tmp_path / 'runs'}/", "under a file": tmp_path / "a_file" / "m.jsonl",
            "fifo": tmp_path / "fifo", "locked folder": tmp_path / "locked" / "m.jsonl",
            "unreadable": tmp_path / "m.jsonl"}[bad]
    why = {"slash": 'ends with a slash, a folder; expected a polcache metrics file (lines of {"kind": ...} records), '
                    "a file name",
           "under a file": f"{tmp_path / 'a_file'} is a file, not a folder",
           "fifo": 'is not a regular file; expected a polcache metrics file (lines of {"kind": ...} records)',
           "locked folder": f"permission denied ({path}); expected a polcache metrics file "
                            '(lines of {"kind": ...} records) this user may read and write',
           "unreadable": "cannot read it (Permission denied); expected a polcache metrics file "
                         '(lines of {"kind": ...} records) this user may read'}[bad]
    if bad == "fifo":
        os.mkfifo(path)
    elif bad == "locked folder":
        monkeypatch.setattr(Path, "stat", lambda self, *args, **kwargs: denied() if "locked" in str(self)
                            else os.stat(self, *args, **kwargs))
    elif bad == "unreadable":
        path.write_text('{"kind": "tick", "t": 1.0}\n')
        monkeypatch.setattr(metrics_file, "open", denied, raising=False)  # as mode 000 is to a user not root
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MetricsFileError) as refused:
        MetricsFile(path)
    assert str(refused.value) == f"metrics file {path}: {why}"
    with pytest.raises(PolcacheError) as polcaches:
        JsonlWriter(path)
    assert str(polcaches.value) == str(refused.value)
    with pytest.raises(PolcacheError) as read:
        check_metrics_input(path, "--metrics")
    assert str(read.value) == f"--metrics {path}: {why}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_metrics_file_in_a_with_block_writes_what_is_left_when_interrupted(tmp_path):
    """A robot stopped by Ctrl-C lost its last lines: the writer thread, a daemon, died with the
    process before its next flush. The with block closes the file however the block ends."""
    from polcache_client.metrics_file import MetricsFile

    path = tmp_path / "robot.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with MetricsFile(path, flush_s=1000) as metrics:  # no flush before the interrupt
            for i in range(3):
                metrics.write(tick(float(i)))
            raise KeyboardInterrupt
    assert [json.loads(line)["period_error_ms"] for line in path.read_text().splitlines()] == [0.0, 1.0, 2.0]
    with JsonlWriter(tmp_path / "server.jsonl") as writer:  # polcache's writer is one too
        assert isinstance(writer, JsonlWriter)


def test_jsonl_writer_survives_a_failed_write(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, flush_s=1000)  # the test drives the flushes

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

        flush = write

        def close(self):
            pass

    real, writer._file = writer._file, FullDisk()  # noqa: SLF001 - the disk fills up under the writer
    real.close()
    writer(tick(1.0))
    writer._write_gathered()  # noqa: SLF001 - one flush, as the writer's thread does
    writer(tick(2.0))  # the disk has room again: the writer reopened its file
    writer.close()
    assert [json.loads(line)["period_error_ms"] for line in path.read_text().splitlines()] == [2.0]
    assert writer.dropped == 1 and "No space left on device" in caplog.text
    assert caplog.records[-1].getMessage() == f"1 metrics line not written to {path} (see the warnings above)"


def test_jsonl_writer_closing_on_a_full_disk_says_so_without_a_traceback(tmp_path, caplog):
    """The last write happens as the file closes: on a full disk it raised out of the writer's thread, a
    traceback at every run's end (and its status 0)."""
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, flush_s=1000)

    class FullOnClose:
        def write(self, data):
            return len(data)

        def flush(self):
            pass

        def close(self):
            raise OSError(28, "No space left on device")

    real, writer._file = writer._file, FullOnClose()  # noqa: SLF001 - the disk fills up under the writer
    real.close()
    errors = []
    old_hook, threading.excepthook = threading.excepthook, errors.append
    try:
        writer.close()
    finally:
        threading.excepthook = old_hook
    assert errors == [] and f"not written to {path} as it closed: [Errno 28] No space left" in caplog.text


def test_jsonl_lines_are_json_with_labels_and_nulls_and_a_bad_line_is_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, labels={"robot": "arm"})
    writer.write({"kind": "info", "hz": np.float32(50.0)})
    writer(TickRecord(t=1.0, epoch=0, seq=np.int64(7), period_error_ms=float("nan"), state="fresh", queue_depth=3))
    writer({"kind": "info", "what": object()})  # JSON cannot hold it: this line is lost, the writer goes on
    writer(ChunkRecord(t=2.0, epoch=0, seq=8, latency_ms=float("inf"), inference_ms=1.5, server_ms=2.0))
    writer({"kind": "tick", "t": 3.0, "period_error_ms": 0.1})  # a record written as a dict: named all the same
    writer({"robot": "other", "kind": "tick", "t": 4.0})  # its own name kept (and "kind" still first)
    writer.close()
    assert all(line.startswith('{"kind":') for line in path.read_text().splitlines())  # how a metrics file is known
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"kind": "info", "hz": 50.0, "robot": "arm"}  # a dict gets the labels it lacks
    assert lines[3] == {"kind": "tick", "t": 3.0, "period_error_ms": 0.1, "robot": "arm"}
    assert lines[4]["robot"] == "other"
    assert lines[1]["kind"] == "tick" and lines[1]["robot"] == "arm" and lines[1]["seq"] == 7
    assert lines[1]["period_error_ms"] is None  # NaN: not measured
    assert lines[2]["kind"] == "chunk" and lines[2]["latency_ms"] is None and lines[2]["inference_ms"] == 1.5
    assert len(lines) == 5 and writer.dropped == 1 and "metrics line not written" in caplog.text


def test_jsonl_lines_over_the_queue_are_dropped_counted_and_warned(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, queue_size=2, flush_s=60)  # nothing written until it closes
    for seq in range(5):
        writer(TickRecord(t=1.0, epoch=0, seq=seq, period_error_ms=0.0, state="fresh", queue_depth=3))
    writer.close()
    assert len(path.read_text().splitlines()) == 2 and writer.dropped == 3
    assert caplog.text.count("2 lines already wait for the disk") == 1  # rate-limited: one warning, not three
    assert "3 metrics lines not written" in caplog.text


def test_server_and_loop_write_one_metrics_file(tmp_path):
    path = tmp_path / "run.jsonl"
    robot = StepRobot(100)
    with collect_metrics(path) as m:
        with PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", on_record=m.record) as server, \
                PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=100) as client:
            client.connect(timeout_s=2)
            ControlLoop(robot, client, 100, on_tick=m.record, on_chunk=m.record).run(ticks=20)
        snap = m.snapshot()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["kind"] for line in lines} == {"tick", "chunk", "request"}
    assert snap["tick"]["ticks"] == 20 and snap["request"]["inference_ms"]["n"] >= 1
    # every safe stop the robot was told, run()'s own at its end too (it wrote no line), in the file
    # and the counters; run()'s stop is no tick
    ticks = [line for line in lines if line["kind"] == "tick"]
    assert snap["tick"]["safe_stops"] == sum(t["safe_stops"] for t in ticks) == len(robot.stops) >= 1
    assert sum(t["ticks"] for t in ticks) == 20 and snap["tick"]["period_error_ms"]["n"] == 20


def test_a_departed_robots_gauges_go_and_its_totals_stay():
    """Prometheus kept a departed robot's last queue depth and batch size as if it were still served."""
    import re

    from fakes import wait_for

    robot = StepRobot(100)
    m = Metrics(window=0)
    with PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", on_record=m.record,
                      on_session_closed=m.forget_robot) as server:
        for name in ("arm", "other"):
            with PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=100, name=name) as client:
                client.connect(timeout_s=2)
                ControlLoop(robot, client, 100).run(ticks=10)
                assert re.search(rf'polcache_request_queue_depth{{robot="{name}"}} \d', m.prometheus_text())
        assert wait_for(lambda: not server.sessions)
    text = m.prometheus_text()
    assert "polcache_request_queue_depth{" not in text and "polcache_request_batch_size{" not in text
    assert "# TYPE polcache_request_queue_depth gauge" in text  # the family stays, without series
    for name in ("arm", "other"):
        assert re.search(rf'polcache_request_requests_total{{robot="{name}"}} [1-9]', text)


def test_a_departed_robots_series_go_after_a_while_and_come_back_with_it(monkeypatch):
    """Every robot name's series stayed until the server restarted: one that sees many names over
    its life (a name per run) grew without bound."""
    from polcache.metrics import prometheus
    from polcache.serve.records import RequestRecord

    def request(robot: str) -> RequestRecord:
        return RequestRecord(t=0.0, robot=robot, epoch=0, seq=0, decode_ms=0.1, preprocess_ms=0.1, queue_ms=0.1,
                             inference_ms=1.0, postprocess_ms=0.1, encode_ms=0.1, total_ms=2.0, queue_depth=1,
                             batch_size=1, superseded=0, deadline_miss=False)

    now = [1000.0]
    monkeypatch.setattr(prometheus.time, "monotonic", lambda: now[0])
    m = Metrics(window=0)
    for name in ("run-1", "run-2", "arm"):
        m.record(request(name))
    m.forget_robot("run-1")
    m.forget_robot("run-2")
    m.forget_robot("arm")
    m.record(request("arm"))  # back (or another session of its name): kept
    now[0] += prometheus.DEPARTED_KEPT_S - 1
    assert 'robot="run-1"' in m.prometheus_text()  # still scraped a while: its last increments are seen
    now[0] += 2
    text = m.prometheus_text()
    assert 'robot="run-1"' not in text and 'robot="run-2"' not in text
    assert 'polcache_request_requests_total{robot="arm"} 2.0' in text
    m.record(request("run-1"))  # a name back after its series went: they start again
    assert 'polcache_request_requests_total{robot="run-1"} 1.0' in m.prometheus_text()
