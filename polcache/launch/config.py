"""What `polcache launch` starts, as a strict YAML config (configs/launch/*.yaml).

Two stages of checking, so a config written for another machine (a Jetson's CPU list, a
workstation's key directory) can still be read and tested anywhere: `load_launch_config` checks
the file alone (unknown keys by dotted path, types, ranges, addresses); `check_machine` checks it
against this machine (checkpoint, device, CPUs, free ports) right before anything starts."""

from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from polcache.cache.errors import CacheError
from polcache.cache.spec import parse_cache_spec
from polcache.config import MAX_SEED, apply_overrides, from_dict, located, read_yaml_mapping
from polcache.errors import ConfigError, PolcacheError
from polcache.outputs import check_output
from polcache.serve.address import interface_address, tcp_port
from polcache.serve.handshake import own_robot_name
from polcache.policy.loader import BACKENDS, MAX_CANDIDATES, PRECISIONS
from polcache.serve.server import (DEFAULT_BIND, DEFAULT_INLINE_MS, DEFAULT_MAX_BATCH, DEFAULT_MAX_SESSIONS,
                                   MAX_INLINE_MS)
from polcache_client.protocol import MAX_HZ, MIN_HZ, ProtocolError, instruction_bytes
from polcache_client.schedule import BLEND_MODES

DEVICE_PATTERN = re.compile(r"cpu|auto|cuda(:\d+)?")
FIFO_PRIORITIES = range(0, 100)  # 0: ordinary scheduling; 1..99: SCHED_FIFO with that priority


@dataclass
class Placement:
    """Where a process runs: `cpus` it may use (empty: wherever the launcher may) and its
    SCHED_FIFO priority (0: ordinary scheduling)."""

    cpus: list[int] = field(default_factory=list)
    fifo_priority: int = 0


@dataclass
class ServerLaunch:
    checkpoint: str = "polcache/assets/checkpoints/reach-v3"
    bind: str = DEFAULT_BIND
    backend: str | None = None  # torch | ort | trt; None: serve's default for the checkpoint
    device: str = "cpu"
    precision: str = "fp32"
    cache: str | None = None
    threads: int = 0  # torch / ONNX Runtime threads; 0: one per CPU in `placement.cpus` (1 when unpinned)
    keys: str | None = None  # CurveZMQ key directory (needed for a non-loopback bind)
    insecure: bool = False
    max_batch: int = DEFAULT_MAX_BATCH  # robots whose waiting observations share one inference
    inline_ms: float = DEFAULT_INLINE_MS  # inference faster than this runs on the server thread (`serve --inline-ms`)
    rtc: bool = False  # real-time chunking (flow samplers; robots then run robot.blend: latest)
    verify: int = 1  # self-verification's candidate chunks (`serve --verify`, Past-Token Prediction policies); 1: off
    verify_min_past: int | None = None  # past steps executed before candidates are scored (None: all trained ones)
    instruction: str | None = None  # language-conditioned policies: the default for robots that send none
    ready_timeout_s: float = 180.0  # checkpoint loading and warm-up (CUDA graphs, TensorRT engines) may be slow
    metrics_port: int | None = None  # a Prometheus endpoint on 127.0.0.1 (`serve --metrics-port`); None: none
    placement: Placement = field(default_factory=Placement)


@dataclass
class RobotLaunch:
    """The simulated robot (`polcache sim-robot`); disabled where a real robot connects."""

    enabled: bool = True
    task: str = ""  # "": the checkpoint's task
    hz: float = 50.0
    episodes: int = 10
    seed: int = 1000
    blend: str = "ensemble"  # ensemble | latest: how overlapping chunks are executed
    instruction: str | None = None  # None: the task's held-out paraphrases (language-conditioned policies)
    name: str | None = None  # what it calls itself at the server (None: "sim-robot TASK")
    metrics_port: int | None = None  # a Prometheus endpoint on 127.0.0.1 (`sim-robot --metrics-port`); None: none
    placement: Placement = field(default_factory=Placement)


@dataclass
class DashboardLaunch:
    enabled: bool = True
    port: int = 8050
    ready_timeout_s: float = 30.0
    placement: Placement = field(default_factory=Placement)  # keep it off the control loop's core


@dataclass
class LaunchConfig:
    run_dir: str = "runs/launch"  # each launch writes logs, metrics and the robot's result into a fresh subdirectory
    stop_timeout_s: float = 10.0  # per process, after SIGTERM, before SIGKILL
    server: ServerLaunch = field(default_factory=ServerLaunch)
    robot: RobotLaunch = field(default_factory=RobotLaunch)
    dashboard: DashboardLaunch = field(default_factory=DashboardLaunch)


