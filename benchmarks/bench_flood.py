"""Robots beside a flooding peer: does each still get its actions on time?

A `polcache serve` of the shipped reach-v3 checkpoint (its own process), --robots robots (each its
own process, a raw protocol peer sending an observation every tick at --hz) and, in turn, one
more process beside them:

- none: nothing (the baseline);
- burn: a process spinning on the CPU, no network (the control: a flooder costs at least this);
- flood: a peer that shook hands, sending valid observations as fast as it can;
- garbage: a peer without a handshake sending random bytes and multipart frames as fast as it can.

Per case, over the robots: the share of ticks at which a received action was still due (1.0: the
robot never ran dry), and the longest time between two chunks.

    python benchmarks/bench_flood.py [--robots 3] [--hz 50] [--seconds 10] [--cases none,burn,flood,garbage]
                                     [--json ...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from common import RESULTS, free_port, print_table, write_json
from polcache_client.protocol import ActionChunk, Handshake, Observation, Welcome, decode, encode

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "polcache" / "assets" / "checkpoints" / "reach-v3"
CASES = ("none", "burn", "flood", "garbage")
FLOOD_HWM = 100_000  # the flooder queues this much before its sends wait, as one that waits for no one would


def _socket(address: str, sndhwm: int = 1000) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.connect(address)
    return sock


def _peer(address: str, name: str, hz: float, sndhwm: int = 1000) -> tuple[zmq.Socket, dict]:
    """A DEALER that shook hands with the shipped policy's spec; its arrays of zeros."""
    sock = _socket(address, sndhwm)
    spec = {"state": ((39,), "float32")}
    sock.send(encode(Handshake(obs_spec=spec, action_dim=4, hz=hz, name=name)))
    if not sock.poll(30_000) or not isinstance(decode(sock.recv()), Welcome):
        raise SystemExit(f"{name}: no welcome from {address}")
    return sock, {"state": np.zeros(39, np.float32)}


def robot(address: str, name: str, hz: float, seconds: float) -> None:
    """One robot's loop; prints its figures as JSON."""
    sock, arrays = _peer(address, name, hz)
    period, due_until, covered, ticks, last_chunk, gap = 1.0 / hz, -1.0, 0, 0, time.monotonic(), 0.0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        sock.send(encode(Observation(epoch=0, seq=ticks, t_capture=now, arrays=arrays)), zmq.NOBLOCK)
        ticks += 1
        while sock.poll(max(0.0, start + ticks * period - time.monotonic()) * 1e3):
            msg = decode(sock.recv())
            if isinstance(msg, ActionChunk):
                now = time.monotonic()
                gap, last_chunk = max(gap, now - last_chunk), now
                due_until = max(due_until, float(msg.t_actions[-1]))
        covered += due_until >= time.monotonic() - period  # an action still due at this tick's end
    print(json.dumps({"robot": name, "ticks": ticks, "action_due": covered / ticks, "longest_gap_ms": gap * 1e3}))


def attack(address: str, case: str, seconds: float) -> None:
    """The process beside the robots (see the docstring); prints the messages it sent per second."""
    end = time.monotonic() + seconds
    if case == "burn":
        while time.monotonic() < end:
            pass
        return
    if case == "flood":
        sock, arrays = _peer(address, "flooder", 50.0, FLOOD_HWM)

        def frame(n: int) -> bytes:  # a valid observation, each newer than the last
            return encode(Observation(epoch=0, seq=n, t_capture=0.0, arrays=arrays))
    else:
        sock = _socket(address, FLOOD_HWM)
        rng = random.Random(0)
        garbage = [rng.randbytes(rng.randint(0, 2000)) for _ in range(1000)]

        def frame(n: int) -> bytes:
            return garbage[n % len(garbage)]
    start, sent = time.monotonic(), 0
    while time.monotonic() < end:
        sock.send(frame(sent + 1))
        sent += 1
        while sock.poll(0):
            sock.recv()
    print(json.dumps({"sent_per_s": sent / (time.monotonic() - start)}))


def run_case(case: str, args: argparse.Namespace, port: int) -> dict:
    address = f"tcp://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "polcache", "serve", "--checkpoint", str(SHIPPED), "--bind",
                               address], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me = [sys.executable, __file__, "--address", address, "--seconds", str(args.seconds), "--hz", str(args.hz)]
    try:
        _peer(address, "probe", args.hz)[0].close()  # waits until the server answers
        robots = [subprocess.Popen([*me, "--robot", f"arm{i}"], stdout=subprocess.PIPE, text=True)
                  for i in range(args.robots)]
        beside = subprocess.Popen([*me, "--attack", case], stdout=subprocess.PIPE, text=True) if case != "none" else None
        rows = [json.loads(r.communicate()[0]) for r in robots]
        sent = json.loads(beside.communicate()[0] or "{}").get("sent_per_s") if beside is not None else None
    finally:
        server.kill()
        server.wait()
    return {"case": case,
            "action_due": round(float(np.mean([r["action_due"] for r in rows])), 3),
            "worst_robot_action_due": round(min(r["action_due"] for r in rows), 3),
            "longest_gap_ms": round(max(r["longest_gap_ms"] for r in rows), 1),
            "flooder_msgs_per_s": round(sent) if sent is not None else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robots", type=int, default=3)
    ap.add_argument("--hz", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default=str(RESULTS / "flood.json"))
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--robot", help=argparse.SUPPRESS)
    ap.add_argument("--attack", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.robot:
        return robot(args.address, args.robot, args.hz, args.seconds)
    if args.attack:
        return attack(args.address, args.attack, args.seconds)
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        ap.error(f"--cases: unknown {sorted(unknown)}; expected some of {', '.join(CASES)}")
    rows = [run_case(case, args, free_port()) for case in cases]
    print(f"{args.robots} robots at {args.hz:g} Hz beside one more process, {args.seconds:g} s per case, "
          f"server: polcache serve {SHIPPED.name}")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "flood", "robots": args.robots, "hz": args.hz, "seconds": args.seconds,
                           "rows": rows})


if __name__ == "__main__":
    main()
