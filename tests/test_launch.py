"""`polcache launch`: config checks, and real launches (server + simulated robot as processes)
that finish by themselves, stop on SIGTERM robot-first, leave nothing running and pin children."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from polcache.errors import ConfigError, PolcacheError
from polcache.launch import check_machine, load_launch_config
from polcache.launch.supervisor import (connect_address, dashboard_command, robot_cameras, robot_command, robot_task,
                                       server_command, server_threads)
from fakes import free_port
from polcache_client.signals import Terminated

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "launch"
SIM = CONFIGS / "sim.yaml"
TWO_CPUS = len(os.sched_getaffinity(0)) >= 2


def sim_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """sim.yaml on free ports, writing under tmp_path, placed on this machine's CPUs; `extra` overrides
    replace these of the same keys (a key given twice with two values is refused)."""
    cpus = sorted(os.sched_getaffinity(0))
    robot_cpu, server_cpu = (cpus[0], cpus[1]) if TWO_CPUS else (cpus[0], cpus[0])
    given = {e.partition("=")[0] for e in extra}
    return [o for o in (f"run_dir={tmp_path / 'runs'}", f"server.bind=tcp://127.0.0.1:{free_port()}",
                        f"dashboard.port={free_port()}", f"robot.placement.cpus=[{robot_cpu}]",
                        f"server.placement.cpus=[{server_cpu}]", f"dashboard.placement.cpus=[{server_cpu}]")
            if o.partition("=")[0] not in given] + list(extra)


@pytest.mark.parametrize("name", ["sim", "workstation", "jetson"])
def test_shipped_launch_configs_load(name):
    cfg = load_launch_config(CONFIGS / f"{name}.yaml")
    assert cfg.server.checkpoint and cfg.dashboard.port == 8050
    assert cfg.robot.enabled == (name == "sim")


@pytest.mark.parametrize("override, named", [
    ("server.bogus=1", "'server.bogus'"),
    ("robot.placement.cpu=[0]", "'robot.placement.cpu'"),
    ("server.bind=tcp://127.0.0.1:70000", "server.bind"),
    ("server.bind=udp://x", "server.bind"),
    ("dashboard.port=0", "dashboard.port"),
    ("server.device=gpu", "server.device"),
    ("server.threads=100000", "server.threads"),
    ("server.bind=tcp://127.0.0.1:8050", "dashboard.port: 8050 is server.bind's port too"),
    ("server.precision=fp8", "server.precision"),
    ("robot.placement.fifo_priority=100", "robot.placement.fifo_priority"),
    ("robot.placement.cpus=[0,0]", "robot.placement.cpus"),
    ("robot.hz=0", "robot.hz"),
    ("robot.hz=1e9", "robot.hz: expected a rate in [0.01, 10000] Hz"),
    ("robot.episodes=0", "robot.episodes"),
    ("server.max_batch=0", "server.max_batch"),
    ("server.max_batch=65", "server.max_batch: expected a batch size in 1..64"),
    ("server.inline_ms=-1", "server.inline_ms"),
    ("robot.blend=average", "robot.blend"),
    ("robot.name=''", "robot.name"),
    ('robot.name="arm\\n2"', "robot.name"),
    ('server.instruction=""', "server.instruction: empty instruction"),
    pytest.param("robot.instruction=" + "x" * 1025, "robot.instruction: 1025 UTF-8 bytes, at most 1024",
                 id="robot.instruction-too-long"),
    ("robot", "override 'robot': expected key=value, e.g. robot.episodes=50"),  # not a training example
    ("server.cache=threshold:0.1+forecast", "server.cache: cache spec 'threshold:0.1+forecast': +forecast applies to "
                                            "static plans"),  # refused by the server only once it ran
    ("server.metrics_port=0", "server.metrics_port: expected a port in 1..65535, got 0 (launch needs fixed ports: it "
                              "prints each address; the commands run alone take 0)"),
    # an optional field took any value its type refused (a traceback later, or the server refusing it)
    ("server.metrics_port=abc", "server.metrics_port: expected an integer, got 'abc'"),
    ("robot.metrics_port=true", "robot.metrics_port: expected an integer, got True"),
    ("robot.metrics_port=8050", "robot.metrics_port: 8050 is dashboard.port's port too"),
    ("server.metrics_port=5555", "server.metrics_port: 5555 is server.bind's port too"),
])
def test_config_refuses_bad_values_naming_the_field(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_launch_config(SIM, [override])


def test_a_port_left_in_time_wait_by_a_stopped_run_is_free_to_launch_on(tmp_path):
    """The dashboard closes the health check's and browsers' connections first, so its port keeps
    TIME_WAIT entries for a minute after a run stops; launching again at once must not be refused."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server and ZeroMQ bind
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server side closes first: its end of the connection enters TIME_WAIT
        client.recv(1)
        client.close()
    check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"dashboard.port={port}")))
    check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.bind=tcp://127.0.0.1:{port}")))


