"""Several phase-locked robots on one server: chunk rate per robot and the longest wait, with one
inference per robot (--max-batch 1) and with the waiting robots batched, side by side in one run.

N robots (raw protocol peers, as a client written from docs/protocol.md would be) send their
observation at the same instant of every tick, always in the same order, at --hz for --seconds,
to a server hosting the shipped reach-v3 checkpoint, or --checkpoint (a checkpoint, or an artifact
from `polcache export`, served by ONNX Runtime), in this process's server thread. Per robot:
chunks per second, and the longest run of ticks without a fresh chunk (the target: at most
n_action_steps, so the robot never runs out of actions); plus the ratio of the most to the least
served robot (target <= 1.2).

    python benchmarks/bench_fairness.py [--robots 4] [--hz 50] [--seconds 10] [--batches 1,8]
                                        [--checkpoint DIR] [--device cuda] [--json ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zmq

from common import RESULTS, print_table, write_json
from polcache.policy import load_backend
from polcache.serve.server import DEFAULT_MAX_BATCH, PolicyServer
from polcache_client.protocol import ActionChunk, Handshake, Observation, Welcome, decode, encode

SHIPPED = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"


def serve_robots(backend, args: argparse.Namespace, max_batch: int) -> tuple[list[dict], dict]:
    """Run the phase-locked robots against a server batching up to `max_batch`: per-robot rows, summary."""
    spec = backend.spec
    state = np.zeros(spec.obs["state"].shape, np.float32)
    ctx = zmq.Context.instance()
    records = []
    with PolicyServer(backend, "tcp://127.0.0.1:0", on_record=records.append, max_batch=max_batch) as server:
        peers = []
        for i in range(args.robots):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(server.endpoint)
            s.send(encode(Handshake(obs_spec={"state": (spec.obs["state"].shape, "float32")},
                                    action_dim=spec.action_dim, hz=args.hz, name=f"arm{i}")))
            assert s.poll(10000) and isinstance(decode(s.recv()), Welcome)
            peers.append(s)
        ticks = int(args.seconds * args.hz)
        fresh = [[] for _ in peers]  # ticks at which each robot received a chunk
        poller = zmq.Poller()
        for s in peers:
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(peers)}
        period, start = 1.0 / args.hz, time.perf_counter()
        for tick in range(ticks):
            for s in peers:  # the same instant, the same order, every tick
                s.send(encode(Observation(epoch=0, seq=tick, t_capture=float(tick) * period, arrays={"state": state})))
            deadline = start + (tick + 1) * period
            while (left := deadline - time.perf_counter()) > 0:
                for s, _ in poller.poll(left * 1e3):  # sleeps in ZeroMQ, GIL released
                    if isinstance(decode(s.recv()), ActionChunk):
                        fresh[index[s]].append(tick)
        for s in peers:
            s.close()
    rows = []
    for i, got in enumerate(fresh):
        gaps = np.diff([0, *got, ticks - 1]) if got else [ticks]
        rows.append({"max_batch": max_batch, "robot": f"arm{i}", "chunks_per_s": round(len(got) / args.seconds, 1),
                     "longest_wait_ticks": int(max(gaps))})
    rates = [r["chunks_per_s"] for r in rows]
    served = [r for r in records if getattr(r, "kind", "") == "request"]
    median = (lambda name: round(float(np.median([getattr(r, name) for r in served])), 2)) if served else \
        (lambda name: float("nan"))
    summary = {"max_batch": max_batch, "max_over_min": round(max(rates) / max(min(rates), 1e-9), 2),
               "worst_wait_ticks": max(r["longest_wait_ticks"] for r in rows),
               "inference_ms_p50": median("inference_ms"), "batch_size_p50": median("batch_size"),
               "chunks_total_per_s": round(sum(rates), 1)}
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robots", type=int, default=4)
    ap.add_argument("--hz", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batches", default=f"1,{DEFAULT_MAX_BATCH}", help="server --max-batch values to compare")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (serve's default: 1)")
    ap.add_argument("--checkpoint", default=str(SHIPPED), help="a checkpoint or an exported artifact (default: "
                    "the shipped reach-v3)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (serve's --device)")
    ap.add_argument("--json", default=str(RESULTS / "fairness.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    backend = load_backend(args.checkpoint, threads=args.threads, device=args.device)
    batches = [int(b) for b in args.batches.split(",")]
    backend.warmup(tuple(range(1, max(batches) + 1)))
    rows, summaries = [], []
    for max_batch in batches:
        batch_rows, summary = serve_robots(backend, args, max_batch)
        rows += batch_rows
        summaries.append(summary)
    what = backend.describe()
    print(f"{args.robots} phase-locked robots at {args.hz:g} Hz, {args.checkpoint} ({what['backend']} on "
          f"{what.get('device', args.device)}), "
          f"{args.seconds:g} s each; "
          f"target: every robot a fresh chunk within {backend.spec.n_action_steps} ticks, most/least served <= 1.2")
    print_table(rows, ["max_batch", "robot", "chunks_per_s", "longest_wait_ticks"])
    print_table(summaries, list(summaries[0]))
    write_json(args.json, {"benchmark": "fairness", "checkpoint": args.checkpoint, "backend": what["backend"],
                           "device": what.get("device", args.device),
                           "robots": args.robots, "hz": args.hz,
                           "n_action_steps": backend.spec.n_action_steps, "summaries": summaries, "rows": rows})


if __name__ == "__main__":
    main()
