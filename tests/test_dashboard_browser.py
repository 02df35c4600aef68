"""The live dashboard in a real headless Chromium, fed by a real server and simulated robot.

`polcache serve` (the shipped reach-v3 checkpoint with a uniform cache, so the schedule view
has a plan) and `polcache sim-robot` at 50 Hz write their metrics files; `polcache dashboard`
follows them from before they exist; Chromium loads the page, runs its script (polling
/data.json) and dumps the DOM, where every view marks data-received="1" once it drew data.
scripts/test.sh installs Chromium where apt-get can; elsewhere this test skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polcache.dashboard.views import VIEWS

pytest.importorskip("metaworld")
CHECKPOINT = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
POLCACHE = [sys.executable, "-m", "polcache.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def headless(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/test.sh installs it with apt-get where it can)")
def test_every_view_receives_data_in_a_real_browser(tmp_path):
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
