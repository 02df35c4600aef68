"""One action chunk on a GPU: eager, CUDA graph, graph + BAC, torch.compile, bf16, side by side.

Default-size DP-T (8 layers, width 256, 24 blocks), random weights, batch 1, end to end through
`TorchBackend.predict` (observation upload, noise, chunk, actions back to the host). Per sampler
configuration (DDPM-100 with BAC S=10, DDIM-16 with BAC S=5; Bubbling Union over 5 blocks,
error-bound objective, calibrated on the device at the start) and per executor:

    authors      conditioning memory and K/V recomputed every step + diffusers' scheduler.step
                 (the executor of benchmarks/bench_cache.py, the BAC authors' style), eager
    eager        polcache's executor without graphs
    graph        the whole chunk replayed as one CUDA graph (polcache.policy.graph)
    graph+fused  the same with the sampler update compiled into one kernel (Sampler.fused)
    +norm        each residual add fused with the next LayerNorm in one Triton kernel
                 (polcache.policy.residual_norm; eager+norm shows its kernel count)
    compile      each block compiled with torch.compile (inductor), then captured the same way
    bf16         the graph with a bf16 denoiser, with its deviation from fp32 (same noise)
    bf16+fused   both (and bf16+fused+norm all three)

each uncached ("none") and with the BAC plan. Columns: median and p99 ms per chunk, speedup over
the eager uncached chunk, speedup over the authors' executor running the same plan, the sustained
control rate (chunks per second back to back x actions executed per chunk), CUDA kernels per
denoising step of the eager chunk, and bf16's action deviation. Methods are timed round-robin.

    python benchmarks/bench_gpu.py [--calls 50] [--json benchmarks/results/gpu.json]
    python benchmarks/bench_gpu.py --device cpu --quick     # the script's own smoke test
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback

import numpy as np
import torch

from bench_cache import naive_sample
from bench_denoiser import default_policy
from common import RESULTS, print_table, round_robin, write_json
from polcache.cache import plan_summary
from polcache.cache.calibrate import calibrate
from polcache.cache.schedule import build_schedule, model_hash
from polcache.policy.backend import TorchBackend
from polcache.policy.device import resolve_device

OBS_DIM = 39
NO_GATE = 1e9  # bf16 rows are measured whatever their deviation, which the table reports
ANATOMY = ("graph+fused+norm", "bf16+fused+norm")  # the default executors: where a chunk's time goes


def bac_plan(policy, kind: str, K: int, budget: int, bu_blocks: int, device) -> tuple:
    sampler = policy.sampler(kind, K)
    g = torch.Generator().manual_seed(0)
    obs = {"state": torch.randn(8, policy.cfg.n_obs_steps, OBS_DIM, generator=g).to(device)}
    t0 = time.perf_counter()
    calib = calibrate(policy, sampler, obs, "random states", batch_size=8, seed=0, sensitivity_samples=4)
    plan = build_schedule(calib, "bac", budget, bu_blocks, True, model_hash(policy), kind, "error-bound").to_plan()
    return plan, time.perf_counter() - t0


def compiled_copy(policy):
    """The policy with every block's forward compiled by inductor (CUDA graphs are ours, not inductor's)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(policy.denoiser.blocks))
    fast = copy.deepcopy(policy)
    for blk in fast.denoiser.blocks:
        blk.forward = torch.compile(blk.forward, dynamic=False)
    return fast


def authors_fn(policy, kind: str, K: int, plan, obs: dict, device):
    def fn():
        with torch.no_grad():
            batch = {k: torch.as_tensor(v).to(device) for k, v in obs.items()}
            gen = torch.Generator(device=device).manual_seed(0)
            x = naive_sample(policy, policy.encode(batch), kind, K, plan, gen)
            return policy.to_actions(x)["action"].cpu().numpy()
    return fn


def kernels_per_step(fn, K: int) -> tuple[float | None, list]:
    """CUDA kernels launched by one eager chunk, per denoising step, and the most frequent names."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None, []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.count for e in kernels)
    top = sorted(((e.count, e.key[:80]) for e in kernels), reverse=True)[:12]
    return round(total / K, 1), top


def one_step_kernels(policy, kind: str, K: int, device) -> list[str]:
    """The CUDA kernels of one uncached eager denoising step plus its sampler update, in launch
    order: what a further fusion would have to remove."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return []
    sampler = policy.sampler(kind, K)
    with torch.no_grad():
        feats = policy.encode({"state": torch.zeros(1, policy.cfg.n_obs_steps, OBS_DIM, device=device)})
        ctx = policy.denoiser.prepare_chunk(feats, sampler.timesteps)
        x, noise = policy.initial_noise(1, sampler, None, device)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = policy.denoiser.step(x, 1, ctx)
            sampler.update(1, x, out, None if noise is None else noise[1])
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name[:60] for e in sorted(events, key=lambda e: e.time_range.start)]


