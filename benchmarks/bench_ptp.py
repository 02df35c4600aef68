"""Past-token prediction tooling, side by side in one run: training throughput of a long-context
image policy end to end against the same head on stored per-frame embeddings, the encoder cost
per control step with the session's embedding ring buffer against re-encoding all K frames, and
the size of the embedding store against the image dataset.

The dataset is synthetic (random 84x84 camera images + an 8-d state, 20 episodes of 60 steps):
throughput does not depend on what the pixels show. Policy: the small DP-T (4 layers, width
128) with the default image encoder, K=16 frames at stride 3, 32 action tokens.

    python benchmarks/bench_ptp.py [--steps 5] [--batch 16] [--json benchmarks/results/ptp.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, print_table, write_json
from polcache.config import PolicyConfig
from polcache.data import Episode, Normalizer, SequenceDataset, open_dataset, write_dataset
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.session import EmbeddingRing
from polcache.ptp.embeddings import embed_dataset

K, STRIDE, H = 16, 3, 32


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def synthetic(root: Path, episodes: int = 20, steps: int = 60, size: int = 84) -> Path:
    rng = np.random.default_rng(0)
    eps = [Episode(obs={"image_top": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8),
                        "state": rng.normal(size=(steps, 8)).astype(np.float32)},
                   action=rng.uniform(-1, 1, (steps, 2)).astype(np.float32), task="synthetic") for _ in range(episodes)]
    write_dataset(root / "images.zarr", eps)
    return root / "images.zarr"


def policy_for(store, n_obs_steps: int, horizon: int, stride: int) -> DiffusionPolicy:
    cfg = PolicyConfig(n_obs_steps=n_obs_steps, horizon=horizon, obs_stride=stride, n_layers=4, width=128,
                       state_hidden=64, n_action_steps=8)
    norm = Normalizer.fit({"state": store.array("state"), "action": store.array("action")})
    return DiffusionPolicy(cfg, store.obs_spec(), ["image_top", "state"], 2, norm, "synthetic")


def samples_per_s(policy: DiffusionPolicy, data: SequenceDataset, batch: int, steps: int) -> float:
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()
    it = iter(loader)
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            t0 = time.perf_counter()
        loss = policy.compute_loss(next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "ptp.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = open_dataset(synthetic(root))
        short = policy_for(raw, 2, 16, 1).eval()
        t0 = time.perf_counter()
        emb = open_dataset(embed_dataset(short, root / "images.zarr", root / "emb.zarr", progress=False))
        embed_s = time.perf_counter() - t0
        long_e2e = policy_for(raw, K, H, STRIDE)
        e2e = samples_per_s(long_e2e, SequenceDataset(raw, H, K, ["image_top", "state"], obs_stride=STRIDE),
                            args.batch, args.steps)
        long_head = policy_for(raw, K, H, STRIDE)
        long_head.encoder.load_state_dict(short.encoder.state_dict())
        long_head.encoder.requires_grad_(False)
        cached = samples_per_s(long_head, SequenceDataset(emb, H, K, ["embedding"], obs_stride=STRIDE),
                               args.batch, args.steps)
        # encoder cost per control step: one new frame through the ring, or all K frames again
        long_head.eval()
        window = SequenceDataset(raw, H, K, ["image_top", "state"], obs_stride=STRIDE)
        ring = EmbeddingRing()
        ring_ms, full_ms = [], []
        with torch.no_grad():
            for t in range(60):
                obs = {k: v[None] for k, v in window[t]["obs"].items()}
                steps = [max(0, t + off) for off in long_head.spec.frame_offsets]
                t1 = time.perf_counter()
                ring.features(long_head, obs, steps)
                t2 = time.perf_counter()
                long_head.encode(obs)
                t3 = time.perf_counter()
                if t >= (K - 1) * STRIDE // 2:  # past the episode start, where frames repeat
                    ring_ms.append((t2 - t1) * 1e3)
                    full_ms.append((t3 - t2) * 1e3)
        rows = [
            {"measure": "training samples/s, end to end (encoder runs on K=16 images per sample)",
             "value": round(e2e, 2)},
            {"measure": "training samples/s, head on stored embeddings", "value": round(cached, 2)},
            {"measure": "speedup of training from stored embeddings", "value": round(cached / e2e, 1)},
            {"measure": "encoder ms per control step, re-encoding all 16 frames", "value": round(float(np.median(full_ms)), 2)},
            {"measure": "encoder ms per control step, ring buffer (new frames only)", "value": round(float(np.median(ring_ms)), 2)},
            {"measure": "encoder cost ratio (re-encode / ring)", "value": round(float(np.median(full_ms) / np.median(ring_ms)), 1)},
            {"measure": "image dataset MB (zarr, compressed)", "value": round(dir_bytes(root / "images.zarr") / 2**20, 2)},
            {"measure": "embedding store MB", "value": round(dir_bytes(root / "emb.zarr") / 2**20, 2)},
            {"measure": "embed seconds (1200 frames)", "value": round(embed_s, 2)},
        ]
    print(f"synthetic 84x84 images + 8-d state, K={K} stride {STRIDE}, batch {args.batch}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} thread(s)")
    print_table(rows, ["measure", "value"])
    write_json(args.json, {"benchmark": "ptp", "K": K, "stride": STRIDE, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
