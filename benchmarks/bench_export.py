"""Exported denoisers on ONNX Runtime against the torch executor, same model, same plan, one run.

Default-size DP-T (random weights), DDPM-100, batch 1, one thread for both. Per action chunk,
median ms (round-robin, so load changes hit every variant alike): torch uncached, torch with
the cache plan, ORT uncached, ORT with the same plan in both step-graph designs ("if": one step
graph switching blocks with If nodes on the plan table; "patterns": one graph per distinct
update pattern of the plan). Plans: a BAC schedule (calibrated here on random states: ACS
S per block with the error-bound objective, Bubbling Union over 5 blocks) and uniform:K/S (every
block computed at the same S steps), S a tenth of the K steps (10 at the default DDPM-100, so
uniform:10; `--steps 16`: 2, uniform:8).
Also: export time, file size, step graphs; max |ORT - torch| per step call (same inputs,
along a torch trajectory) and per chunk (same initial noise and per-step noise).

    python benchmarks/bench_export.py [--threads 1] [--calls 15] [--steps 100] [--samples 8]
                                      [--json benchmarks/results/export.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_cache import time_round_robin
from bench_denoiser import default_policy
from common import RESULTS, print_table, write_json
from polcache.cache.calibrate import calibrate
from polcache.cache.schedule import build_schedule, model_hash, save_schedule
from polcache.export.exporter import export_policy, plan_table, torch_reference
from polcache.export.ort_backend import OrtBackend
from polcache.policy.executor import DeltaStore


def per_call_diff(policy, backend: OrtBackend, sampler, plan, obs: dict, seed: int = 0) -> float:
    """Max |x_next(ORT) - x_next(torch)| over the K step calls of one chunk, each fed the same
    x, stored deltas and noise (the torch run's)."""
    n = len(policy.denoiser.blocks)
    g = torch.Generator().manual_seed(seed)
    x, noise = policy.initial_noise(1, sampler, g)
    t_obs = {k: torch.as_tensor(v) for k, v in obs.items()}
    obs_kv = backend.encoder.run(None, obs)[0]
    store = DeltaStore(n)
    worst = 0.0
    with torch.no_grad():
        ctx = policy.denoiser.prepare_chunk(policy.encode(t_obs), sampler.timesteps)
        deltas = torch.zeros(n, 1, policy.cfg.horizon, policy.denoiser.width)
        for k in range(sampler.num_steps):
            nk = noise[k] if noise is not None else torch.zeros_like(x)
            feeds = {"x": x.numpy(), "k": np.array(k), "obs_kv": obs_kv, "deltas": deltas.numpy(), "noise": nk.numpy()}
            step = backend._steps[backend._pattern[k]]
            got, _ = step.run(None, feeds)
            x = sampler.update(k, x, policy.denoiser.step(x, k, ctx, None if plan is None else plan[k], store), nk)
            worst = max(worst, float(np.abs(got - x.numpy()).max()))
            deltas = torch.stack([d if d is not None else torch.zeros_like(deltas[0]) for d in store.last]) \
                if plan is not None else deltas
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=8, help="calibration observations for the BAC schedule")
    ap.add_argument("--json", default=str(RESULTS / "export.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = default_policy()
    sampler = policy.sampler("ddpm", args.steps)
    K, n = sampler.num_steps, len(policy.denoiser.blocks)
    tmp = Path(tempfile.mkdtemp(prefix="bench_export-"))

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    calib_obs = {"state": torch.randn(args.samples, policy.cfg.n_obs_steps, 39, generator=g)}
    calib = calibrate(policy, sampler, calib_obs, "random states", batch_size=8, sensitivity_samples=2)
    S = max(1, round(K / 10))  # the same share of the steps at any K: S=10 of 100 was 10 of 16 at --steps 16
    bac_path = save_schedule(build_schedule(calib, "bac", S, 5, True, model_hash(policy), "ddpm", "error-bound"),
                             tmp / "bac.json")
    print(f"BAC schedule (S={S}, BU 5, error-bound) calibrated on {args.samples} random states in "
          f"{time.perf_counter() - t0:.0f} s")
    uniform = f"uniform:{K // S}"  # every (K // S)-th step: S of them
    plans = {"none": None, f"bac:{S}:5": str(bac_path), uniform: uniform}

    artifacts, rows = {}, []
    for label, spec in plans.items():
        for mode in (("if",) if spec is None else ("if", "patterns")):
            out = tmp / f"{label.replace(':', '_')}-{mode}"
            m = export_policy(policy, out, cache=spec, sampler="ddpm", steps=K, step_mode=mode)
            size = sum((out / gr.file).stat().st_size for gr in m.graphs.values())
            artifacts[(label, mode)] = OrtBackend(out, threads=args.threads)
            rows.append({"plan": label, "path": f"ort/{mode}", "export_s": m.export_seconds,
                         "step_graphs": len(m.graphs) - 1, "MB": round(size / 1e6, 1),
                         "block_evals": (m.cache["summary"] or {}).get("block_evals", K * n)})
            print(f"exported {label} ({mode}): {len(m.graphs) - 1} step graph(s), {size / 1e6:.1f} MB, "
                  f"{m.export_seconds:.1f} s")

    rng = np.random.default_rng(0)
    obs = {"state": rng.normal(size=(1, policy.cfg.n_obs_steps, 39)).astype(np.float32)}
    t_obs = {"state": torch.as_tensor(obs["state"])}
    torch_plans = {label: plan_table(policy, sampler, spec)[0] for label, spec in plans.items()}
    fns = {}
    for label in plans:
        fns[(label, "torch")] = (lambda p=torch_plans[label]:
                                 policy.predict_action(t_obs, sampler, p, torch.Generator().manual_seed(0)))
    for (label, mode), backend in artifacts.items():
        fns[(label, f"ort/{mode}")] = (lambda b=backend: b.predict(obs, seed=0))
    with torch.no_grad():
        ms = time_round_robin(fns, args.calls, args.warmup)

    # accuracy: per step call and per chunk, same noise
    for label, spec in plans.items():
        x, noise = policy.initial_noise(1, sampler, torch.Generator().manual_seed(1))
        x, noise = x.numpy(), None if noise is None else noise.numpy()
        ref = torch_reference(policy, obs, sampler, torch_plans[label], x, noise)
        for mode in ("if", "patterns"):
            backend = artifacts.get((label, mode))
            if backend is None:
                continue
            row = next(r for r in rows if r["plan"] == label and r["path"] == f"ort/{mode}")
            row["chunk_diff"] = float(f"{np.abs(backend.sample(obs, x, noise) - ref).max():.2g}")
            row["step_diff"] = float(f"{per_call_diff(policy, backend, sampler, torch_plans[label], obs):.2g}")
        evals = next(r["block_evals"] for r in rows if r["plan"] == label)
        rows.append({"plan": label, "path": "torch", "block_evals": evals})
    for r in rows:
        r["ms"] = round(ms[(r["plan"], r["path"])], 1)
        r["vs_torch_same_plan"] = round(ms[(r["plan"], "torch")] / r["ms"], 2)
        r["vs_torch_uncached"] = round(ms[("none", "torch")] / r["ms"], 2)
    rows.sort(key=lambda r: (list(plans).index(r["plan"]), r["path"]))
    params = sum(p.numel() for p in policy.denoiser.parameters()) / 1e6
    import onnxruntime

    print(f"default DP-T ({n} blocks, {params:.2f}M denoiser params), random weights, DDPM-{K}, batch 1, "
          f"{args.threads} thread(s); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; medians of "
          f"{args.calls} chunks after {args.warmup} warm-up, round-robin")
    print_table(rows, ["plan", "path", "block_evals", "ms", "vs_torch_same_plan", "vs_torch_uncached", "step_diff",
                       "chunk_diff", "step_graphs", "MB", "export_s"])
    write_json(args.json, {"benchmark": "export", "sampler": f"ddpm-{K}", "threads": args.threads,
                           "calls": args.calls, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                           "rows": rows})


if __name__ == "__main__":
    main()
