"""How much a schedule depends on the calibration draw: for several calibration seeds (each a
different set of observations and noise) and both ACS objectives, BAC's block evaluations and
its action deviation from uncached on one fixed set of held-out observations.

    python benchmarks/bench_calibration.py --checkpoint DIR [--seeds 0,1,2] [--budget 10] [--bu-blocks 5]
"""

from __future__ import annotations

import argparse

import torch

from common import RESULTS, print_table, write_json
from polcache.cache.calibrate import calibrate, calibration_observations
from polcache.cache.check import plan_deviation, sample_counted
from polcache.cache.schedule import OBJECTIVES, build_schedule, model_hash
from polcache.policy import load_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--budget", type=int, default=10)
    ap.add_argument("--bu-blocks", type=int, default=5)
    ap.add_argument("--samples", type=int, default=32, help="calibration observations per seed")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--deviation-obs", type=int, default=24)
    ap.add_argument("--json", default=str(RESULTS / "calibration.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, cfg, _ = load_policy(args.checkpoint)
    sampler = policy.sampler(args.sampler, args.steps)
    h = model_hash(policy)
    held_out, source = calibration_observations(policy, cfg, args.deviation_obs, 10_000, args.checkpoint)
    with torch.no_grad():
        feats = [policy.encode({k: v[i:i + 1] for k, v in held_out.items()}) for i in range(args.deviation_obs)]
        refs = [sample_counted(policy, f, sampler, None, seed=i)[0] for i, f in enumerate(feats)]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        obs, src = calibration_observations(policy, cfg, args.samples, seed, args.checkpoint)
        calib = calibrate(policy, sampler, obs, src, seed=seed)
        for objective in OBJECTIVES:
            plan = build_schedule(calib, "bac", args.budget, args.bu_blocks, True, h, sampler.kind, objective).to_plan()
            dev = plan_deviation(policy, feats, sampler, plan, refs)
            rows.append({"seed": seed, "objective": objective, "block_evals": int(dev["evals"]),
                         "limit": round(sampler.num_steps * len(policy.denoiser.blocks) / dev["evals"], 2),
                         "nmse": float(f"{dev['nmse']:.3g}")})
            print(rows[-1], flush=True)
    print(f"{args.checkpoint}, {sampler.kind.upper()}-{sampler.num_steps}, BAC S={args.budget} BU {args.bu_blocks}; "
          f"deviation on {args.deviation_obs} held-out observations ({source})")
    print_table(rows, ["seed", "objective", "block_evals", "limit", "nmse"])
    write_json(args.json, {"benchmark": "calibration", "checkpoint": args.checkpoint, "sampler": sampler.kind,
                           "steps": sampler.num_steps, "budget": args.budget, "bu_blocks": args.bu_blocks,
                           "held_out": source, "rows": rows})


if __name__ == "__main__":
    main()