def load_launch_config(path: str | Path, overrides: list[str] | None = None) -> LaunchConfig:
    """Read and check a launch config file, with `a.b=value` overrides (unknown keys refused)."""
    try:
        cfg = from_dict(LaunchConfig, apply_overrides(read_yaml_mapping(path), overrides or [], "robot.episodes=50"))
    except ConfigError as exc:
        raise located(exc, path, overrides or []) from None
    validate(cfg)
    return cfg


def _check_port(name: str, port: int) -> None:
    """A fixed port: launch prints each address for the browser or the Prometheus scrape config (0, a
    free port as serve and sim-robot take one, would be known only to the process that took it)."""
    if not 1 <= port <= 65535:
        zero = " (launch needs fixed ports: it prints each address; the commands run alone take 0)" if port == 0 else ""
        raise ConfigError(f"{name}: expected a port in 1..65535, got {port}{zero}")


def _check_placement(name: str, placement: Placement) -> None:
    if any(c < 0 for c in placement.cpus) or len(set(placement.cpus)) != len(placement.cpus):
        raise ConfigError(f"{name}.placement.cpus: expected distinct CPU numbers >= 0, got {placement.cpus}")
    if placement.fifo_priority not in FIFO_PRIORITIES:
        raise ConfigError(f"{name}.placement.fifo_priority: expected 0 (ordinary scheduling) or a SCHED_FIFO "
                          f"priority 1..99, got {placement.fifo_priority}")


def validate(cfg: LaunchConfig) -> None:
    """Checks that need nothing but the config."""
    s, r, d = cfg.server, cfg.robot, cfg.dashboard
    address = tcp_port(s.bind, "server.bind", ConfigError)
    if address is not None:
        _check_port("server.bind", address[1])
    if not DEVICE_PATTERN.fullmatch(s.device):
        raise ConfigError(f"server.device: expected cpu, cuda, cuda:N or auto, got {s.device!r}")
    if s.backend is not None and s.backend not in BACKENDS:
        raise ConfigError(f"server.backend: expected {', '.join(BACKENDS)} (or null), got {s.backend!r}")
    if s.precision not in PRECISIONS:
        raise ConfigError(f"server.precision: expected {', '.join(PRECISIONS)}, got {s.precision!r}")
    if not 0 <= s.threads <= (os.cpu_count() or 1):
        raise ConfigError(f"server.threads: expected 0 (one per pinned CPU) to {os.cpu_count() or 1} (this machine's "
                          f"CPUs), got {s.threads}")
    for name, value in (("server.ready_timeout_s", s.ready_timeout_s), ("dashboard.ready_timeout_s", d.ready_timeout_s),
                        ("stop_timeout_s", cfg.stop_timeout_s)):
        if not value > 0:
            raise ConfigError(f"{name}: expected a positive number, got {value}")
    if not MIN_HZ <= r.hz <= MAX_HZ:  # the protocol's range: sim-robot would refuse it after the server started
        raise ConfigError(f"robot.hz: expected a rate in [{MIN_HZ:g}, {MAX_HZ:g}] Hz, got {r.hz}")
    if r.episodes < 1:
        raise ConfigError(f"robot.episodes: expected a positive integer, got {r.episodes}")
    if not 0 <= r.seed <= MAX_SEED:  # sim-robot would refuse it only after the server started
        raise ConfigError(f"robot.seed: expected a seed in 0..2^63-1, got {r.seed}")
    if not 1 <= s.max_batch <= DEFAULT_MAX_SESSIONS:
        raise ConfigError(f"server.max_batch: expected a batch size in 1..{DEFAULT_MAX_SESSIONS} (the most robots a "
                          f"server serves at once), got {s.max_batch}")
    if not 1 <= s.verify <= MAX_CANDIDATES:
        raise ConfigError(f"server.verify: expected 1 (off) to {MAX_CANDIDATES} candidate chunks, got {s.verify}")
    if s.verify_min_past is not None and (s.verify == 1 or s.verify_min_past < 1):
        raise ConfigError(f"server.verify_min_past: expected a positive number of past steps, with server.verify >= "
                          f"2, got {s.verify_min_past} with server.verify {s.verify}")
    if s.cache is not None:  # the grammar and the schedule file; whether it fits the model, the server checks
        try:
            spec = parse_cache_spec(s.cache)
        except CacheError as exc:
            raise ConfigError(f"server.cache: {exc}") from None
        if spec.path is not None and Path(spec.path).is_dir():
            raise ConfigError(f"server.cache: schedule file {spec.path} is a folder")
        if spec.path is not None and not Path(spec.path).is_file():
            raise ConfigError(f"server.cache: schedule file not found: {spec.path}")
    if not 0 <= s.inline_ms <= MAX_INLINE_MS:
        raise ConfigError(f"server.inline_ms: expected 0 to {MAX_INLINE_MS:g} ms, got {s.inline_ms}")
    for name, text in (("server.instruction", s.instruction), ("robot.instruction", r.instruction)):
        if text is not None:  # the policy's own limit (often fewer bytes) the server checks as it starts
            try:
                instruction_bytes(text, field=name)  # the protocol's limit, 1024 bytes
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from None
    if r.name is not None:
        try:
            own_robot_name(r.name, "robot.name")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
    if r.blend not in BLEND_MODES:
        raise ConfigError(f"robot.blend: expected {' or '.join(BLEND_MODES)}, got {r.blend!r}")
    _check_port("dashboard.port", d.port)
    ports = {"server.bind": address[1] if address is not None else None,
             "dashboard.port": d.port if d.enabled else None, "server.metrics_port": s.metrics_port,
             "robot.metrics_port": r.metrics_port if r.enabled else None}
    for name in ("server.metrics_port", "robot.metrics_port"):
        if ports[name] is not None:
            _check_port(name, ports[name])
    taken: dict[int, str] = {}
    for name, port in ports.items():  # two of them on one port: the second to bind fails
        if port is not None and port in taken:
            raise ConfigError(f"{name}: {port} is {taken[port]}'s port too; give them different ports")
        if port is not None:
            taken[port] = name
    _check_placement("server", s.placement)
    _check_placement("robot", r.placement)
    _check_placement("dashboard", d.placement)
    if not cfg.run_dir:
        raise ConfigError("run_dir: expected a directory for logs and metrics, got ''")


