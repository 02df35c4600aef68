"""Argument types shared by every subcommand, so bad numbers get the same one-line error."""

from __future__ import annotations

import argparse


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x != x or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


DEVICE_HELP = "compute device: cpu, cuda, cuda:N or auto (cuda when available, else cpu); default cpu"


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return x


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """What runs the policy, for every command that loads one to act (eval, serve)."""
    p.add_argument("--backend", choices=["torch", "ort", "trt"], help="inference backend (default: torch for a "
                   "checkpoint, ort (ONNX Runtime) for an artifact from `polcache export`; trt: TensorRT engines "
                   "built from such an artifact, needs the tensorrt package and --device cuda)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="denoiser precision (torch: any; trt: fp32 or fp16; ort: fp32). Reduced precision must "
                        "match fp32 within --precision-tolerance on probe observations, else the backend refuses "
                        "to start")
    p.add_argument("--precision-tolerance", type=non_negative_float, metavar="X",
                   help="largest accepted max |action - fp32 action| of the median probe observation, in normalised "
                        "units (default 0.05)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="torch on CUDA: run chunks eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--verify", type=positive_int, default=1, metavar="N",
                   help="self-verification (long-context policies): once the robot's executed actions cover the "
                        "past frames' steps, sample N candidate chunks and run the one whose predicted past "
                        "actions match the executed ones best (torch backend; over ZeroMQ the robot reports them "
                        "with protocol version 2; default 1: off)")
    p.add_argument("--verify-min-past", type=positive_int, metavar="M",
                   help="score candidates once M of the past frames' steps have executed actions (default: all "
                        "of them, the paper's rule; fewer verifies earlier in an episode)")


def backend_options(args: argparse.Namespace) -> dict:
    """The load_backend keywords that add_backend_options parsed."""
    return {"backend": args.backend, "device": args.device, "precision": args.precision,
            "precision_tolerance": args.precision_tolerance, "graphs": not args.no_cuda_graphs,
            "candidates": args.verify, "min_verified": args.verify_min_past}
