"""Block caching side by side: every cache method on one model, in one run.

Per sampler configuration (default DDPM K=100 with S=10, DDIM K=16 with S=5; Bubbling Union
over 5 blocks) and per method (ACS with the default error-bound objective, and "/sim" with the
paper's similarity objective): median time per action chunk at batch 1, speedup over
uncached, compute limit (uncached block evaluations / performed), efficiency (speedup /
limit) and action deviation from the uncached output with the same initial noise
(normalised MSE, mean over observations). Times are measured for our executor ("after":
per-chunk memory/KV precomputation, coefficient-table sampler) and, for the authors' rows,
for a naive executor ("before": DiffusionTransformer.forward-style memory and K/V at every
step + the diffusers scheduler step). Methods are timed round-robin so drift hits all alike.

    python benchmarks/bench_cache.py [--checkpoint DIR] [--threads 1] [--calls 20] [--json ...]
    python benchmarks/bench_cache.py --success TASK --checkpoint DIR --episodes 50 \
        [--cache none --cache uniform:10 --cache sched.json ...]

Without --checkpoint the model is the default-size DP-T with random weights (fine for timing;
its similarity structure is not a trained policy's), calibrated on random states.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench_denoiser import default_policy
from common import RESULTS, print_table, round_robin, write_json
from polcache.cache import plan_summary
from polcache.cache.baselines import threshold_plan, uniform_plan, with_forecast
from polcache.cache.calibrate import calibrate, calibration_observations
from polcache.cache.check import plan_deviation, sample_counted
from polcache.cache.schedule import build_schedule, model_hash
from polcache.policy.blocks import CA
from polcache.policy.executor import COMPUTE, Plan
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.samplers import diffusers_scheduler


@dataclass
class Method:
    name: str
    plan: Plan | None  # None: uncached
    naive: bool = False  # also time the naive ("before") executor


@torch.no_grad()
def naive_sample(policy: DiffusionPolicy, feats: torch.Tensor, kind: str, K: int, plan: Plan | None,
                 gen: torch.Generator) -> torch.Tensor:
    """The "before" executor: conditioning memory and cross-attention K/V recomputed at every
    step (DiffusionTransformer.forward when uncached), diffusers' scheduler.step() per step."""
    den = policy.denoiser
    sched = diffusers_scheduler(policy.cfg.sampler, kind)
    sched.set_timesteps(K)
    B = feats.shape[0]
    x = torch.randn((B, policy.cfg.horizon, policy.action_dim), generator=gen, device=feats.device)
    stored: list[torch.Tensor | None] = [None] * len(den.blocks)
    for k, t in enumerate(sched.timesteps):
        tb = t.float().to(feats.device).expand(B)
        if plan is None:
            out = den(x, tb, feats)
        else:
            memory = torch.cat([den.time_memory(tb)[:, None], den.obs_memory(feats)], dim=1)
            h = den.embed_actions(x)
            for i, blk in enumerate(den.blocks):
                if plan[k][i] == COMPUTE:
                    stored[i] = blk(h, blk.memory_kv(memory) if blk.kind == CA else None)
                h = h + stored[i]
            out = den.output(h)
        x = sched.step(out, t, x, generator=gen).prev_sample
    return x


def match_threshold(policy, feats_list, sampler, target_evals: float, iters: int = 12) -> float:
    """Bisect (in log space) the threshold whose mean block evaluations are closest to target."""
    n, K = len(policy.denoiser.blocks), sampler.num_steps
    lo, hi = math.log(1e-3), math.log(50.0)
    best = (float("inf"), 1.0)
    for _ in range(iters):
        t = math.exp((lo + hi) / 2)
        evals = np.mean([sample_counted(policy, f, sampler, threshold_plan(K, n, t), i)[1]
                         for i, f in enumerate(feats_list)])
        best = min(best, (abs(evals - target_evals), t))
        lo, hi = (lo, math.log(t)) if evals < target_evals else (math.log(t), hi)
    return best[1]


