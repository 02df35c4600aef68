"""`polcache launch`: the policy server, the dashboard and (for simulation) the robot as child
processes, started in dependency order and stopped in the reverse of what matters for safety.

Start: server (pinned, its thread count matched to its CPUs) -> heartbeat answered -> dashboard
-> HTTP answered -> robot. Stop (Ctrl-C, SIGTERM, the robot finishing its episodes, or any child
dying): robot first (SIGINT after a Ctrl-C, else SIGTERM: its control loop safe-stops the robot and its
summary names the signal), then the server, then the
dashboard; each gets `stop_timeout_s` before SIGKILL. Children run in their own sessions, so a
terminal's Ctrl-C reaches only the launcher and the order holds; if the launcher itself is
killed, the kernel sends each child SIGTERM (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO

from polcache.errors import PolcacheError
from polcache.jsonfile import read_json_object
from polcache.launch.config import LaunchConfig, Placement, ServerLaunch, check_machine
from polcache.launch.health import NotReady, wait_for_http, wait_for_server
from polcache.launch.placement import child_setup, describe, placement_warning
from polcache.serve.address import interface_address, tcp_port
from polcache.signals import how_stopped, sigterm_as_interrupt
from polcache_client.signals import interrupt_signal, interrupted_status

POLCACHE = [sys.executable, "-m", "polcache.cli"]
STOP_ORDER = ("robot", "server", "dashboard")
LOG_TAIL_LINES = 10


def say(message: str) -> None:
    print(f"polcache launch: {message}", flush=True)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path | None  # None: output goes to the launcher's terminal


def server_threads(cfg: LaunchConfig) -> int:
    """Intra-op threads for the server: one per CPU it is pinned to, so its pool never spills
    onto the control loop's core (and never idles on its own)."""
    return cfg.server.threads or max(1, len(cfg.server.placement.cpus))


def connect_address(bind: str) -> str:
    """Where a local robot reaches a server bound to `bind` (a wildcard bind is reached on loopback,
    an interface's name at the interface's address)."""
    hostport = tcp_port(bind)
    if hostport is None:
        return bind
    host, port = hostport
    if host in ("0.0.0.0", "::"):
        return f"tcp://127.0.0.1:{port}"
    address = interface_address(host)
    return bind if address is None else f"tcp://{address}:{port}"


def robot_reach(server: ServerLaunch) -> str:
    """How a robot on another computer reaches the server: this computer's name for a wildcard bind
    (0.0.0.0 is no address to connect to), and which keys to copy to it where the server has some."""
    hostport = tcp_port(server.bind)
    address = server.bind
    if hostport is not None and hostport[0] in ("0.0.0.0", "::", "*"):
        address = f"tcp://{socket.gethostname()}:{hostport[1]}"
    keys = (f" with {Path(server.keys) / 'client.key_secret'} and {Path(server.keys) / 'server.key'} copied to it"
            if server.keys else "")
    return f"at {address}{keys}"


def checkpoint_policy(ckpt: Path) -> tuple[str, dict]:
    """The task and the per-step observation layout (key -> {shape, dtype}) a checkpoint (meta.json) or
    an exported artifact (manifest.json, its policy spec) names; ("", {}) where it names none."""
    if (ckpt / "meta.json").is_file():
        meta = read_json_object(ckpt / "meta.json")
        return meta.get("task") or "", meta.get("obs_spec") or {}
    if (ckpt / "manifest.json").is_file():
        spec = read_json_object(ckpt / "manifest.json").get("spec") or {}
        return spec.get("task") or "", spec.get("obs") or {}
    return "", {}


def robot_task(cfg: LaunchConfig) -> str:
    """robot.task, else the task the checkpoint (meta.json) or exported artifact (manifest.json) names."""
    if cfg.robot.task:
        return cfg.robot.task
    ckpt = Path(cfg.server.checkpoint)
    task, _ = checkpoint_policy(ckpt)
    if task:
        return task
    from polcache.policy.checkpoint import no_task_hint  # torch: only on this way out

    raise PolcacheError(f"robot.task: {ckpt} names no task; set robot.task{no_task_hint(ckpt)}")