def _check_port_free(name: str, host: str, port: int) -> None:
    """Refuse a port another socket holds. The probe binds as the server and the dashboard will
    (both set SO_REUSEADDR), so the closed connections a stopped run leaves in TIME_WAIT for a
    minute do not block launching again; a socket still listening there does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise PolcacheError(f"{name}: cannot resolve host {host!r}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                shown = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets, as ZeroMQ takes it
                other = f"{name}=tcp://{shown}:OTHER" if name == "server.bind" else f"{name}=OTHER"
                raise PolcacheError(f"{name}: port {port} on {host} is already in use (`ss -ltnp 'sport = :{port}'` "
                                    f"names the program, maybe a launch still running; or give {other})") from None
            raise PolcacheError(f"{name}: cannot bind {host}:{port} here ({exc.strerror})") from None


def check_machine(cfg: LaunchConfig) -> None:
    """Checks against this machine, before anything starts: the checkpoint exists, the device
    is there, the CPUs may be used, the ports are free. Raises PolcacheError naming the field."""
    s = cfg.server
    check_output(cfg.run_dir, "a folder for launch runs", folder=True, ours=lambda _: True, flag="run_dir",
                 error=PolcacheError)
    if cfg.robot.enabled and cfg.robot.task:
        from polcache.envs import check_task

        try:
            check_task(cfg.robot.task)
        except PolcacheError as exc:
            raise PolcacheError(f"robot.task: {exc}") from None
    if not Path(s.checkpoint).is_dir():
        raise PolcacheError(f"server.checkpoint: {s.checkpoint} is not a directory (a checkpoint or an exported "
                            f"artifact; paths are relative to {os.getcwd()})")
    if not any((Path(s.checkpoint) / name).is_file() for name in ("meta.json", "manifest.json")):
        raise PolcacheError(f"server.checkpoint: {s.checkpoint} is neither a checkpoint (no meta.json) nor an exported "
                            "policy (no manifest.json)")
    if s.keys is not None and not Path(s.keys).is_dir():
        raise PolcacheError(f"server.keys: {s.keys} is not a directory (create it with `polcache keys --dir {s.keys}`)")
    if s.device != "cpu":
        from polcache.policy.device import resolve_device  # imports torch: only where a GPU is asked for

        resolve_device(s.device, "server.device")
    allowed = os.sched_getaffinity(0)
    for name, placement in (("server", s.placement), ("robot", cfg.robot.placement),
                            ("dashboard", cfg.dashboard.placement)):
        missing = sorted(set(placement.cpus) - allowed)
        if missing:
            raise PolcacheError(f"{name}.placement.cpus: CPU {missing[0]} is not available here "
                                f"(this process may use CPUs {sorted(allowed)})")
    address = tcp_port(s.bind, "server.bind", ConfigError)
    if address is not None:  # an interface's name (tcp://eth0:PORT, as serve takes it) is checked at its address
        host, port = address
        _check_port_free("server.bind", interface_address(host) or host, port)
    if cfg.dashboard.enabled:
        _check_port_free("dashboard.port", "127.0.0.1", cfg.dashboard.port)
    for name, port in (("server.metrics_port", s.metrics_port),
                       ("robot.metrics_port", cfg.robot.metrics_port if cfg.robot.enabled else None)):
        if port is not None:
            _check_port_free(name, "127.0.0.1", port)