def chunk_anatomy(fn) -> dict | None:
    """Where one chunk's wall time goes: the sum of its CUDA kernels' durations (the device
    computing), the span from the first kernel's start to the last one's end (computing plus the
    gaps between dependent kernels), and the rest of the wall time (host work: observation checks,
    upload, launch, read-back). Says whether fewer or faster kernels, or less host work, would pay."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0]
    if not kernels:
        return None
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
    return {"kernels": len(kernels), "busy_ms": round(busy, 3), "span_ms": round(span, 3),
            "wall_ms": round(wall * 1e3, 3), "host_ms": round(wall * 1e3 - span, 3)}


def time_methods(fns: dict, calls: int, warmup: int, sustain_s: float) -> dict:
    times = round_robin(fns, calls, warmup)
    out = {}
    for name, fn in fns.items():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < sustain_s:
            fn()
            n += 1
        ts = np.asarray(times[name]) * 1e3
        out[name] = {"ms": float(np.median(ts)), "p99": float(np.percentile(ts, 99)),
                     "chunks_per_s": n / (time.perf_counter() - t0)}
    return out


def bench_config(policy, fast, kind: str, K: int, budget: int, args, device) -> list[dict]:
    plan, calib_s = bac_plan(policy, kind, K, budget, args.bu_blocks, device)
    summary = plan_summary(plan)
    print(f"{kind.upper()}-{K}: BAC S={budget} BU {args.bu_blocks} calibrated in {calib_s:.1f} s, "
          f"{summary['block_evals']} of {summary['block_evals_uncached']} block evaluations", flush=True)
    g = np.random.default_rng(1)
    obs = {"state": g.normal(size=(1, policy.cfg.n_obs_steps, OBS_DIM)).astype(np.float32)}
    plans = {"none": None, "bac": plan}
    backends, fns, info = {}, {}, {}
    for pname, p in plans.items():
        fns[("authors", pname)] = authors_fn(policy, kind, K, p, obs, device)
        plain = dict(fused_norm=False)
        variants = [("eager", policy, dict(graphs=False)), ("graph", policy, dict(fused_update=False, **plain)),
                    ("graph+fused", policy, dict(fused_update=True, **plain)),
                    ("eager+norm", policy, dict(graphs=False, fused_norm=True)),
                    ("graph+fused+norm", policy, dict(fused_update=True, fused_norm=True)),
                    ("bf16", policy, dict(precision="bf16", precision_tolerance=NO_GATE, fused_update=False,
                                          **plain)),
                    ("bf16+fused", policy, dict(precision="bf16", precision_tolerance=NO_GATE,
                                                fused_update=True, **plain)),
                    ("bf16+fused+norm", policy, dict(precision="bf16", precision_tolerance=NO_GATE,
                                                     fused_update=True, fused_norm=True))]
        if fast is not None:
            variants.append(("compile", fast, dict(fused_update=False, **plain)))
        for ename, pol, kw in variants:
            if args.executors and ename not in args.executors:
                continue
            try:
                t0 = time.perf_counter()
                b = TorchBackend(pol, kind, K, p, device=device, **kw)
                b.warmup()
                backends[(ename, pname)] = b
                fns[(ename, pname)] = lambda b=b: b.predict(obs, seed=0)
                info[(ename, pname)] = {"setup_s": round(time.perf_counter() - t0, 1), **b.describe()}
            except Exception as e:  # one broken row must not cost the GPU run
                traceback.print_exc()
                info[(ename, pname)] = {"error": f"{type(e).__name__}: {e}"}
    with torch.no_grad():
        res = time_methods(fns, args.calls, args.warmup, args.sustain)
    kern = {}
    for ename in ("eager", "eager+norm"):
        for pname in plans:
            if (ename, pname) in backends:
                kern[(ename, pname)] = kernels_per_step(fns[(ename, pname)], K)
    step_kernels = one_step_kernels(policy, kind, K, device)
    anatomy = {key: chunk_anatomy(fns[key]) for key in backends if key[0] in ANATOMY}
    n_act = policy.cfg.n_action_steps
    base = res.get(("eager", "none"), {}).get("ms")  # absent when the eager row failed: no speedup column then
    rows = []
    for (ename, pname), r in sorted(res.items(), key=lambda kv: (kv[0][1], list(plans).index(kv[0][1]))):
        meta = info.get((ename, pname), {})
        row = {"sampler": f"{kind.upper()}-{K}", "executor": ename,
               "cache": "none" if pname == "none" else f"bac:{budget}:{args.bu_blocks}",
               "ms": round(r["ms"], 2), "p99_ms": round(r["p99"], 2),
               "vs_authors": round(res[("authors", pname)]["ms"] / r["ms"], 2),
               "control_hz": round(r["chunks_per_s"] * n_act, 1),
               "block_evals": summary["block_evals"] if pname == "bac" else summary["block_evals_uncached"]}
        if base is not None:  # a NaN here would also make the JSON invalid
            row["speedup"] = round(base / r["ms"], 2)
        if (ename, pname) in kern:
            row["kernels_per_step"] = kern[(ename, pname)][0]
            row["top_kernels"] = kern[(ename, pname)][1]
            if (ename, pname) == ("eager", "none"):
                row["step_kernels"] = step_kernels
        if anatomy.get((ename, pname)):
            row["anatomy"] = anatomy[(ename, pname)]
        if meta.get("parity"):
            row["bf16_median_abs"] = float(f"{meta['parity']['median_abs']:.3g}")  # what the gate judges
            row["bf16_max_abs"] = float(f"{meta['parity']['max_abs']:.3g}")
            row["bf16_min_cos"] = round(meta["parity"]["min_cosine"], 4)
        if "setup_s" in meta:
            row["setup_s"] = meta["setup_s"]
        rows.append(row)
    for key, meta in info.items():
        if "error" in meta:
            rows.append({"sampler": f"{kind.upper()}-{K}", "executor": key[0], "cache": key[1], "error": meta["error"]})
    order = ["authors", "eager", "eager+norm", "graph", "graph+fused", "graph+fused+norm", "compile", "bf16",
             "bf16+fused", "bf16+fused+norm"]
    rows.sort(key=lambda r: (r["cache"] != "none", order.index(r["executor"])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="ddpm:100:10,ddim:16:5", help="kind:K:S,...")
    ap.add_argument("--bu-blocks", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sustain", type=float, default=1.0, help="seconds of back-to-back chunks per method")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--executors", type=lambda v: set(v.split(",")), default=None,
                    help="only these executor rows (comma list; the authors' executor always runs)")
    ap.add_argument("--quick", action="store_true", help="2-layer model, few calls: a smoke test of the script")
    ap.add_argument("--json", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.quick:
        from polcache.config import PolicyConfig

        args.calls, args.sustain, args.configs = 3, 0.05, "ddpm:20:4,ddim:8:3"
    policy = default_policy(cfg=PolicyConfig(n_layers=2, width=64) if args.quick else None).to(device).eval()
    fast = None
    if not args.no_compile and device.type == "cuda":
        fast = compiled_copy(policy)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, default DP-T ({len(policy.denoiser.blocks)} blocks), "
          f"random weights, batch 1, fp32 unless bf16; medians of {args.calls} calls round-robin", flush=True)
    rows = []
    for spec in args.configs.split(","):
        kind, K, budget = spec.split(":")
        rows += bench_config(policy, fast, kind, int(K), int(budget), args, device)
        print_table(rows, ["sampler", "executor", "cache", "ms", "p99_ms", "speedup", "vs_authors", "control_hz",
                           "block_evals", "kernels_per_step", "bf16_median_abs", "bf16_max_abs", "bf16_min_cos",
                           "setup_s", "error"])
        for r in rows:
            if r.get("anatomy"):
                a = r["anatomy"]
                print(f"  {r['sampler']} {r['executor']} {r['cache']}: {a['kernels']} kernels, device busy "
                      f"{a['busy_ms']} ms, first to last kernel {a['span_ms']} ms, wall {a['wall_ms']} ms "
                      f"(host {a['host_ms']} ms), profiled")
        write_json(args.json, {"benchmark": "gpu", "device": name, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "calls": args.calls, "rows": rows})


if __name__ == "__main__":
    main()