def test_a_launch_without_a_robot_says_where_robots_connect_and_which_keys_they_need():
    """A workstation launch said "running: a robot may connect now" after "server tcp://0.0.0.0:5555":
    no address to connect to, and nothing of the keys."""
    from polcache.launch.supervisor import robot_reach

    workstation = load_launch_config(CONFIGS / "workstation.yaml", [])
    assert robot_reach(workstation.server) == (f"at tcp://{socket.gethostname()}:5555 with keys/client.key_secret and "
                                               f"keys/server.key copied to it")
    assert robot_reach(load_launch_config(SIM, []).server) == f"at {load_launch_config(SIM, []).server.bind}"


def test_machine_check_names_the_device_setting_not_a_flag(tmp_path):
    """launch takes no --device: it said "server.device: --device cuda: ...; use --device cpu"."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is of a machine without it")
    with pytest.raises(PolcacheError,
                       match=r"^server.device cuda: CUDA is not available \(.*\); use server.device=cpu$"):
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, "server.device=cuda")))


def test_machine_check_names_missing_checkpoint_busy_ports_and_cpus(tmp_path):
    with pytest.raises(PolcacheError, match="server.checkpoint: .*nope is not a directory"):
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.checkpoint={tmp_path / 'nope'}")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolcacheError, match="server.checkpoint: .*empty is neither a checkpoint"):
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.checkpoint={tmp_path / 'empty'}")))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PolcacheError, match=f"server.bind: port {port} .* already in use"):
            check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.bind=tcp://127.0.0.1:{port}")))
        with pytest.raises(PolcacheError, match=f"dashboard.port: port {port} on 127.0.0.1 is already in use"):
            check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"dashboard.port={port}")))
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"dashboard.port={port}",
                                                            "dashboard.enabled=false")))
        with pytest.raises(PolcacheError, match=f"robot.metrics_port: port {port} on 127.0.0.1 is already in use"):
            check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"robot.metrics_port={port}")))
        # an interface's name, as ZeroMQ and serve take it (tcp://eth0:PORT; it was "cannot resolve host"): checked
        # at the interface's address, and a local robot sent there
        with pytest.raises(PolcacheError, match=f"server.bind: port {port} on 127.0.0.1 is already in use"):
            check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.bind=tcp://lo:{port}")))
    assert connect_address("tcp://lo:6000") == "tcp://127.0.0.1:6000"
    with pytest.raises(PolcacheError, match=r"server.bind: cannot bind 192\.0\.2\.1:5555 here"):  # not ours
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, "server.bind=tcp://192.0.2.1:5555")))
    unavailable = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(PolcacheError, match=f"server.placement.cpus: CPU {unavailable} is not available"):
        check_machine(load_launch_config(SIM, sim_overrides(tmp_path, f"server.placement.cpus=[{unavailable}]")))


def test_commands_pass_the_server_choices_through(tmp_path):
    cfg = load_launch_config(SIM, ["server.bind=tcp://*:6000", "server.backend=ort", "server.device=cuda:1",
                                   "server.precision=fp16", "server.cache=uniform:3", "server.placement.cpus=[0,1]"])
    cmd = server_command(cfg, tmp_path)
    for flag, value in (("--backend", "ort"), ("--device", "cuda:1"), ("--precision", "fp16"),
                        ("--cache", "uniform:3"), ("--threads", "2"), ("--bind", "tcp://*:6000")):
        assert cmd[cmd.index(flag) + 1] == value
    assert server_threads(cfg) == 2 and connect_address(cfg.server.bind) == "tcp://127.0.0.1:6000"
    assert "--verify" not in cmd and "--verify-min-past" not in cmd  # off by default
    # self-verification, which eval and serve offered and the one-config loop did not
    verified = server_command(load_launch_config(SIM, ["server.verify=4", "server.verify_min_past=3"]), tmp_path)
    assert verified[verified.index("--verify") + 1] == "4" and verified[verified.index("--verify-min-past") + 1] == "3"
    for overrides, said in ((["server.verify=0"], "server.verify: expected 1 (off) to 256 candidate chunks, got 0"),
                            (["server.verify_min_past=2"], "server.verify_min_past: expected a positive number of "
                                                           "past steps, with server.verify >= 2, got 2 with "
                                                           "server.verify 1")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_launch_config(SIM, overrides)
    # Prometheus endpoints (an ops team's scrape targets), which only serve and sim-robot run by hand offered
    scraped = load_launch_config(SIM, ["server.metrics_port=9100", "robot.metrics_port=9101"])
    assert server_command(scraped, tmp_path)[server_command(scraped, tmp_path).index("--metrics-port") + 1] == "9100"
    robot = robot_command(scraped, tmp_path, "reach-v3")
    assert robot[robot.index("--metrics-port") + 1] == "9101"
    assert "--metrics-port" not in server_command(cfg, tmp_path) + robot_command(cfg, tmp_path, "reach-v3")
    assert dashboard_command(cfg, tmp_path)[-6:] == ["--metrics", str(tmp_path / "server.jsonl"),
                                                     "--metrics", str(tmp_path / "robot.jsonl"), "--port", "8050"]
    assert robot_task(cfg) == "reach-v3"  # from the checkpoint's meta.json
    multi = tmp_path / "multi"  # a multi-task run's checkpoint names no task, but the tasks it trained on
    multi.mkdir()
    (multi / "meta.json").write_text(json.dumps({"task": "", "tasks": ["push-v3", "reach-v3"]}))
    with pytest.raises(PolcacheError, match=rf"robot.task: {multi} names no task; set robot.task \(it was trained "
                                            r"on push-v3, reach-v3\)"):
        robot_task(load_launch_config(SIM, [f"server.checkpoint={multi}"]))


def test_an_image_policy_gets_its_cameras_and_an_artifact_its_task(tmp_path):
    """The simulated robot sent state only, so an image checkpoint failed with spec_mismatch once the server ran;
    an exported artifact's task was looked for under a manifest key it does not have ("names no task")."""
    image = load_launch_config(SIM, ["server.checkpoint=polcache/assets/checkpoints/cue-reach-ptp-image"])
    cmd = robot_command(image, tmp_path, robot_task(image), robot_cameras(image))
    assert cmd[cmd.index("--cameras") + 1:cmd.index("--cameras") + 4] == ["top", "--image-size", "64"]
    state = load_launch_config(SIM)
    assert robot_cameras(state) is None and "--cameras" not in robot_command(state, tmp_path, "reach-v3")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"spec": {"task": "cue-reach", "obs": {
        "state": {"shape": [8], "dtype": "float32"}, "image_top": {"shape": [64, 64, 3], "dtype": "uint8"}}}}))
    exported = load_launch_config(SIM, [f"server.checkpoint={artifact}"])
    assert robot_task(exported) == "cue-reach" and robot_cameras(exported) == (["top"], 64)
    (artifact / "manifest.json").write_text(json.dumps({"spec": {"task": "cue-reach", "obs": {
        "image_top": {"shape": [64, 48, 3], "dtype": "uint8"}}}}))
    with pytest.raises(PolcacheError, match=r"top \[64, 48, 3\]; the simulated robot renders square RGB images"):
        robot_cameras(exported)


