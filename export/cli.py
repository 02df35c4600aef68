"""`polcache export`: a checkpoint (+ sampler, step count, cache plan) as an ONNX artifact."""

from __future__ import annotations

import argparse

from polcache.cli_types import add_sampler_options, non_negative_float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint as ONNX graphs (cache plan inside) for ONNX Runtime",
                              description="Write an artifact directory (manifest.json + ONNX graphs) that "
                                          "`polcache eval/serve --backend ort --checkpoint DIR` and "
                                          "load_backend(DIR) run. The cache plan runs inside the step graph.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--cache", help="cache plan compiled into the graphs (as for eval: uniform:N, a schedule .json, "
                                   "bac:S:n@PATH.json ...; not threshold:T or +forecast)")
    add_sampler_options(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="artifact format (onnx)")
    p.add_argument("--step-graphs", choices=["if", "patterns"], default=None,
                   help="if: one step graph switching blocks with If nodes on the plan table (default); patterns: "
                        "one step graph per distinct update pattern of the plan")
    p.add_argument("--out", required=True, help="artifact directory to write (an earlier artifact there is replaced "
                                                "atomically; any other existing path is refused)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against torch")
    p.add_argument("--tolerance", type=non_negative_float, metavar="X",
                   help="largest max |ONNX Runtime - torch| of the median probe observation (normalised action units) "
                        "the parity check accepts; above it nothing is written to --out (default 0.05, as "
                        "--precision-tolerance)")
    p.checks.append(_tolerance_check)
    p.set_defaults(handler=_run)


def _tolerance_check(args: argparse.Namespace) -> str | None:
    if args.tolerance is not None and args.no_verify:  # the check it limits is skipped: accepted, it would mislead
        return "argument --tolerance: limits the parity check, which --no-verify skips; give one of them"
    return None


def _run(args: argparse.Namespace) -> int:
    from polcache.export import require_export_deps

    require_export_deps()
    from pathlib import Path

    from polcache.export.exporter import DEFAULT_STEP_MODE, check_artifact_output, export_policy
    from polcache.policy.checkpoint import load_policy
    from polcache.policy.parity import DEFAULT_TOLERANCE

    check_artifact_output(args.out, "--out")
    policy, _, _ = load_policy(args.checkpoint, "cpu")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    deviation: dict = {}
    m = export_policy(policy, args.out, cache=args.cache, sampler=args.sampler, steps=args.steps,
                      step_mode=args.step_graphs or DEFAULT_STEP_MODE, checkpoint=args.checkpoint,
                      tolerance=None if args.no_verify else tolerance, deviation=deviation)
    sizes = {name: (Path(args.out) / g.file).stat().st_size for name, g in m.graphs.items()}
    summary = m.cache["summary"]
    plan = "uncached" if summary is None else (f"{m.cache['spec']} ({summary['block_evals']} of "
                                               f"{summary['block_evals_uncached']} block evaluations)")
    print(f"exported {args.checkpoint} -> {args.out}: {m.sampler['kind']} K={m.sampler['steps']}, {plan}, "
          f"step mode {m.step_mode}, {len(m.graphs)} graphs, {sum(sizes.values()) / 1e6:.1f} MB, "
          f"{m.export_seconds:.1f} s")
    if deviation:
        print(f"verified: |ONNX Runtime - torch| = {deviation['median_abs']:.2e} on the median of {deviation['probes']} "
              f"probe observations, {deviation['max_abs']:.2e} on the worst, min cosine {deviation['min_cosine']:.6f} "
              f"(normalised actions, same noise; tolerance {tolerance:g})")
    return 0
