"""`polcache export`: a checkpoint (+ sampler, step count, cache plan) as an ONNX artifact."""

from __future__ import annotations

import argparse

from polcache.cli_types import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint as ONNX graphs (cache plan inside) for ONNX Runtime",
                              description="Write an artifact directory (manifest.json + ONNX graphs) that "
                                          "`polcache eval/serve --backend ort --checkpoint DIR` and "
                                          "load_backend(DIR) run. The cache plan runs inside the step graph.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--cache", help="cache plan compiled into the graphs (as for eval: uniform:N, a schedule .json, "
                                   "bac:S:n@PATH.json ...; not threshold:T or +forecast)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "flow"], help="sampler (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, help="denoising steps K (default: the checkpoint's)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="artifact format (onnx)")
    p.add_argument("--step-graphs", choices=["if", "patterns"], default=None,
                   help="if: one step graph switching blocks with If nodes on the plan table (default); patterns: "
                        "one step graph per distinct update pattern of the plan")
    p.add_argument("--out", required=True, help="artifact directory to write (an earlier artifact there is replaced "
                                                "atomically; any other existing path is refused)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against torch after export")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from polcache.export import require_export_deps

    require_export_deps()
    from pathlib import Path

    import numpy as np

    from polcache.export.exporter import DEFAULT_STEP_MODE, export_policy, plan_table, torch_reference
    from polcache.export.ort_backend import OrtBackend
    from polcache.policy.checkpoint import load_policy

    policy, _, _ = load_policy(args.checkpoint, "cpu")
    m = export_policy(policy, args.out, cache=args.cache, sampler=args.sampler, steps=args.steps,
                      step_mode=args.step_graphs or DEFAULT_STEP_MODE, checkpoint=args.checkpoint)
    sizes = {name: (Path(args.out) / g.file).stat().st_size for name, g in m.graphs.items()}
    summary = m.cache["summary"]
    plan = "uncached" if summary is None else (f"{m.cache['spec']} ({summary['block_evals']} of "
                                               f"{summary['block_evals_uncached']} block evaluations)")
    print(f"exported {args.checkpoint} -> {args.out}: {m.sampler['kind']} K={m.sampler['steps']}, {plan}, "
          f"step mode {m.step_mode}, {len(m.graphs)} graphs, {sum(sizes.values()) / 1e6:.1f} MB, "
          f"{m.export_seconds:.1f} s")
    if not args.no_verify:
        backend = OrtBackend(args.out, threads=1)
        rng = np.random.default_rng(0)
        obs = {k: (rng.integers(0, 256, (1, backend.spec.n_obs_steps, *s.shape)) if s.dtype == "uint8"
                   else rng.normal(size=(1, backend.spec.n_obs_steps, *s.shape))).astype(s.dtype)
               for k, s in backend.spec.obs.items()}
        x, noise = backend.initial_noise(1, seed=0)
        smp = policy.sampler(args.sampler, args.steps)
        plan_obj, _ = plan_table(policy, smp, args.cache)
        ref = torch_reference(policy, obs, smp, plan_obj, x, noise)
        diff = float(np.abs(backend.sample(obs, x, noise) - ref).max())
        print(f"verified: max |ONNX Runtime - torch| = {diff:.2e} over one chunk (random observations, normalised "
              f"actions, same noise)")
    return 0
