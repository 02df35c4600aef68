"""How long a policy server takes to notice a robot whose link was cut (power or cable lost): the
time from cutting the link to the server's "disconnected" log line.

The server runs in this process, in a network namespace of its own; the robot (a protocol peer
that shook hands, then waits or keeps sending at --hz) runs in a second namespace, joined to the
first by a veth pair. Setting the server's end of the pair down cuts the link with both ends still
open, as a pulled cable does: nothing says goodbye, only the kernel's TCP timers can tell. Needs
root (or unprivileged user namespaces) for `unshare -n`, and `ip` (iproute2); run it as

    unshare -n python benchmarks/bench_dead_peer.py [--trials 3] [--json benchmarks/results/dead_peer.json]

Two cases per trial: an idle robot (no traffic when the link goes: TCP keepalive finds it) and one
sending observations at --hz (its replies are then unacknowledged: TCP_USER_TIMEOUT finds it). Each
also with ZeroMQ's heartbeats (1 s, 3 s timeout) in place of the kernel's timers, as the server had
them until they were found to abort it (polcache/serve/server.py, DEAD_PEER_MS): the same server
with that one socket option set swapped.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # FakeBackend, RawPeer

from common import RESULTS, print_table, write_json

SERVER_IP, ROBOT_IP, PORT = "10.9.0.1", "10.9.0.2", 7777
KERNEL_TIMERS = None  # the server's own socket options, kept while a trial swaps them

ROBOT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from fakes import RawPeer, observation
input()  # the link is up
peer = RawPeer("tcp://%s:%d")
peer.handshake(name="arm")
print("ready", flush=True)
hz, seq = float(sys.argv[2]), 0
while True:
    if hz:
        seq += 1
        peer.send(observation(seq))
    time.sleep(1 / hz if hz else 1.0)
""" % (SERVER_IP, PORT)


class _Disconnects(logging.Handler):
    def __init__(self):
        super().__init__()
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "disconnected" in record.getMessage():
            self.at.append(time.monotonic())


def _sh(*args: str) -> None:
    subprocess.run(args, check=True)


def one_trial(hz: float, log: _Disconnects, timeout_s: float, heartbeats: bool) -> float:
    """Seconds from cutting the link to the disconnect logged (NaN: not within timeout_s)."""
    import zmq

    from fakes import FakeBackend
    from polcache.serve import server as server_module
    from polcache.serve.server import PolicyServer

    server_module._DEAD_PEER_OPTIONS = (((zmq.HEARTBEAT_IVL, 1000), (zmq.HEARTBEAT_TIMEOUT, 3000)) if heartbeats
                                    else KERNEL_TIMERS)

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    robot = subprocess.Popen(["unshare", "-n", sys.executable, "-c", ROBOT, tests, str(hz)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # its namespace exists
        _sh("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        _sh("ip", "link", "set", "veth1", "netns", str(robot.pid))
        _sh("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "veth0")
        _sh("ip", "link", "set", "veth0", "up")
        for cmd in (["ip", "addr", "add", f"{ROBOT_IP}/24", "dev", "veth1"], ["ip", "link", "set", "veth1", "up"],
                    ["ip", "link", "set", "lo", "up"]):
            _sh("nsenter", "-t", str(robot.pid), "-n", *cmd)
        with PolicyServer(FakeBackend(), f"tcp://{SERVER_IP}:{PORT}", insecure=True):
            robot.stdin.write("go\n")
            robot.stdin.flush()
            assert robot.stdout.readline() == "ready\n"
            time.sleep(1.0)
            log.at.clear()
            _sh("ip", "link", "set", "veth0", "down")  # the cable pulled
            cut = time.monotonic()
            while not log.at and time.monotonic() - cut < timeout_s:
                time.sleep(0.02)
            return log.at[0] - cut if log.at else float("nan")
    finally:
        robot.kill()
        robot.wait()
        subprocess.run(["ip", "link", "del", "veth0"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--hz", type=float, default=50.0, help="the sending robot's rate")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the disconnect")
    ap.add_argument("--json", default=str(RESULTS / "dead_peer.json"))
    args = ap.parse_args()
    global KERNEL_TIMERS
    from polcache.serve import server as server_module

    KERNEL_TIMERS = server_module._DEAD_PEER_OPTIONS
    _sh("ip", "link", "set", "lo", "up")
    log = _Disconnects()
    logging.getLogger("polcache.serve").addHandler(log)
    logging.getLogger("polcache.serve").setLevel(logging.INFO)
    rows = []
    for case, hz in (("idle robot", 0.0), (f"robot sending at {args.hz:g} Hz", args.hz)):
        for timers, heartbeats in (("kernel (TCP keepalive, TCP_USER_TIMEOUT)", False),
                                   ("ZeroMQ heartbeats (before)", True)):
            seconds = [one_trial(hz, log, args.timeout, heartbeats) for _ in range(args.trials)]
            rows.append({"case": case, "found by": timers, "trials": args.trials,
                         "median_s": round(float(np.nanmedian(seconds)), 2), "max_s": round(float(np.nanmax(seconds)), 2),
                         "missed": int(np.isnan(seconds).sum())})
    print("a robot's link cut (veth down): seconds until the server logs its disconnect")
    print_table(rows, ["case", "found by", "trials", "median_s", "max_s", "missed"])
    write_json(args.json, {"benchmark": "dead-peer", "rows": rows})


if __name__ == "__main__":
    main()
