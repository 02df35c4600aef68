"""What the training loop's per-step finite-loss check costs: one training step with and without it.

`polcache train` checks every step's loss before the optimizer takes the step (a NaN or infinite
loss stops the run with the weights of the last good step), which reads one number back from the
device each step. On a CPU that is free; on a GPU it stops the host from queueing the next step's
kernels while the device still runs this one. This script times the loop body of
`polcache.train.loop` (batch upload, forward = loss, the check, backward, AdamW step, EMA update)
on the default-size DP-T with random weights and a random batch, with the check and without it,
round-robin in one run, and prints the ratio.

    python benchmarks/bench_train_step.py --device cuda [--batch 256] [--calls 30]
    python benchmarks/bench_train_step.py --device cpu --quick      # the script's own smoke test
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_denoiser import default_policy
from common import RESULTS, print_table, round_robin, write_json
from polcache.config import PolicyConfig
from polcache.policy.device import resolve_device
from polcache.train.ema import EMA
from polcache.train.loop import _finite

OBS_DIM, ACTION_DIM = 39, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256, help="the config's default train.batch_size")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2-layer model, small batch, few calls")
    ap.add_argument("--json", default=str(RESULTS / "train_step.json"))
    args = ap.parse_args()
    dev = resolve_device(args.device)
    cfg = PolicyConfig(n_layers=2) if args.quick else PolicyConfig()
    batch_size, calls = (8, 3) if args.quick else (args.batch, args.calls)
    policy = default_policy(OBS_DIM, ACTION_DIM, cfg).to(dev).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-6)
    ema = EMA(policy, 0.9999, 0)
    g = torch.Generator().manual_seed(0)
    host = {"obs": {"state": torch.randn(batch_size, cfg.n_obs_steps, OBS_DIM, generator=g)},
            "action": torch.rand(batch_size, cfg.horizon, ACTION_DIM, generator=g) * 2 - 1}
    if dev.type == "cuda":
        host = {"obs": {"state": host["obs"]["state"].pin_memory()}, "action": host["action"].pin_memory()}
    step = [0]

    def train_step(check: bool) -> None:
        batch = {"obs": {"state": host["obs"]["state"].to(dev, non_blocking=True)},
                 "action": host["action"].to(dev, non_blocking=True)}
        loss = policy(batch)
        if check and not _finite(loss, 1):
            raise RuntimeError("non-finite loss on random data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step[0] += 1
        ema.update(policy, step[0])

    def timed(check: bool):
        def run() -> None:  # ten steps back to back, then wait: the device's work is in the time
            for _ in range(10):
                train_step(check)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return run

    times = round_robin({"checked": timed(True), "unchecked": timed(False)}, calls, args.warmup)
    base = float(np.median(times["unchecked"])) / 10
    rows = []
    for name, t in times.items():
        ms = float(np.median(t)) / 10 * 1e3
        rows.append({"loop": name, "ms / step": round(ms, 3), "p90 ms": round(float(np.percentile(t, 90)) / 10 * 1e3, 3),
                     "vs unchecked": round(ms / (base * 1e3), 3)})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"training step, default DP-T{' (quick: 2 layers)' if args.quick else ''}, batch {batch_size}, {name}, "
          f"torch {torch.__version__}; median of {calls} rounds of 10 steps")
    print_table(rows, ["loop", "ms / step", "p90 ms", "vs unchecked"])
    write_json(args.json, {"device": name, "batch": batch_size, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