def methods_for(policy, calib, sampler, budget: int, bu_blocks: int, h: str) -> tuple[list[Method], int]:
    """The methods of one configuration, and the default BAC's block evaluations (what uniform
    and threshold caching are matched to). "bac" rows use the default error-bound objective;
    "/sim" rows the paper's similarity objective."""
    n, K = len(policy.denoiser.blocks), sampler.num_steps

    def plan(method: str, objective: str) -> Plan:
        return build_schedule(calib, method, budget, bu_blocks, True, h, sampler.kind, objective).to_plan()

    bac = plan("bac", "error-bound")
    bac_evals = plan_summary(bac)["block_evals"]
    # the uniform interval with the block evaluations closest to BAC's, and the authors' K/S
    equal = min(range(1, K + 1), key=lambda N: abs(len(range(0, K, N)) * n - bac_evals))
    authors = max(1, K // budget)
    out = [Method("none", None, naive=True), Method(f"uniform:{authors}", uniform_plan(K, n, authors), naive=True)]
    if equal != authors:
        out.append(Method(f"uniform:{equal}", uniform_plan(K, n, equal)))
    out += [Method(f"unified:{budget}/sim", plan("unified", "similarity")),
            Method(f"blockwise:{budget}/sim", plan("blockwise", "similarity"), naive=True),
            Method(f"bac:{budget}:{bu_blocks}/sim", plan("bac", "similarity"), naive=True),
            Method(f"blockwise:{budget}", plan("blockwise", "error-bound")),
            Method(f"bac:{budget}:{bu_blocks}", bac, naive=True),
            Method(f"bac:{budget}:{bu_blocks}+forecast", with_forecast(bac)),
            Method(f"uniform:{equal}+forecast", with_forecast(uniform_plan(K, n, equal)))]
    return out, bac_evals


def time_round_robin(fns: dict, calls: int, warmup: int) -> dict:
    """Median ms per function, timed round-robin."""
    return {name: float(np.median(ts)) * 1e3 for name, ts in round_robin(fns, calls, warmup).items()}


def bench_config(policy, obs, kind: str, K: int, budget: int, bu_blocks: int, args) -> list[dict]:
    """Calibrate on the first args.samples observations; deviations on the held-out rest."""
    sampler = policy.sampler(kind, K)
    n = len(policy.denoiser.blocks)
    t0 = time.perf_counter()
    calib_obs = {k: v[:args.samples] for k, v in obs.items()}
    calib = calibrate(policy, sampler, calib_obs, "benchmark observations", batch_size=8, seed=args.seed)
    print(f"{kind} K={K}: calibrated on {calib.samples} observations in {time.perf_counter() - t0:.0f} s")
    methods, bac_evals = methods_for(policy, calib, sampler, budget, bu_blocks, model_hash(policy))
    with torch.no_grad():
        feats_list = [policy.encode({k: v[i:i + 1] for k, v in obs.items()})
                      for i in range(args.samples, args.samples + args.deviation_obs)]
        refs = [sample_counted(policy, f, sampler, None, seed=i)[0] for i, f in enumerate(feats_list)]
        thr = match_threshold(policy, feats_list, sampler, bac_evals)
    methods.append(Method(f"threshold:{thr:.4g}", threshold_plan(K, n, thr)))
    rows = []
    feats = feats_list[0]
    fns = {("after", m.name): (lambda p=m.plan: sample_counted(policy, feats, sampler, p, 0)) for m in methods}
    if not args.no_naive:
        fns |= {("before", m.name): (lambda p=m.plan: naive_sample(policy, feats, kind, K, p,
                                                                    torch.Generator().manual_seed(0)))
                for m in methods if m.naive}
    with torch.no_grad():
        ms = time_round_robin(fns, args.calls, args.warmup)
        ms_after = {name: t for (path, name), t in ms.items() if path == "after"}
        ms_before = {name: t for (path, name), t in ms.items() if path == "before"}
        for m in methods:
            dev = plan_deviation(policy, feats_list, sampler, m.plan, refs)
            evals = dev["evals"]
            limit = K * n / evals
            speedup = ms_after["none"] / ms_after[m.name]
            row = {"sampler": f"{kind.upper()}-{K}", "method": m.name, "ms": round(ms_after[m.name], 1),
                   "speedup": round(speedup, 2), "block_evals": round(evals, 1), "limit": round(limit, 2),
                   "efficiency": round(speedup / limit, 2) if m.plan is not None else None,
                   "nmse": float(f"{dev['nmse']:.3g}"), "max_dev": float(f"{dev['max_dev']:.3g}"),
                   "jerk_ratio": None if dev["jerk_ratio"] is None else round(dev["jerk_ratio"], 3)}
            if m.name in ms_before:
                row["ms_before"] = round(ms_before[m.name], 1)
                row["speedup_before"] = round(ms_before["none"] / ms_before[m.name], 2)
                row["eff_before"] = round(row["speedup_before"] / limit, 2) if m.plan is not None else None
                row["vs_naive_uncached"] = round(ms_before["none"] / ms_after[m.name], 2)
            rows.append(row)
    return rows


def timing_mode(args) -> None:
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from polcache.policy import load_policy

        policy, cfg, _ = load_policy(args.checkpoint)
        obs, source = calibration_observations(policy, cfg, args.samples + args.deviation_obs, args.seed,
                                                 args.checkpoint)
        label = f"checkpoint {args.checkpoint}"
    else:
        policy = default_policy()
        g = torch.Generator().manual_seed(args.seed)
        obs = {"state": torch.randn(args.samples + args.deviation_obs, policy.cfg.n_obs_steps, 39, generator=g)}
        source = "random states"
        label = "default DP-T, random weights"
    n = len(policy.denoiser.blocks)
    params = sum(p.numel() for p in policy.denoiser.parameters()) / 1e6
    print(f"{label}: {n} blocks, {params:.2f}M denoiser params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), batch 1; observations ({args.samples} for calibration, "
          f"{args.deviation_obs} held out for deviation): {source}; medians of {args.calls} calls after "
          f"{args.warmup} warm-up, round-robin")
    rows = []
    for spec in args.configs.split(","):
        kind, K, budget = spec.split(":")
        rows += bench_config(policy, obs, kind, int(K), int(budget), args.bu_blocks, args)
    print_table(rows, ["sampler", "method", "ms", "speedup", "block_evals", "limit", "efficiency", "nmse",
                       "max_dev", "jerk_ratio", "ms_before", "speedup_before", "eff_before", "vs_naive_uncached"])
    write_json(args.json, {"benchmark": "cache", "model": label, "threads": torch.get_num_threads(),
                           "calls": args.calls, "observations": source, "bu_blocks": args.bu_blocks, "rows": rows})


def success_mode(args) -> None:
    """Success rate per cache spec on a simulated task, with polcache.sim's evaluator."""
    from polcache.policy import load_backend
    from polcache.sim import evaluate

    if not args.checkpoint:
        raise SystemExit("--success needs --checkpoint")
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.cache or ["none"]:
        backend = load_backend(args.checkpoint, cache=None if spec == "none" else spec, sampler=args.sampler,
                               steps=args.steps)
        result = evaluate(backend, args.success, args.episodes, args.seed)
        what = backend.describe()
        summary = what["cache"] or {"compute_limit": 1.0}
        lo, hi = result.ci95
        rows.append({"task": args.success, "sampler": f"{what['sampler'].upper()}-{what['steps']}",
                     "cache": spec, "success": round(result.success_rate, 3),
                     "ci95": f"{lo:.2f}-{hi:.2f}", "episodes": result.episodes, "limit": summary["compute_limit"],
                     "p50_ms": round(result.latency_ms["p50"], 1)})
        print(result.summary())
    print(f"{torch.get_num_threads()} thread(s)")
    print_table(rows, ["task", "sampler", "cache", "success", "ci95", "episodes", "limit", "p50_ms"])
    kind, K = what["sampler"], what["steps"]
    write_json(args.json.replace(".json", f"_success_{args.success}_{kind}{K}.json"),
               {"benchmark": "cache_success", "checkpoint": args.checkpoint, "sampler": kind, "steps": K,
                "threads": torch.get_num_threads(), "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: random-weight default DP-T)")
    ap.add_argument("--configs", default="ddpm:100:10,ddim:16:5", help="sampler:K:budget list")
    ap.add_argument("--bu-blocks", type=int, default=5)
    ap.add_argument("--samples", type=int, default=32, help="calibration observations")
    ap.add_argument("--deviation-obs", type=int, default=24, help="held-out observations for action deviation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive (before) executor timings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(RESULTS / "cache.json"))
    ap.add_argument("--success", metavar="TASK", help="success-rate mode on this simulated task")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--cache", action="append", help="success mode: cache spec to evaluate (repeatable)")
    ap.add_argument("--sampler", help="success mode: sampler (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, help="success mode: denoising steps (default: the checkpoint's)")
    args = ap.parse_args()
    success_mode(args) if args.success else timing_mode(args)


if __name__ == "__main__":
    main()
