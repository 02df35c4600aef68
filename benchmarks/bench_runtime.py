"""The robot runtime under load: a fixed-Hz loop on loopback against `polcache serve`.

The server runs the checkpoint in its own process (as deployed); this process runs the
simulated task as the robot through the real client and control loop, episode after episode,
for --seconds. Reports period error p50/p99 (target p99 <= 1 ms), missed ticks (the loop
itself ran over a period), deadline misses (ticks without a fresh action), observation-to-action
latency, server inference time, and the resident memory of both processes after warm-up and
at the end (soak target: growth under 5%).

    python benchmarks/bench_runtime.py [--checkpoint DIR] [--hz 50] [--seconds 60] [--json ...]
    python benchmarks/bench_runtime.py --soak            # 600 s at 50 Hz
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_transport import free_port
from common import RESULTS, print_table, write_json
from polcache.metrics import Metrics
from polcache.sim.robot import SimRobot
from polcache_client import ControlLoop, PolicyClient, use_realtime_priority

SHIPPED = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class MemorySampler(threading.Thread):
    """RSS of this process and the server every few seconds, off the control thread."""

    def __init__(self, server_pid: int, every_s: float = 5.0):
        super().__init__(daemon=True)
        self.server_pid, self.every_s = server_pid, every_s
        self.samples: list[tuple[float, float, float]] = []  # (t, robot MB, server MB)
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(self.every_s):
            self.samples.append((round(time.monotonic() - t0, 1), rss_mb(), rss_mb(self.server_pid)))


def run_episodes(loop: ControlLoop, robot: SimRobot, seconds: float, seed: list[int]) -> None:
    """Run episodes back to back for `seconds` of wall-clock time (the robot is not stopped between
    them: the next episode resets the simulation, so the safe stops counted are the watchdog's)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        robot.begin(seed[0])
        seed[0] += 1
        loop.reset_episode()
        loop.run(until=lambda: robot.done or time.monotonic() >= end, then_stop=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED), help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--task", help="task (default: the checkpoint's)")
    parser.add_argument("--cache", help="passed to polcache serve --cache")
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds excluded from the statistics")
    parser.add_argument("--soak", action="store_true", help="shorthand for --seconds 600")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--realtime", action="store_true", help="run the robot loop under SCHED_FIFO")
    parser.add_argument("--json", help="default benchmarks/results/runtime[_soak].json")
    args = parser.parse_args()
    seconds = 600.0 if args.soak else args.seconds
    out = args.json or str(RESULTS / ("runtime_soak.json" if args.soak else "runtime.json"))

    from polcache.envs import make_env

    task = args.task or json.loads((Path(args.checkpoint) / "meta.json").read_text())["task"]
    address = f"tcp://127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="polcache-serve-")
    command = [sys.executable, "-m", "polcache.cli", "serve", "--checkpoint", args.checkpoint, "--bind", address,
               "--threads", str(args.threads)] + (["--cache", args.cache] if args.cache else [])
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    env = make_env(task, seed=0)
    robot = SimRobot(env)
    sampler = MemorySampler(server.pid)
    try:
        with PolicyClient(address, robot.obs_spec, robot.action_dim, args.hz, name="bench") as client:
            client.connect(timeout_s=180)
            if args.realtime:
                use_realtime_priority()
            warm = Metrics()
            loop = ControlLoop(robot, client, args.hz, on_tick=warm.record, on_chunk=warm.record)
            seed = [1000]
            run_episodes(loop, robot, args.warmup, seed)
            metrics = Metrics(window=10**7)  # every tick of the measured run
            errors_ms: list[float] = []

            def on_tick(record) -> None:
                metrics.record(record)
                if record.ticks:  # not the loop's own safe stop (none here; on an exception, one)
                    errors_ms.append(record.period_error_ms)

            loop.on_tick, loop.on_chunk = on_tick, metrics.record
            rss_start = (rss_mb(), rss_mb(server.pid))
            sampler.start()
            run_episodes(loop, robot, seconds, seed)
            rss_end = (rss_mb(), rss_mb(server.pid))
    finally:
        sampler.stop.set()
        server.terminate()
        server.wait(timeout=30)
        env.close()
    if server.returncode not in (0, -15):
        log.seek(0)
        print(log.read()[-3000:])

    snap = metrics.snapshot()
    tick, chunk = snap["tick"], snap.get("chunk", {})
    err, lat, inf = tick["period_error_ms"], chunk.get("latency_ms", {}), chunk.get("inference_ms", {})
    growth = [100 * (e - s) / s for s, e in zip(rss_start, rss_end)]
    rows = [
        {"metric": "ticks", "value": int(tick["ticks"])},
        {"metric": "period error p50 / p99 / max (ms)", "value": f"{err['p50']:.3f} / {err['p99']:.3f} / {err['max']:.3f}"},
        {"metric": "ticks late by > 1 ms", "value": sum(e > 1.0 for e in errors_ms)},
        {"metric": "missed ticks (loop over a period)", "value": int(tick["missed_ticks"])},
        {"metric": "deadline misses (no fresh action)", "value": int(tick["deadline_miss"])},
        {"metric": "safe stops", "value": int(tick["safe_stops"])},
        {"metric": "obs-to-action latency p50 / p99 (ms)", "value": f"{lat.get('p50', float('nan')):.1f} / {lat.get('p99', float('nan')):.1f}"},
        {"metric": "server inference p50 / p99 (ms)", "value": f"{inf.get('p50', float('nan')):.1f} / {inf.get('p99', float('nan')):.1f}"},
        {"metric": "chunks / dropped actions", "value": f"{int(chunk.get('chunks', 0))} / {int(chunk.get('dropped_actions', 0))}"},
        {"metric": "episodes", "value": seed[0] - 1000},
        {"metric": "RSS robot MB start -> end (growth %)", "value": f"{rss_start[0]:.1f} -> {rss_end[0]:.1f} ({growth[0]:+.2f}%)"},
        {"metric": "RSS server MB start -> end (growth %)", "value": f"{rss_start[1]:.1f} -> {rss_end[1]:.1f} ({growth[1]:+.2f}%)"},
    ]
    print(f"{task} at {args.hz:g} Hz for {seconds:g} s on loopback, checkpoint {args.checkpoint}, "
          f"{'SCHED_FIFO' if args.realtime else 'default scheduling'}")
    print_table(rows, ["metric", "value"])
    write_json(out, {"benchmark": "runtime", "task": task, "hz": args.hz, "seconds": seconds, "checkpoint": args.checkpoint,
                     "cache": args.cache, "realtime": args.realtime, "tick": tick, "chunk": chunk, "rss_mb": {"start": rss_start, "end": rss_end},
                     "rss_growth_pct": growth, "rss_samples": sampler.samples, "late_ticks_over_1ms": rows[2]["value"]})


if __name__ == "__main__":
    main()
