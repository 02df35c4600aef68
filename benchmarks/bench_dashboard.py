"""Does observability cost the control loop? Two measurements, side by side in one run:

1. Recording: microseconds per tick record through `Metrics.record` (window summaries +
   Prometheus histograms/counters, what `serve` and `sim-robot` do every tick) and through
   the Prometheus part alone, and one scrape of the exposition, against a 50 Hz period.
2. Attached dashboard: one `polcache serve` (shipped reach-v3 checkpoint) and `sim-robot`
   runs at --hz (after one warm-up run), alternating without and with `polcache dashboard` following both metrics
   files and a page polling /data.json every second (what an open browser tab does);
   period error and observation-to-action latency from the robot's own figures, and the
   dashboard process's CPU use once started (percent of one core). Each arm reports its median
   run. Also the cost of computing every view.

    python benchmarks/bench_dashboard.py [--recording-only] [--rounds 2] [--episodes 5] [--hz 50] [--realtime] [--json benchmarks/results/dashboard.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import RESULTS, free_port, print_table, round_robin, write_json
from polcache.dashboard import RunState
from polcache.metrics import JsonlWriter, Metrics
from polcache.metrics.prometheus import PrometheusRecorder
from polcache.serve.records import RequestRecord
from polcache_client.records import TickRecord
from prometheus_client import CollectorRegistry, generate_latest

CHECKPOINT = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"
POLCACHE = [sys.executable, "-m", "polcache.cli"]


def recording_cost(calls: int) -> list[dict]:
    """Microseconds on the recording thread per record: a robot's tick, a server's request (also
    with the JSON-lines file of `--metrics-file`: the caller's share, the line is written on the
    file's own thread), the Prometheus part alone, and one scrape."""
    tick = TickRecord(t=1.0, epoch=0, seq=1, period_error_ms=0.02, state="fresh", queue_depth=5)
    request = RequestRecord(t=1.0, robot="bench", epoch=0, seq=1, decode_ms=0.01, preprocess_ms=0.01, queue_ms=0.01,
                            inference_ms=5.0, postprocess_ms=0.01, encode_ms=0.01, total_ms=5.1, queue_depth=1)
    metrics = Metrics(robot="bench")
    recorder = PrometheusRecorder(CollectorRegistry(), robot="bench")
    with tempfile.TemporaryDirectory() as tmp:
        writer = JsonlWriter(Path(tmp) / "metrics.jsonl", queue_size=4 * calls)
        with_file = Metrics(sink=writer)
        times = round_robin({"Metrics.record: tick (summaries + Prometheus)": lambda: metrics.record(tick),
                             "Metrics.record: request": lambda: metrics.record(request),
                             "Metrics.record: request, JSON-lines file too": lambda: with_file.record(request),
                             "Prometheus part alone: request": lambda: recorder.record(request),
                             "scrape: exposition text": lambda: generate_latest(metrics.registry)},
                            calls, warmup=100)
        writer.close()
    period_us = 1e6 / 50
    return [{"what": name, "median_us": round(float(np.median(t)) * 1e6, 2),
             "p99_us": round(float(np.percentile(t, 99)) * 1e6, 2),
             "share_of_50Hz_period": f"{float(np.median(t)) * 1e6 / period_us:.4%}"} for name, t in times.items()]


def poll_page(url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            urllib.request.urlopen(url + "data.json", timeout=5).read()
        except OSError:
            pass
        stop.wait(1.0)


def robot_run(address: str, hz: float, episodes: int, out: Path, dashboard: bool, server_file: Path,
              realtime: bool = False) -> dict:
    robot_file, result = out / "robot.jsonl", out / "robot.json"
    for path in (robot_file, result):
        path.unlink(missing_ok=True)
    dash, stop, poller, cpu_share = None, threading.Event(), None, 0.0
    if dashboard:
        dash = subprocess.Popen([*POLCACHE, "dashboard", "--metrics", str(server_file), "--metrics", str(robot_file),
                                 "--port", "0"], stdout=subprocess.PIPE, text=True)
        url = re.search(r"(http://\S+)", dash.stdout.readline()).group(1)
        started, cpu_at_start = time.monotonic(), cpu_seconds(dash.pid)  # steady state: imports are done
        poller = threading.Thread(target=poll_page, args=(url, stop), daemon=True)
        poller.start()
    try:
        subprocess.run([*POLCACHE, "sim-robot", "--task", "reach-v3", "--hz", str(hz), "--episodes", str(episodes),
                        "--server", address, "--connect-timeout", "120", "--metrics-file", str(robot_file),
                        "--json", str(result), *(["--realtime"] if realtime else [])], check=True, capture_output=True)
    finally:
        stop.set()
        if dash is not None:
            cpu_share = (cpu_seconds(dash.pid) - cpu_at_start) / (time.monotonic() - started)
            dash.terminate()
            dash.wait(timeout=10)
    r = json.loads(result.read_text())
    err = r["extra"]["tick"]["period_error_ms"]
    return {"period_error_p50_ms": err["p50"], "period_error_p99_ms": err["p99"],
            "latency_p50_ms": r["latency_ms"]["p50"], "latency_p99_ms": r["latency_ms"]["p99"],
            "deadline_miss": r["extra"]["tick"].get("deadline_miss", 0), "ticks": r["extra"]["tick"]["ticks"],
            "dashboard_cpu_pct": 100 * cpu_share}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def views_cost(calls: int) -> dict:
    """Milliseconds to compute every view (one page poll) over a full live window: 20,000 ticks,
    2,500 chunks and 2,500 requests of one robot."""
    state = RunState()
    ticks = [{"kind": "tick", "t": 100 + i / 50, "robot": "r", "period_error_ms": 0.01, "queue_depth": 4, "ticks": 1,
              "deadline_miss": False, "safe_stops": 0, "missed_ticks": 0, "obs_dropped": 0} for i in range(20000)]
    chunks = [{"kind": "chunk", "t": 100 + i / 6.25, "robot": "r", "latency_ms": 20.0, "inference_ms": 9.0,
               "server_ms": 10.0, "dropped_actions": 1, "stale_chunks": 0} for i in range(2500)]
    requests = [{"kind": "request", "t": 100 + i / 6.25, "robot": "r", "inference_ms": 9.0, "decode_ms": 0.1,
                 "superseded": 0, "deadline_miss": False} for i in range(2500)]
    state.add(ticks + chunks + requests, {"offset": 0.0})
    state.views()
    t0 = time.perf_counter()
    for _ in range(calls):
        state.views()
    return {"what": "views() over a full window (one page poll)",
            "median_us": round((time.perf_counter() - t0) / calls * 1e6, 1)}


def attached_cost(rounds: int, episodes: int, hz: float, realtime: bool) -> tuple[list[dict], dict]:
    address = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        server_file = out / "server.jsonl"
        server = subprocess.Popen([*POLCACHE, "serve", "--checkpoint", str(CHECKPOINT), "--bind", address,
                                   "--metrics-file", str(server_file)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        runs = {False: [], True: []}
        try:
            robot_run(address, hz, 1, out, False, server_file)  # warm-up: the server loads while the robot waits
            for i in range(rounds):
                for attached in ((False, True) if i % 2 == 0 else (True, False)):  # alternate who goes first
                    runs[attached].append(robot_run(address, hz, episodes, out, attached, server_file, realtime))
                    print(f"  {'with' if attached else 'without'} dashboard: {runs[attached][-1]}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
    rows = []  # the median run of each arm: one disturbed run on a shared machine must not decide
    for attached, results in runs.items():
        row = {"dashboard": "attached" if attached else "none", "runs": len(results)}
        for key in results[0]:
            row[key] = round(float(np.median([r[key] for r in results])), 3)
        rows.append(row)
    return rows, {"none": runs[False], "attached": runs[True]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--realtime", action="store_true", help="run the robot loop under SCHED_FIFO (sim-robot --realtime)")
    parser.add_argument("--recording-only", action="store_true", help="only the recording costs (no robot runs)")
    parser.add_argument("--json", default=str(RESULTS / "dashboard.json"))
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")

    recording = recording_cost(args.calls) + [views_cost(20)]
    print_table(recording, ["what", "median_us", "p99_us", "share_of_50Hz_period"])
    if args.recording_only:
        write_json(args.json, {"args": vars(args), "recording": recording})
        return
    attached, per_run = attached_cost(args.rounds, args.episodes, args.hz, args.realtime)
    columns = ["dashboard", "runs", "period_error_p50_ms", "period_error_p99_ms", "latency_p50_ms", "latency_p99_ms",
               "deadline_miss", "ticks", "dashboard_cpu_pct"]
    print_table(attached, columns)
    base, dash = attached
    ratios = {k: round(dash[k] / base[k], 3) if base[k] else None for k in columns[2:6]}
    print("attached / none:", ratios)
    write_json(args.json, {"args": vars(args), "recording": recording, "attached": attached, "ratios": ratios,
                           "runs": per_run})


if __name__ == "__main__":
    main()
