"""The live dashboard in a real headless Chromium, fed by a real server and simulated robot.

`polcache serve` (the shipped reach-v3 checkpoint with a uniform cache, so the schedule view
has a plan) and `polcache sim-robot` at 50 Hz write their metrics files; `polcache dashboard`
follows them from before they exist; Chromium loads the page, runs its script (polling
/data.json) and dumps the DOM, where every view marks data-received="1" once it drew data.
scripts/test.sh installs Chromium where apt-get can; elsewhere this test skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polcache.dashboard import Dashboard
from polcache.dashboard.views import VIEWS
from fakes import free_port

CHECKPOINT = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
POLCACHE = [sys.executable, "-m", "polcache.cli"]


def headless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_every_view_receives_data_in_a_real_browser(tmp_path):
    pytest.importorskip("metaworld")
    server_file, robot_file = tmp_path / "server.jsonl", tmp_path / "robot.jsonl"
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    procs = []
    try:
        dashboard = subprocess.Popen([*POLCACHE, "dashboard", "--metrics", str(server_file), "--metrics",
                                      str(robot_file), "--port", "0"], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(dashboard)
        procs.append(subprocess.Popen([*POLCACHE, "serve", "--checkpoint", str(CHECKPOINT), "--cache", "uniform:3",
                                       "--bind", address, "--metrics-file", str(server_file)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        robot = subprocess.run([*POLCACHE, "sim-robot", "--task", "reach-v3", "--hz", "50", "--episodes", "2",
                                "--server", address, "--connect-timeout", "120", "--metrics-file", str(robot_file)],
                               capture_output=True, text=True, timeout=300, env=env)
        assert robot.returncode == 0, robot.stderr[-2000:]
        url = re.search(r"dashboard on (http://\S+)", dashboard.stdout.readline()).group(1)

        dom = headless("--dump-dom", url)
        received = dict(re.findall(r'id="view-([a-z_]+)" data-received="([01])"', dom.stdout))
        assert set(received) == set(VIEWS), dom.stderr[-2000:]
        assert [v for v, mark in received.items() if mark != "1"] == []
        assert "sim-robot reach-v3" in dom.stdout  # the robot's name labels its series

        shot = tmp_path / "dashboard.png"
        headless("--window-size=1300,2400", f"--screenshot={shot}", url)
        assert shot.stat().st_size > 20_000
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def page_dom(paths) -> str:
    """The live page of these metrics files, as Chromium renders it."""
    dashboard = Dashboard(paths)
    dashboard.poll()
    try:
        return headless("--dump-dom", dashboard.serve(port=0)).stdout
    finally:
        dashboard.stop()


def section(dom: str, view: str) -> str:
    return re.search(rf'id="view-{view}".*?</section>', dom, re.S).group(0)


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_reference_lines_are_named_apart_and_off_the_curves(tmp_path):
    """Robots at one deadline share a line and its name; close deadlines' names are apart (they were
    drawn on top of each other): a time line's in the legend (drawn over the line they hid the
    newest points of a rate at its target), a histogram's moved apart; the x axis's last number ends
    at its tick, not cut off."""
    server = tmp_path / "server.jsonl"
    server.write_text(json.dumps({"kind": "info", "t": 100.0, "role": "server",
                                  "policy": {"n_action_steps": 8}}) + "\n")
    paths = [server]
    for name, hz in (("armA", 50.0), ("armB", 50.0), ("armC", 48.0)):  # deadlines 140, 140 and 145.8 ms
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in [
            {"kind": "info", "t": 100.0, "monotonic": 0.0, "role": "robot", "robot": name, "hz": hz},
            *({"kind": "chunk", "t": i / 10, "robot": name, "latency_ms": 100.0 + i} for i in range(100))]))
    dom = page_dom(paths)
    latency = section(dom, "latency")
    assert not re.search(r"<text[^>]*>deadline", latency)  # nothing over the plot
    assert re.findall(r'dashed #c00"></i>([^<]*)</span>', latency) == ["deadline armA, armB: 140.0",
                                                                       "deadline armC: 145.8"], latency[-600:]
    ys = [float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.-]+)" text-anchor="end"[^>]*>deadline arm',
                                        section(dom, "latency_hist"))]
    assert len(ys) == 2 and abs(ys[0] - ys[1]) >= 11
    x_ticks = re.findall(r'<text x="([\d.]+)" y="217" text-anchor="(\w+)">([^<]*)<', section(dom, "latency_hist"))
    values = [float(label) for _, _, label in x_ticks]  # round steps (they read 47.7, 71.7, 95.7)
    assert len(values) >= 4 and len({round(b - a, 9) for a, b in zip(values, values[1:])}) == 1, x_ticks
    step = values[1] - values[0]
    assert step in (1, 2, 5, 10, 20, 50) and all(v % step == 0 for v in values), x_ticks
    assert all(anchor == "end" for x, anchor, _ in x_ticks if float(x) > 580 - 12 - 12), x_ticks  # none cut off


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_counts_have_whole_ticks_and_a_deadline_at_the_left_edge_keeps_its_label_inside(tmp_path):
    """A loaded run: the deadline line near the histogram's left edge had its label cut off and
    drawn over the axis; counts of a few safe stops or drops had ticks at 1.57, 2.36, 3.15."""
    server = tmp_path / "server.jsonl"
    server.write_text(json.dumps({"kind": "info", "t": 100.0, "role": "server",
                                  "policy": {"n_action_steps": 8}}) + "\n")
    robot = tmp_path / "arm.jsonl"
    robot.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "info", "t": 100.0, "monotonic": 0.0, "role": "robot", "robot": "sim-robot reach-v3", "hz": 50.0},
        *({"kind": "chunk", "t": i / 10, "robot": "sim-robot reach-v3", "latency_ms": 135.0 + 3 * i,
           "dropped_actions": int(i % 30 == 0)} for i in range(100))]))
    dom = page_dom([server, robot])
    (anchor,) = re.findall(r'text-anchor="(\w+)"[^>]*>deadline sim-robot reach-v3: 140.0<',
                           section(dom, "latency_hist"))
    assert anchor == "start"  # right of its line: to the left it ran over the axis
    drops = section(dom, "drops")
    y_ticks = re.findall(r'<text x="48" y="[\d.]+" text-anchor="end">([^<]+)</text>', drops)
    assert y_ticks and all(re.fullmatch(r"\d+", tick) for tick in y_ticks), y_ticks


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_a_line_of_one_point_is_drawn_as_a_dot(tmp_path):
    """About a second of records (a file just truncated): the rate's one point drew nothing, while
    the page marked the view as having data."""
    robot = tmp_path / "arm.jsonl"
    robot.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "info", "t": 100.0, "monotonic": 0.0, "role": "robot", "robot": "arm", "hz": 50.0},
        *({"kind": "tick", "t": i / 50, "robot": "arm", "ticks": 1, "period_error_ms": 0.01} for i in range(40))]))
    dom = page_dom([robot])
    rate = section(dom, "rate")
    assert 'data-received="1"' in rate and "<circle" in rate
    assert re.search(r"<th>ticks</th>.*<td>arm</td><td>0</td><td>-</td><td>-</td><td>-</td><td>-</td><td>40</td>", dom)


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_a_target_held_for_one_run_of_a_file_spans_that_run_only(tmp_path):
    """Two runs in one robot file, 50 Hz then 25 Hz: each target line spans its own run (the first
    run's 50 Hz was drawn under the second's 25 Hz line across the whole axis)."""
    robot = tmp_path / "arm.jsonl"
    runs = []
    for start, hz in ((0.0, 50.0), (20.0, 25.0)):
        runs += [{"kind": "info", "t": 100.0 + start, "monotonic": start, "role": "robot", "robot": "arm", "hz": hz},
                 *({"kind": "tick", "t": start + i / hz, "robot": "arm", "ticks": 1, "period_error_ms": 0.01}
                   for i in range(int(10 * hz)))]
    robot.write_text("".join(json.dumps(r) + "\n" for r in runs))
    dom = page_dom([robot])
    lines = re.findall(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="[\d.]+" y2="[\d.]+" stroke="#c00"', section(dom, "rate"))
    (first_from, first_to), (second_from, second_to) = sorted((float(a), float(b)) for a, b in lines)
    assert first_from < first_to <= second_from < second_to  # side by side, each over its own run
    assert second_from - first_to < 1.0