def test_cli_refuses_a_busy_port_in_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "polcache.cli", "launch", str(SIM),
                               *sim_overrides(tmp_path, f"server.bind=tcp://127.0.0.1:{port}")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"polcache launch: error: server.bind: port {port} on 127.0.0.1 "
                                                f"is already in use (`ss -ltnp 'sport = :{port}'` names the program, "
                                                f"maybe a launch still running; or give "
                                                f"server.bind=tcp://127.0.0.1:OTHER)"]
    assert "started" not in proc.stdout and not (tmp_path / "runs").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc")
def test_cli_refuses_a_run_dir_it_cannot_create_in_one_line_naming_it(tmp_path):
    """/proc/nope passes the writability check (for root) but cannot be created: exit status 1 and
    a line about /proc/nope that did not name run_dir."""
    proc = subprocess.run([sys.executable, "-m", "polcache.cli", "launch", str(SIM),
                           *sim_overrides(tmp_path, "run_dir=/proc/nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"polcache launch: error: run_dir /proc/nope: .*(cannot create /proc/nope/|not writable|"
                        r"files cannot be created).*", line)
    assert "started" not in proc.stdout and not os.path.exists("/proc/nope")


class Launcher:
    """`polcache launch` as a subprocess whose output lines are read as they come."""

    def __init__(self, overrides: list[str], prefix: list[str] = ()):
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "polcache.cli", "launch", str(SIM), *overrides],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                match = re.search(pattern, line)
                if match:
                    return match
            try:
                self.lines.append(self._queue.get(timeout=0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    break
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(self.lines))

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "".join(self.lines)

    def pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for m in (re.search(r"(\w+) started \(pid (\d+)", line) for line in self.lines) if m}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def fifo_permitted() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.slow
def test_sim_launch_runs_its_episodes_and_stops_everything(tmp_path):
    pytest.importorskip("metaworld")
    # Where SCHED_FIFO is permitted, take the permission away, so the refusal path runs too.
    no_nice = ["setpriv", "--bounding-set", "-sys_nice"] if fifo_permitted() and shutil.which("setpriv") else []
    launcher = Launcher(sim_overrides(tmp_path, "robot.episodes=2", "robot.placement.fifo_priority=50",
                                      "server.device=auto"), no_nice)
    out = launcher.finish()
    assert launcher.proc.returncode == 0, out
    assert re.search(r"reach-v3: success \d+% \(\d/2, 95% CI", out), out
    assert "loop 50 Hz: period error p50" in out
    assert re.search(r"server tcp://127\.0\.0\.1:\d+ answered a heartbeat", out)
    assert "server policy: torch on cpu, " in out  # the device the server chose, not the config's word
    assert "polcache has no dashboard command" in out or re.search(r"dashboard http://127\.0\.0\.1:\d+/", out)
    if no_nice or not fifo_permitted():
        assert "robot: SCHED_FIFO priority 50 is not permitted here" in out
        assert re.search(r"robot started \(pid \d+; [^)]*ordinary scheduling", out)  # what it got, not what it asked
    order = ["robot stopped (exit status 0)", "server stopped (exit status 0)"]
    order += ["dashboard stopped (exit status 0)"] if "dashboard" in launcher.pids() else []
    assert [out.index(line) for line in order] == sorted(out.index(line) for line in order), out
    assert all(gone(pid) for pid in launcher.pids().values())
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "robot.json").is_file() and (run / "server.jsonl").stat().st_size > 0


CHILD_SAYS_ITS_SIGNAL = """
import signal, sys, time
def said(signum, frame):
    print(signal.Signals(signum).name, flush=True)
    sys.exit(0)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, said)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("stop, told", [(KeyboardInterrupt(), "SIGINT"), (Terminated(), "SIGTERM")])
def test_the_children_are_stopped_with_the_launchers_signal(stop, told, tmp_path, monkeypatch):
    """A Ctrl-C reached the robot as SIGTERM, so its summary said "on SIGTERM" (an outside probe)."""
    from polcache.launch import supervisor

    def supervise(cfg, launch, task, cameras):
        for name in ("robot", "server"):
            child = launch.start(name, [sys.executable, "-c", CHILD_SAYS_ITS_SIGNAL])
            while "ready" not in child.log.read_text():
                time.sleep(0.01)
        raise stop

    monkeypatch.setattr(supervisor, "_supervise", supervise)
    cfg = load_launch_config(SIM, sim_overrides(tmp_path))
    assert supervisor.run_launch(cfg) == 128 + signal.Signals[told]
    (run,) = (tmp_path / "runs").iterdir()
    assert [(run / f"{name}.log").read_text().split() for name in ("robot", "server")] == [["ready", told]] * 2


@pytest.mark.slow
def test_sigterm_mid_run_stops_robot_then_server_and_children_are_pinned(tmp_path):
    pytest.importorskip("metaworld")
    launcher = Launcher(sim_overrides(tmp_path, "robot.episodes=200", "robot.placement.fifo_priority=0"))
    launcher.wait_for(r"robot started \(pid \d+")
    pids = launcher.pids()
    assert {"server", "robot"} <= set(pids) <= {"server", "robot", "dashboard"}
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[1]} if TWO_CPUS else {cpus[0]}
    assert os.sched_getaffinity(pids["robot"]) == {cpus[0]}
    assert os.sched_getaffinity(pids["server"]) == server_cpus
    if "dashboard" in pids:
        assert os.sched_getaffinity(pids["dashboard"]) == server_cpus
    # every thread of the server, torch's and ZeroMQ's included, inherited the placement
    tasks = Path(f"/proc/{pids['server']}/task")
    for tid in os.listdir(tasks):
        allowed = next(line for line in (tasks / tid / "status").read_text().splitlines()
                       if line.startswith("Cpus_allowed_list"))
        assert allowed.split()[-1] == (str(cpus[1]) if TWO_CPUS else str(cpus[0]))
    launcher.wait_for(r"connected to polcache serve")  # the robot's loop is running
    launcher.proc.send_signal(signal.SIGTERM)
    out = launcher.finish(timeout=60)
    assert launcher.proc.returncode == 143, out  # 128 + SIGTERM: what systemd's SuccessExitStatus names
    assert "terminated: stopping" in out
    order = ["robot stopped (exit status 143)", "server stopped (exit status 0)"]
    order += ["dashboard stopped (exit status 0)"] if "dashboard" in pids else []
    assert [out.index(line) for line in order] == sorted(out.index(line) for line in order), out
    assert all(gone(pid) for pid in pids.values())


@pytest.mark.slow
def test_a_dead_dashboard_leaves_the_run_going_and_a_killed_robot_is_said_with_exit_1(tmp_path):
    """The dashboard dying ended the robot's run (it only watches); a robot killed mid-run (SIGKILL, an
    OOM kill, a crash) made the launch exit 247 (256 - 9) with only "robot stopped (SIGKILL)"."""
    pytest.importorskip("metaworld")
    launcher = Launcher(sim_overrides(tmp_path, "robot.episodes=200"))
    launcher.wait_for(r"connected to polcache serve")
    pids = launcher.pids()
    if "dashboard" in pids:  # where this polcache has the dashboard
        os.kill(pids["dashboard"], signal.SIGKILL)
        launcher.wait_for(r"dashboard exited unexpectedly \(killed by SIGKILL\): the server and robot go on")
        time.sleep(1.0)
        assert not gone(pids["robot"]) and not gone(pids["server"]) and launcher.proc.poll() is None
    os.kill(pids["robot"], signal.SIGKILL)
    out = launcher.finish(timeout=60)
    assert launcher.proc.returncode == 1, out
    assert "robot exited unexpectedly (killed by SIGKILL): stopping everything" in out
    assert all(gone(pid) for pid in launcher.pids().values())


@pytest.mark.slow
@pytest.mark.parametrize("setting, said", [
    ("server.cache={other}", "{other}: not a polcache cache schedule"),  # a schedule file by name only
    ("server.cache=uniform:0", "cache 'uniform:0': uniform interval must be in 1..16"),
    ("server.instruction=hello", "server.instruction: this policy takes no instruction"),
])
def test_a_server_that_refuses_its_settings_is_one_error_and_nothing_is_left(tmp_path, setting, said):
    """Settings only the server can check against its policy (launch's own checks pass them): the
    server's refusal was buried in its log's tail and the error named no setting ("the server exited
    with status 2 before it was ready"); now that refusal is the one line, the option as its key."""
    other = tmp_path / "other.json"
    other.write_text("{}")
    launcher = Launcher(sim_overrides(tmp_path, setting.format(other=other), "dashboard.enabled=false"))
    out = launcher.finish()
    assert launcher.proc.returncode == 2, out
    assert f"polcache launch: error: the server refused its settings: {said.format(other=other)}" in out, out
    assert "server|" not in out and "robot started" not in out
    assert all(gone(pid) for pid in launcher.pids().values())


@pytest.mark.slow
def test_a_server_not_ready_in_time_is_stopped_with_its_logs_tail_shown(tmp_path):
    """Not a refusal: what the server said so far is shown, and nothing is left."""
    launcher = Launcher(sim_overrides(tmp_path, "server.ready_timeout_s=0.01", "dashboard.enabled=false"))
    out = launcher.finish()
    assert launcher.proc.returncode == 2, out
    assert re.search(r"polcache launch: error: the server did not answer .*", out), out
    assert "robot started" not in out
    assert all(gone(pid) for pid in launcher.pids().values())


def test_http_health_check_waits_for_an_answer_and_notices_an_exit(tmp_path):
    from polcache.launch.health import NotReady, wait_for_http

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_http(server, f"http://127.0.0.1:{port}/", timeout_s=30) < 30
    finally:
        server.kill()
        server.wait()
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(NotReady, match="the dashboard exited with status 3 before it was ready"):
        wait_for_http(dead, f"http://127.0.0.1:{free_port()}/", timeout_s=30)


def test_language_rtc_and_batching_options_reach_the_children(tmp_path):
    from polcache.launch.supervisor import robot_command, server_command

    cfg = load_launch_config(SIM, ["server.rtc=true", "server.max_batch=2", "server.instruction=open the door",
                                   "robot.blend=latest", "robot.instruction=open the door", "server.inline_ms=0",
                                   "robot.name=left arm"])
    serve = server_command(cfg, tmp_path)
    assert serve[-1] == "--rtc" and serve[serve.index("--max-batch") + 1] == "2"
    assert serve[serve.index("--inline-ms") + 1] == "0.0"
    assert serve[serve.index("--instruction") + 1] == "open the door"
    robot = robot_command(cfg, tmp_path, "door-open-v3")
    assert robot[robot.index("--blend") + 1] == "latest" and robot[robot.index("--instruction") + 1] == "open the door"
    assert robot[robot.index("--name") + 1] == "left arm"


def test_sim_loop_script_refuses_a_port_in_use_and_ends_when_its_server_dies(tmp_path):
    """launch/sim_loop.sh on a port another server held ran the robot against that server and reported
    its policy's success as the checkpoint's, exit 0; a server that died at start left the robot
    waiting out its 120 s connect timeout (an outside probe)."""
    script = [shutil.which("bash"), str(REPO / "launch" / "sim_loop.sh")]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run(script + [str(REPO / "polcache/assets/checkpoints/reach-v3"), "reach-v3", "50", "1"],
                             env={**os.environ, "PORT": str(port)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == (f"sim_loop: port {port} on 127.0.0.1 is already in use (another "
                                                  f"server?): set PORT\n")
    started = time.monotonic()
    run = subprocess.run(script + [str(tmp_path), "reach-v3", "50", "1"], cwd=REPO,
                         env={**os.environ, "PORT": str(free_port()), "MUJOCO_GL": "egl"}, capture_output=True,
                         text=True, timeout=100)
    assert run.returncode == 1, run.stderr
    assert "sim_loop: the server exited before the robot finished" in run.stderr
    assert time.monotonic() - started < 60
    run = subprocess.run(script + [str(tmp_path)], capture_output=True, text=True, timeout=60)  # no TASK to read
    assert run.returncode == 2 and run.stderr == f"sim_loop: {tmp_path}/meta.json: not readable (not a checkpoint?)\n"
