"""What a robot sees after its policy server stood still: the process stopped (SIGSTOP here; swapped
out, starved of CPU on a robot computer) for a moment while the robot went on sending.

A robot sends a 96x96x3 image + state observation at `--hz` (50) to a PolicyServer whose policy
takes `--policy-ms` (30) per chunk of 8 actions; the server is stopped for `--stall-s` (0.5) at a
random phase, `--stalls` times, with a second of normal serving between. Per stall, from the
robot's side, after the server resumes:
- stale chunks: chunks that arrive with every action past due (the robot drops them): the
  inference under way at the stop (where one was), any other an inference spent on an observation
  from before the resume;
- first fresh (ms): from the resume to the first chunk not past due on arrival;
- answered age (ms): of the observations sent while the server stood still, how old the first one
  answered was when it resumed (a period or less: it took the newest; up to the stall's length:
  an older one of the backlog; nan: it answered none of them, only newer ones).
`--baseline-tree DIR` runs the same against the server of another checkout (e.g. `git worktree add
/tmp/before HEAD~5`), interleaved stall by stall, for a before/after in one run.

    python benchmarks/bench_stall.py [--stalls 8] [--stall-s 0.5] [--hz 50] [--policy-ms 30]
                                     [--baseline-tree DIR] [--json benchmarks/results/stall.json]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from common import RESULTS, print_table, write_json
from polcache_client.protocol import ActionChunk, Handshake, Observation, decode, encode

IMAGE, STATE_DIM, ACTIONS = (96, 96, 3), 39, 8
REPO = Path(__file__).resolve().parents[1]
SERVER = r"""
import sys, time
import numpy as np
from polcache.policy.spec import ArraySpec, PolicySpec, StatelessSession
from polcache.serve.server import PolicyServer

class Sleeper:  # a policy that takes a fixed time, as a real one on a given machine does
    def __init__(self, seconds):
        self.seconds = seconds
        self.spec = PolicySpec(obs={"image_front": ArraySpec((96, 96, 3), "uint8"), "state": ArraySpec((39,), "float32")},
                               action_dim=4, n_obs_steps=2, horizon=16, n_action_steps=8)
    def predict(self, obs, seed=None, past_actions=None):
        time.sleep(self.seconds)
        return np.zeros((1, 8, 4), np.float32)
    def session(self):
        return StatelessSession(self)

server = PolicyServer(Sleeper(float(sys.argv[1])), "tcp://127.0.0.1:0")
print(server.endpoint, flush=True)
server.serve_forever()
"""


class Robot:
    """Sends observations at `hz` on its own thread; keeps every chunk with its arrival time."""

    def __init__(self, endpoint: str, hz: float):
        self.hz, self.sent, self.chunks = hz, {}, []  # seq -> capture time; (arrival, chunk)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        spec = {"image_front": (IMAGE, "uint8"), "state": ((STATE_DIM,), "float32")}
        self.socket.send(encode(Handshake(obs_spec=spec, action_dim=4, hz=hz, name="bench")))
        if not self.socket.poll(30_000):
            raise RuntimeError(f"no welcome from {endpoint}")
        self.socket.recv()
        self.arrays = {"image_front": np.zeros(IMAGE, np.uint8), "state": np.zeros(STATE_DIM, np.float32)}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        period, seq, due = 1.0 / self.hz, 0, time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= due:
                with self.lock:
                    self.sent[seq] = now
                    self.socket.send(encode(Observation(epoch=0, seq=seq, t_capture=now, arrays=self.arrays)))
                seq, due = seq + 1, due + period
            with self.lock:
                while self.socket.poll(0):
                    msg = decode(self.socket.recv())
                    if isinstance(msg, ActionChunk):
                        self.chunks.append((time.monotonic(), msg))
            time.sleep(min(0.001, max(0.0, due - time.monotonic())))


def one_stall(server: subprocess.Popen, robot: Robot, stall_s: float, span_s: float) -> dict:
    """Stop the server for `stall_s`, then a second of serving: what the robot saw after the resume."""
    time.sleep(random.uniform(0.0, 1.0 / robot.hz))  # any phase of the robot's period
    stopped = time.monotonic()
    server.send_signal(signal.SIGSTOP)
    time.sleep(stall_s)
    with robot.lock:
        before = len(robot.chunks)
    resumed = time.monotonic()
    server.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    with robot.lock:
        after = robot.chunks[before:]
    stale = [c for t, c in after if t - c.t_capture > span_s]  # every action past due: dropped
    fresh = [t for t, c in after if t - c.t_capture <= span_s]
    backlog = [c.t_capture for _, c in after if stopped <= c.t_capture < resumed]  # sent while it stood still
    return {"stale_chunks": len(stale),
            "first_fresh_ms": round((fresh[0] - resumed) * 1e3, 1) if fresh else float("nan"),
            "answered_age_ms": round((resumed - backlog[0]) * 1e3, 1) if backlog else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stalls", type=int, default=8)
    parser.add_argument("--stall-s", type=float, default=0.5)
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--policy-ms", type=float, default=30.0)
    parser.add_argument("--baseline-tree", help="also run the server of this checkout, stall by stall (before/after)")
    parser.add_argument("--json", default=str(RESULTS / "stall.json"))
    args = parser.parse_args()
    trees = {"polcache": REPO, **({"baseline": Path(args.baseline_tree).resolve()} if args.baseline_tree else {})}
    span_s = (ACTIONS - 0.5) / args.hz  # the last action's due time and half a period: the robot's dropping rule
    servers, robots = {}, {}
    try:
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "client")])}
            servers[name] = subprocess.Popen([sys.executable, "-c", SERVER, str(args.policy_ms / 1e3)],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            robots[name] = Robot(servers[name].stdout.readline().strip(), args.hz)
        time.sleep(1.0)
        results = {name: [] for name in trees}
        for _ in range(args.stalls):  # interleaved, so a slow moment of the machine hits both alike
            for name in trees:
                results[name].append(one_stall(servers[name], robots[name], args.stall_s, span_s))
    finally:
        for robot in robots.values():
            robot.stop.set()
        for server in servers.values():
            server.send_signal(signal.SIGCONT)
            server.kill()
    rows = []
    for name, runs in results.items():
        for key in ("stale_chunks", "first_fresh_ms", "answered_age_ms"):
            values = np.array([r[key] for r in runs], float)
            rows.append({"server": name, "measure": key, "median": round(float(np.nanmedian(values)), 1),
                         "max": round(float(np.nanmax(values)), 1), "per_stall": " ".join(f"{v:g}" for v in values)})
    print(f"{args.stalls} stalls of {args.stall_s:g} s; robot at {args.hz:g} Hz (96x96x3 image + state), chunks of "
          f"{ACTIONS} actions, policy {args.policy_ms:g} ms")
    print_table(rows, ["server", "measure", "median", "max", "per_stall"])
    write_json(args.json, {"benchmark": "stall", "stalls": args.stalls, "stall_s": args.stall_s, "hz": args.hz,
                           "policy_ms": args.policy_ms, "rows": rows, "runs": results})


if __name__ == "__main__":
    main()
