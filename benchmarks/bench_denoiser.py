"""Denoiser latency at the default DP-T size: per denoising step and per action chunk,
for DDPM-100 and DDIM-16, at a stated number of torch threads.

    python benchmarks/bench_denoiser.py [--threads 1] [--calls 20] [--json benchmarks/results/denoiser.json]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import RESULTS, median_ms, print_table, write_json
from polcache.config import PolicyConfig
from polcache.data import Normalizer
from polcache.policy import ArraySpec, DiffusionPolicy


def default_policy(obs_dim: int = 39, action_dim: int = 4, cfg: PolicyConfig | None = None) -> DiffusionPolicy:
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"state": rng.normal(size=(100, obs_dim)), "action": rng.uniform(-1, 1, (100, action_dim))})
    return DiffusionPolicy(cfg or PolicyConfig(), {"state": ArraySpec((obs_dim,), "float32")}, ["state"], action_dim,
                           norm).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "denoiser.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = default_policy()
    obs = {"state": torch.randn(args.batch, 2, 39)}
    rows = []
    with torch.no_grad():
        feats = policy.encode(obs)
        for kind, steps in (("ddpm", 100), ("ddim", 16)):
            sampler = policy.sampler(kind, steps)
            ctx = policy.denoiser.prepare_chunk(feats, sampler.timesteps)
            x = torch.randn(args.batch, 16, 4)
            step_ms = median_ms(lambda: policy.denoiser.step(x, 0, ctx), args.calls * 5)
            chunk_ms = median_ms(lambda: policy.predict_action(obs, sampler), args.calls)
            rows.append({"sampler": f"{kind.upper()}-{steps}", "threads": args.threads, "batch": args.batch,
                         "step_ms": round(step_ms, 3), "chunk_ms": round(chunk_ms, 2),
                         "chunks_per_s": round(1e3 / chunk_ms, 2)})
    print(f"DP-T default size ({sum(p.numel() for p in policy.denoiser.parameters()) / 1e6:.2f}M denoiser params), "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print_table(rows, ["sampler", "threads", "batch", "step_ms", "chunk_ms", "chunks_per_s"])
    write_json(args.json, {"benchmark": "denoiser", "rows": rows})


if __name__ == "__main__":
    main()
