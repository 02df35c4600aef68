"""Latency per chunk of self-verification (past-token prediction) at N = 1, 4, 16 candidates, with
and without a BAC schedule, side by side in one run (round robin) on a long-context checkpoint.

Each call is what a robot session costs once its embedding ring buffer has the K frames' features
(encoding one new frame per step is measured by bench_ptp.py): N candidates denoised in one
batch from one encoding, scored against the executed past actions, the best one returned. N = 1
is the plain chunk. Batch 1, CPU threads as given.

    python benchmarks/bench_verify.py --checkpoint runs/cue-img-ptp/last --schedule bac.json [--calls 20]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import RESULTS, print_table, round_robin, write_json
from polcache.policy import load_backend

CANDIDATES = (1, 4, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a long-context checkpoint (policy.n_obs_steps > 1)")
    ap.add_argument("--schedule", help="a BAC schedule of the checkpoint (polcache calibrate); adds the BAC rows")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "verify.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    caches = [None] + ([args.schedule] if args.schedule else [])
    backends = {(n, c): load_backend(args.checkpoint, cache=c, candidates=n, min_verified=1, threads=args.threads)
                for c in caches for n in CANDIDATES}
    spec = next(iter(backends.values())).spec
    if spec.n_obs_steps < 2:
        raise SystemExit(f"{args.checkpoint} sees {spec.n_obs_steps} frame: self-verification needs past frames")
    rng = np.random.default_rng(0)
    obs = {k: (rng.integers(0, 256, (1, spec.n_obs_steps, *s.shape)) if s.dtype == "uint8"
               else rng.normal(size=(1, spec.n_obs_steps, *s.shape))).astype(s.dtype) for k, s in spec.obs.items()}
    past = rng.uniform(-1, 1, (spec.n_obs_steps - 1, spec.action_dim)).astype(np.float32)
    with torch.no_grad():
        feats = {key: b.policy.encode({k: torch.as_tensor(v) for k, v in obs.items()}) for key, b in backends.items()}
    fns = {key: (lambda b=b, f=feats[key]: b.predict_features(f, seed=0, past_actions=past))
           for key, b in backends.items()}
    times = round_robin(fns, args.calls, warmup=2)
    base = float(np.median(times[(1, None)]))
    rows = [{"candidates": n, "cache": "BAC" if c else "none", "ms": round(float(np.median(times[(n, c)])) * 1e3, 2),
             "vs N=1 uncached": round(float(np.median(times[(n, c)])) / base, 2)} for (n, c) in backends]
    print(f"{args.checkpoint}: K={spec.n_obs_steps} frames, H={spec.horizon} action tokens, batch 1, "
          f"{args.threads} thread(s), {args.calls} calls each, median")
    print_table(rows, ["candidates", "cache", "ms", "vs N=1 uncached"])
    write_json(args.json, {"checkpoint": args.checkpoint, "schedule": args.schedule, "calls": args.calls,
                           "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
