"""VLA latency per chunk at batch 1, side by side in one run (round robin): the prefix computed
once per chunk with its cross-attention keys/values reused at every flow step (how polcache runs
it) against recomputing prefix and keys/values at every step (a naive loop over the plain
forward pass); BAC on the action expert against uncached; real-time chunking's cost (one
vector-Jacobian product per flow step) on top.

    python benchmarks/bench_vla.py --checkpoint runs/vla-mt10/last --schedule sched.json [--calls 30]
    python benchmarks/bench_vla.py ... --device cuda     # chunks replayed as CUDA graphs, RTC's too (+ its eager rows)

Without --checkpoint a freshly initialised VLA of configs/vla_mt10.yaml's size is timed (latency
does not depend on the weights); BAC rows need a schedule from `polcache calibrate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, print_table, round_robin, write_json
from polcache.cache.resolve import resolve_plan
from polcache.policy.backend import TorchBackend
from polcache.policy.checkpoint import load_policy
from polcache.policy.device import resolve_device
from polcache.policy.spec import CommittedActions


def fresh_vla(text_encoder: str = "bytes"):
    """A freshly initialised VLA of configs/vla_mt10.yaml's size with the given text path."""
    from polcache.config import load_config, validate
    from polcache.data import Normalizer
    from polcache.policy.families import build_policy
    from polcache.policy.spec import ArraySpec

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "vla_mt10.yaml",
                      [f"policy.vla.text_encoder={text_encoder}"])
    validate(cfg)
    spec = {"state": ArraySpec((39,), "float32"), "instruction": ArraySpec((cfg.policy.vla.instruction_bytes,), "uint8")}
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"state": rng.normal(size=(100, 39)), "action": rng.uniform(-1, 1, (100, 4))})
    return build_policy(cfg.policy, spec, cfg.obs_keys, 4, norm, "mt10").eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--schedule", help="a BAC schedule of the checkpoint (polcache calibrate)")
    ap.add_argument("--bac", default="bac:4:3", help="the BAC spec over --schedule (default bac:4:3)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", default=str(RESULTS / "vla.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    policy = (load_policy(args.checkpoint)[0] if args.checkpoint else fresh_vla()).to(device)
    sampler = policy.sampler()
    spec = policy.spec
    rng = np.random.default_rng(0)
    obs = spec.placeholder_observations()  # a written instruction (random bytes are no text: refused)
    obs.update({k: rng.normal(size=(1, spec.n_obs_steps, *s.shape)).astype(s.dtype) for k, s in spec.obs.items()
                if s.dtype != "uint8"})
    batch = {k: torch.as_tensor(v).to(device) for k, v in obs.items()}
    gen = torch.Generator(device=device)

    @torch.no_grad()
    def recompute_prefix_every_step():
        x, _ = policy.initial_noise(1, sampler, gen.manual_seed(0), device)
        for k in range(sampler.num_steps):
            t = sampler.timesteps[k].expand(1)
            x = sampler.update(k, x, policy.denoiser(x, t, policy.encode(batch)), None)
        return x.cpu()

    uncached = TorchBackend(policy, sampler.kind, sampler.num_steps, device=device, fused_norm=False)
    fns = {"prefix every step (naive)": recompute_prefix_every_step,
           "prefix once per chunk": lambda: uncached.predict(obs, seed=0)}
    committed = CommittedActions(np.zeros((spec.n_action_steps, spec.action_dim), np.float32), delay=2)
    fns["+ real-time chunking"] = lambda: uncached.predict(obs, seed=0, committed=committed)
    if device.type == "cuda":  # RTC above replays a captured graph; the same chunk launched eagerly
        eager = TorchBackend(policy, sampler.kind, sampler.num_steps, device=device, graphs=False, fused_norm=False)
        fns["+ real-time chunking, eager"] = lambda: eager.predict(obs, seed=0, committed=committed)
        normed_uncached = TorchBackend(policy, sampler.kind, sampler.num_steps, device=device, fused_norm=True)
        fns["prefix once + fused add+norm"] = lambda: normed_uncached.predict(obs, seed=0)
    if args.schedule:
        plan = resolve_plan(f"{args.bac}@{args.schedule}", policy, sampler)
        cached = TorchBackend(policy, sampler.kind, sampler.num_steps, plan=plan, device=device, fused_norm=False)
        fns[f"prefix once + BAC {args.bac}"] = lambda: cached.predict(obs, seed=0)
        if device.type == "cuda":
            normed = TorchBackend(policy, sampler.kind, sampler.num_steps, plan=plan, device=device, fused_norm=True)
            fns[f"prefix once + BAC {args.bac} + fused add+norm"] = lambda: normed.predict(obs, seed=0)
        fns[f"prefix once + BAC {args.bac} + RTC"] = lambda: cached.predict(obs, seed=0, committed=committed)
        if device.type == "cuda":
            cached_eager = TorchBackend(policy, sampler.kind, sampler.num_steps, plan=plan, device=device, graphs=False,
                                        fused_norm=False)
            fns[f"prefix once + BAC {args.bac} + RTC, eager"] = lambda: cached_eager.predict(obs, seed=0,
                                                                                             committed=committed)
    times = round_robin(fns, args.calls, warmup=3)
    base = float(np.median(times["prefix once per chunk"]))
    rows = [{"path": name, "median_ms": round(float(np.median(t)) * 1e3, 2),
             "p95_ms": round(float(np.percentile(t, 95)) * 1e3, 2), "vs_prefix_once": round(base / float(np.median(t)), 2)}
            for name, t in times.items()]
    print(f"VLA {args.checkpoint or '(fresh, configs/vla_mt10.yaml)'}: {sampler.kind} K={sampler.num_steps}, "
          f"{len(policy.cache_blocks)} expert blocks, {policy.encoder.memory_tokens} prefix tokens, "
          f"batch 1, {args.threads} thread(s), {device}"
          + (f" ({torch.cuda.get_device_name(device)}, graphs: {uncached.describe()['cuda_graphs_off_because'] or 'on'}, "
             f"RTC graph: {uncached.describe()['rtc_cuda_graph_off_because'] or 'on'})" if device.type == "cuda" else ""))
    print_table(rows, ["path", "median_ms", "p95_ms", "vs_prefix_once"])
    write_json(args.json, {"checkpoint": args.checkpoint, "device": str(device),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "sampler": sampler.kind, "steps": sampler.num_steps,
                           "threads": args.threads, "calls": args.calls, "rows": rows})


if __name__ == "__main__":
    main()