def robot_cameras(cfg: LaunchConfig) -> tuple[list[str], int] | None:
    """The cameras (and their image side) the simulated robot renders for the policy: those its
    observations name (image_NAME), so an image policy is served its images; None for a state policy."""
    _, obs = checkpoint_policy(Path(cfg.server.checkpoint))
    images = {key.removeprefix("image_"): tuple(spec.get("shape") or ()) for key, spec in obs.items()
              if key.startswith("image_")}
    if not images:
        return None
    sides = {shape[0] if len(shape) == 3 and shape[0] == shape[1] and shape[2] == 3 else None
             for shape in images.values()}  # one square RGB side, or None for a shape it cannot render
    if len(sides) != 1 or None in sides:
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in images.items())
        raise PolcacheError(f"server.checkpoint: its cameras' images are {shapes}; the simulated robot renders "
                            f"square RGB images of one size: disable it (robot.enabled=false) and connect a robot "
                            f"of your own")
    return sorted(images), sides.pop()


def server_command(cfg: LaunchConfig, run: Path) -> list[str]:
    s = cfg.server
    cmd = POLCACHE + ["serve", "--checkpoint", s.checkpoint, "--bind", s.bind, "--device", s.device,
                      "--precision", s.precision, "--threads", str(server_threads(cfg)),
                      "--metrics-file", str(run / "server.jsonl"), "--max-batch", str(s.max_batch),
                      "--inline-ms", str(s.inline_ms)]
    for flag, value in (("--backend", s.backend), ("--cache", s.cache), ("--keys", s.keys),
                        ("--instruction", s.instruction), ("--verify-min-past", s.verify_min_past),
                        ("--metrics-port", s.metrics_port)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--verify", str(s.verify)] if s.verify > 1 else []
    return cmd + (["--insecure"] if s.insecure else []) + (["--rtc"] if s.rtc else [])


def robot_command(cfg: LaunchConfig, run: Path, task: str, cameras: tuple[list[str], int] | None = None) -> list[str]:
    """`cameras`: robot_cameras' names and image side, rendered for an image policy."""
    r = cfg.robot
    cmd = POLCACHE + ["sim-robot", "--task", task, "--hz", f"{r.hz:g}", "--episodes", str(r.episodes),
                      "--seed", str(r.seed), "--server", connect_address(cfg.server.bind),
                      "--metrics-file", str(run / "robot.jsonl"), "--json", str(run / "robot.json"),
                      "--blend", r.blend]
    cmd += ["--instruction", r.instruction] if r.instruction is not None else []
    cmd += ["--name", r.name] if r.name is not None else []
    cmd += ["--metrics-port", str(r.metrics_port)] if r.metrics_port is not None else []
    cmd += ["--cameras", ",".join(cameras[0]), "--image-size", str(cameras[1])] if cameras is not None else []
    return cmd + (["--keys", cfg.server.keys] if cfg.server.keys else [])


def dashboard_command(cfg: LaunchConfig, run: Path) -> list[str]:
    metrics = [run / "server.jsonl"] + ([run / "robot.jsonl"] if cfg.robot.enabled else [])
    return POLCACHE + ["dashboard", *[a for m in metrics for a in ("--metrics", str(m))], "--port", str(cfg.dashboard.port)]


class Launch:
    """The running children; `stop()` is safe to call at any point and more than once."""

    def __init__(self, cfg: LaunchConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.children: dict[str, Child] = {}

    def start(self, name: str, cmd: list[str], placement: Placement | None = None, to_log: bool = True) -> Child:
        placement = placement or Placement()
        log_path = self.run_dir / f"{name}.log" if to_log else None
        out: IO | None = open(log_path, "w") if log_path else None
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=child_setup(placement))
        finally:
            if out is not None:
                out.close()  # the child holds its own copy
        child = self.children[name] = Child(name, proc, log_path)
        where = f", log {log_path}" if log_path else ""
        warning = placement_warning(name, proc.pid, placement)  # the line says the scheduling it got, not asked for
        granted = placement if warning is None else replace(placement, fifo_priority=0)
        say(f"{name} started (pid {proc.pid}; {describe(granted)}{where})")
        if warning:
            say(warning)
        return child

    def tail(self, name: str) -> str:
        child = self.children[name]
        if child.log is None or not child.log.is_file():
            return ""
        lines = child.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(f"  {name}| {line}" for line in lines)

    def said(self, name: str, prefix: str) -> str | None:
        """The last line of a child's log that starts with `prefix`, if it wrote one."""
        child = self.children[name]
        if child.log is None or not child.log.is_file():
            return None
        lines = [line for line in child.log.read_text(errors="replace").splitlines() if line.startswith(prefix)]
        return lines[-1] if lines else None

    def refusal(self, name: str) -> str | None:
        """The one line a child that refused its options ended with ("polcache serve: error: ..."),
        a leading option named as the launch config's key (--cache: server.cache), if it did."""
        child = self.children[name]
        if child.proc.returncode != 2:  # 2: refused, not crashed
            return None
        said = self.said(name, f"polcache {child.proc.args[len(POLCACHE)]}: error: ")
        if said is None:
            return None
        why = said.split(": error: ", 1)[1]
        keys = {f.name for f in fields(ServerLaunch)} if name == "server" else set()
        return re.sub(r"^(?:argument )?--([a-z][a-z-]*)",
                      lambda m: f"{name}.{m[1].replace('-', '_')}" if m[1].replace("-", "_") in keys else m[0], why)

    def exited(self) -> Child | None:
        """A child that ended on its own, if any."""
        return next((c for c in self.children.values() if c.proc.poll() is not None), None)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the children in STOP_ORDER with `sig`: the one that stopped the launch (each child says
        so: the robot's summary names the Ctrl-C its user pressed), SIGTERM otherwise."""
        for name in STOP_ORDER:
            child = self.children.pop(name, None)
            if child is None:
                continue
            proc = child.proc
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=self.cfg.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    say(f"{name} did not stop within {self.cfg.stop_timeout_s:g} s after {sig.name}: killed")
                    continue
            code = proc.returncode
            say(f"{name} stopped ({f'exit status {code}' if code >= 0 else signal.Signals(-code).name})")


def dashboard_available() -> subprocess.Popen:
    """Ask (in the background) whether this polcache has a `dashboard` command; exit status 0 if so."""
    return subprocess.Popen(POLCACHE + ["dashboard", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def new_run_dir(cfg: LaunchConfig) -> Path:
    """A fresh directory per launch under `run_dir`, so the metrics files (which append) and the
    dashboard hold this run only, and earlier runs stay readable. A run_dir the checks pass but
    that cannot be created (/proc/nope, even for root) is refused naming the field."""
    run = Path(cfg.run_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        run.mkdir(parents=True)
    except OSError as exc:
        raise PolcacheError(f"run_dir {cfg.run_dir}: cannot create {run} ({exc.strerror or exc})") from None
    say(f"logs and metrics in {run}")
    return run


def run_launch(cfg: LaunchConfig) -> int:
    """Start everything, wait until the robot finishes (or, without a simulated robot, until
    Ctrl-C / SIGTERM), stop everything. Returns the exit status: the robot's when it finished its
    episodes, 130 when interrupted (143 for SIGTERM, 129 for SIGHUP), 1 when a child died; raises
    PolcacheError (the CLI's exit status 2) for a refused config or a child that exited before it was
    ready."""
    check_machine(cfg)
    task, cameras = (robot_task(cfg), robot_cameras(cfg)) if cfg.robot.enabled else ("", None)
    launch = Launch(cfg, new_run_dir(cfg))
    stop_with = signal.SIGTERM
    with sigterm_as_interrupt():  # SIGTERM stops everything, as Ctrl-C does
        try:
            return _supervise(cfg, launch, task, cameras)
        except KeyboardInterrupt as exc:
            say(f"{how_stopped(exc)}: stopping")
            stop_with = signal.SIGINT if interrupt_signal(exc) == signal.SIGINT else signal.SIGTERM
            return interrupted_status(exc)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the orderly stop short
                signal.signal(sig, signal.SIG_IGN)
            launch.stop(stop_with)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _supervise(cfg: LaunchConfig, launch: Launch, task: str, cameras: tuple[list[str], int] | None) -> int:
    probe = dashboard_available() if cfg.dashboard.enabled else None
    try:
        server = launch.start("server", server_command(cfg, launch.run_dir), cfg.server.placement)
        try:
            took = wait_for_server(server.proc, connect_address(cfg.server.bind), cfg.server.ready_timeout_s,
                                   cfg.server.keys)
        except NotReady as exc:
            if (why := launch.refusal("server")) is not None:  # a setting only the server could check: one line
                raise PolcacheError(f"the server refused its settings: {why}") from None
            print(launch.tail("server"), file=sys.stderr)
            raise PolcacheError(str(exc)) from None
        say(f"server {cfg.server.bind} answered a heartbeat after {took:.1f} s (checkpoint {cfg.server.checkpoint}, "
            f"{server_threads(cfg)} thread(s))")
        # what the server chose (device auto: which one; the backend, precision and cache plan), in its words
        say(f"server {launch.said('server', 'policy: ') or f'policy: device {cfg.server.device}'}")
        if cfg.server.metrics_port is not None:
            say(f"server Prometheus metrics http://127.0.0.1:{cfg.server.metrics_port}/metrics")
        has_dashboard = probe is not None and probe.wait() == 0
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
    if has_dashboard:
        dash = launch.start("dashboard", dashboard_command(cfg, launch.run_dir), cfg.dashboard.placement)
        url = f"http://127.0.0.1:{cfg.dashboard.port}/"
        try:
            wait_for_http(dash.proc, url, cfg.dashboard.ready_timeout_s)
        except NotReady as exc:
            print(launch.tail("dashboard"), file=sys.stderr)
            raise PolcacheError(str(exc)) from None
        say(f"dashboard {url}")
    elif cfg.dashboard.enabled:
        say("polcache has no dashboard command (it comes with the dashboard feature): running without the "
            "dashboard; set dashboard.enabled=false to silence this")
    if cfg.robot.enabled:
        r = cfg.robot
        seeing = "" if cameras is None else f", cameras {', '.join(cameras[0])} at {cameras[1]} px"
        scraped = "" if r.metrics_port is None else f", Prometheus metrics http://127.0.0.1:{r.metrics_port}/metrics"
        say(f"robot: {task} at {r.hz:g} Hz, {r.episodes} episode(s){seeing}{scraped}")
        launch.start("robot", robot_command(cfg, launch.run_dir, task, cameras), r.placement, to_log=False)
    else:
        say(f"running: a robot may connect now, {robot_reach(cfg.server)} (Ctrl-C or SIGTERM stops everything)")
    while True:
        ended = launch.exited()
        if ended is not None and ended.name == "dashboard":  # it only watches: a robot's run must not end with it
            print(launch.tail("dashboard"), file=sys.stderr)
            say(f"dashboard exited unexpectedly ({_ended(ended.proc.returncode)}): the server and robot go on "
                f"without it")
            del launch.children["dashboard"]
        elif ended is not None:
            break
        time.sleep(0.2)
    code = ended.proc.returncode
    if ended.name == "robot" and code >= 0:  # it finished its episodes (or refused something): its own status
        return code
    if ended.name != "robot":  # the robot's output is on this terminal already
        print(launch.tail(ended.name), file=sys.stderr)
    say(f"{ended.name} exited unexpectedly ({_ended(code)}): stopping everything")
    return 1


def _ended(code: int) -> str:
    """How a child ended: its exit status, or the signal that killed it (SIGKILL, an OOM kill, a crash:
    Popen's -N, which as the launch's own exit status had read as 256 - N)."""
    return f"status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
