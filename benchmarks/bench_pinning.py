"""50 Hz control-loop period error under `polcache launch`, CPU placements side by side.

Each mode is one real `polcache launch configs/launch/sim.yaml` run (server, simulated robot
over ZeroMQ, the server computing chunks back to back because the robot sends an observation
every tick) with placement overrides; modes alternate round by round so that other work on the
machine falls on all of them alike. Period error is read from every tick the robot wrote to its
metrics file, minus the first --warmup seconds of each run.

    python benchmarks/bench_pinning.py [--episodes 20] [--rounds 2] [--modes unpinned,pinned,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_transport import free_port
from common import RESULTS, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "launch" / "sim.yaml"
LOOP_CPU, SERVER_CPU = 0, 1

# Overrides of configs/launch/sim.yaml per mode (the config itself is the "pinned + FIFO" mode).
MODES = {
    "unpinned": ["server.placement.cpus=[]", "robot.placement.cpus=[]", "robot.placement.fifo_priority=0",
                 "server.threads=1"],
    "unpinned 2 threads": ["server.placement.cpus=[]", "robot.placement.cpus=[]",
                                   "robot.placement.fifo_priority=0", "server.threads=2"],
    "pinned": [f"server.placement.cpus=[{SERVER_CPU}]", f"robot.placement.cpus=[{LOOP_CPU}]",
               "robot.placement.fifo_priority=0", "server.threads=0"],
    "pinned + SCHED_FIFO": [f"server.placement.cpus=[{SERVER_CPU}]", f"robot.placement.cpus=[{LOOP_CPU}]",
                            "robot.placement.fifo_priority=50", "server.threads=0"],
}


def launch_once(mode: str, episodes: int, run_dir: Path) -> tuple[Path, str]:
    """One `polcache launch` run; returns its run directory and its output."""
    cmd = [sys.executable, "-m", "polcache.cli", "launch", str(CONFIG), f"run_dir={run_dir}",
           f"robot.episodes={episodes}", "dashboard.enabled=false", f"server.bind=tcp://127.0.0.1:{free_port()}",
           *MODES[mode]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: polcache launch failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run,) = run_dir.iterdir()
    return run, proc.stdout


def tick_errors(run: Path, warmup_s: float) -> tuple[list[float], int]:
    """Period errors (ms) of the ticks after the warm-up, and the missed ticks among them."""
    ticks = [json.loads(line) for line in (run / "robot.jsonl").read_text().splitlines()]
    ticks = [t for t in ticks if t.get("kind") == "tick"]
    t0 = ticks[0]["t"]
    kept = [t for t in ticks if t["t"] - t0 >= warmup_s]
    return [t["period_error_ms"] for t in kept], sum(t["missed_ticks"] for t in kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20, help="episodes per run (reach-v3: about 1 s each)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, interleaved")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of each run left out")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--json", default=str(RESULTS / "pinning.json"))
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode {unknown[0]!r} (known: {', '.join(MODES)})")

    errors: dict[str, list[float]] = {m: [] for m in modes}
    missed = dict.fromkeys(modes, 0)
    successes: dict[str, list[int]] = {m: [0, 0] for m in modes}
    fifo_refused = dict.fromkeys(modes, False)
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-pinning-") as tmp:
        for r in range(args.rounds):
            for mode in modes:
                run_dir = Path(tmp) / f"{r}-{modes.index(mode)}"
                run, out = launch_once(mode, args.episodes, run_dir)
                errs, miss = tick_errors(run, args.warmup)
                errors[mode] += errs
                missed[mode] += miss
                result = json.loads((run / "robot.json").read_text())
                successes[mode][0] += result["successes"]
                successes[mode][1] += result["episodes"]
                fifo_refused[mode] |= "is not permitted" in out
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}/{args.rounds} {mode}: {len(errs)} ticks, p99 {np.percentile(errs, 99):.3f} ms",
                      flush=True)

    rows = []
    for mode in modes:
        e = np.asarray(errors[mode])
        ok, n = successes[mode]
        rows.append({"mode": mode + (" (refused: ordinary scheduling)" if fifo_refused[mode] else ""),
                     "ticks": len(e), "p50 ms": round(float(np.percentile(e, 50)), 3),
                     "p99 ms": round(float(np.percentile(e, 99)), 3), "max ms": round(float(e.max()), 2),
                     "late > 1 ms": int((e > 1.0).sum()), "missed ticks": missed[mode], "success": f"{ok}/{n}"})
    base = next((r["p99 ms"] for r in rows if r["mode"] == "unpinned"), None)
    for row in rows:
        row["p99 vs unpinned"] = f"{row['p99 ms'] / base:.2f}x" if base else "-"
    print(f"50 Hz loop, {args.episodes} reach-v3 episodes x {args.rounds} rounds per mode; loop CPU {LOOP_CPU}, "
          f"server CPU {SERVER_CPU} when pinned; load average during runs {min(loads):.1f}-{max(loads):.1f}")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "pinning", "episodes": args.episodes,
                           "rounds": args.rounds, "warmup_s": args.warmup, "modes": MODES, "rows": rows,
                           "load_average": loads})


if __name__ == "__main__":
    main()
