"""Argument types shared by every subcommand, so bad numbers get the same one-line error."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import TYPE_CHECKING, Callable

from polcache.config import MAX_SEED, SAMPLER_KINDS
from polcache.errors import cut_short
from polcache.policy.loader import BACKENDS, MAX_CANDIDATES, PRECISIONS

if TYPE_CHECKING:
    from polcache.cli import OneLineParser


def _shown(value: str) -> str:
    """A value as typed, cut short (to fit argparse's usage line)."""
    return cut_short(value, 12, 4)


def _number(value: str, parse: type, ok, expected: str):
    """`value` parsed by `parse` (int or float) when `ok` of it, else the one-line argparse error."""
    try:
        x = parse(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(repr(value))}") from None
    # an int is always finite (math.isfinite of one beyond float's range raises OverflowError)
    if not (ok(x) and (isinstance(x, int) or math.isfinite(x))):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(value)}")
    return x


def positive_float(value: str) -> float:
    return _number(value, float, lambda x: x > 0, "a positive number")


def positive_int(value: str) -> int:
    return _number(value, int, lambda n: n >= 1, "a positive integer")


def batch_size(value: str) -> int:
    """Robots per inference: at most the robots a server serves at once (a typo like 1000 would have
    TensorRT build engines for batches that never come)."""
    from polcache.serve.server import DEFAULT_MAX_SESSIONS

    return _number(value, int, lambda n: 1 <= n <= DEFAULT_MAX_SESSIONS,
                   f"a batch size in 1..{DEFAULT_MAX_SESSIONS} (the most robots a server serves at once)")


def control_rate(value: str) -> float:
    """A robot's control rate in the range the protocol accepts (refused here, not at the handshake)."""
    from polcache_client.protocol import MAX_HZ, MIN_HZ

    return _number(value, float, lambda x: MIN_HZ <= x <= MAX_HZ, f"a rate in [{MIN_HZ:g}, {MAX_HZ:g}] Hz")


def image_size(value: str) -> int:
    """A rendered camera image's side: MuJoCo renders up to its offscreen buffer, and a policy's images are
    small (96 by default); a typo like 100000 would ask for a 30 GB frame."""
    return _number(value, int, lambda n: 1 <= n <= 4096, "an image side in 1..4096 pixels")


def image_height_width(value: str) -> tuple[int, int]:
    """HxW (e.g. 96x96, 240x320), or N for NxN as record's and sim-robot's --image-size: an image size to
    resize to, each side in 1..4096 pixels as image_size's."""
    m = re.fullmatch(r"([0-9]+)(?:[xX]([0-9]+))?", value)
    sides = (m.group(1), m.group(2) or m.group(1)) if m is not None else ()
    if not sides or not all(1 <= int(side) <= 4096 for side in sides):
        raise argparse.ArgumentTypeError(f"expected HxW, height x width in pixels (each 1..4096), e.g. 96x96 (or 96 "
                                         f"for a square), got {_shown(repr(value))}")
    return int(sides[0]), int(sides[1])


def thread_count(value: str) -> int:
    """Intra-op threads: at most this machine's CPUs (more only slow inference down, and a huge count
    crashes the OpenMP runtime)."""
    cpus = os.cpu_count() or 1
    return _number(value, int, lambda n: 1 <= n <= cpus, f"a thread count in 1..{cpus} (this machine's CPUs)")


def candidate_count(value: str) -> int:
    """Self-verification's candidate chunks: sampled as one batch, so a huge count runs out of memory
    once verification starts, mid-episode."""
    return _number(value, int, lambda n: 1 <= n <= MAX_CANDIDATES, f"a candidate count in 1..{MAX_CANDIDATES}")


def non_negative_int(value: str) -> int:
    """Seeds, step counts: gymnasium and numpy refuse negative seeds deep inside a run."""
    return _number(value, int, lambda n: n >= 0, "an integer >= 0")


def seed_int(value: str) -> int:
    """A seed, 0..2^63-1: a larger one failed deep inside a run (torch's generator, the backends'
    seed check), after the checkpoint had loaded."""
    return _number(value, int, lambda n: 0 <= n <= MAX_SEED, "a seed in 0..2^63-1")


def non_negative_float(value: str) -> float:
    """Finite: inf or nan as a tolerance, decay or delay would pass every check it meets."""
    return _number(value, float, lambda x: x >= 0, "a finite number >= 0")


def h264_crf(value: str) -> int:
    """H.264's constant rate factor (argparse's choices would list all 52 values in its error)."""
    return _number(value, int, lambda n: 0 <= n <= 51, "an H.264 quality 0..51")


def port(value: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one where the command allows it)."""
    return _number(value, int, lambda n: 0 <= n <= 65535, "a port number 0..65535")


def non_empty(value: str) -> str:
    """A name, host or path that an empty string would silently turn into a default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value, got ''")
    return value


def config_file(value: str) -> str:
    """An existing YAML file: '' would read as the current folder and a folder as "not found"."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a YAML config file, got ''")
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"expected a YAML config file, got the folder {value}")
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"config file not found: {value}")
    return value


def name_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of at least one name (cameras)."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return names


DEVICE_HELP = "compute device: cpu, cuda, cuda:N or auto (cuda when available, else cpu); default cpu"
FRESH_HELP = ("start from scratch; the previous run (last/, best/, train_log.jsonl) is moved into "
              "OUT/previous-<time>/")


def counted(n: float, noun: str) -> str:
    """'1 episode', '3 frames': a count (a float from the metrics too) with its noun."""
    return f"{n:.0f} {noun}{'' if round(n) == 1 else 's'}"


def add_progress_option(p: "OneLineParser") -> None:
    """--no-progress, said alike by every command with a progress bar."""
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")


def add_sampler_options(p: "OneLineParser") -> None:
    """How a policy is sampled, for every command that runs, calibrates or exports one."""
    p.add_argument("--sampler", choices=SAMPLER_KINDS, help="sampler (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, help="denoising steps K (default: the checkpoint's)")


def add_backend_options(p: "OneLineParser") -> None:
    """What runs the policy, for every command that loads one to act (eval, serve)."""
    p.add_argument("--backend", choices=BACKENDS, help="inference backend (default: torch for a "
                   "checkpoint, ort (ONNX Runtime) for an artifact from `polcache export`; trt: TensorRT engines "
                   "built from such an artifact, needs the tensorrt package and --device cuda)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_sampler_options(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="denoiser precision (torch: any; trt: fp32 or fp16; ort: fp32). Reduced precision must "
                        "match fp32 within --precision-tolerance on probe observations, else the backend refuses "
                        "to start")
    p.add_argument("--precision-tolerance", type=non_negative_float, metavar="X",
                   help="largest accepted max |action - fp32 action| of the median probe observation, in normalised "
                        "units (default 0.05)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="torch on CUDA: run chunks eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--verify", type=candidate_count, default=1, metavar="N",
                   help="self-verification (long-context policies): once the robot's executed actions cover the "
                        "past frames' steps, sample N candidate chunks and run the one whose predicted past "
                        "actions match the executed ones best (torch backend; over ZeroMQ the robot reports them "
                        f"with protocol version 2; default 1: off; at most {MAX_CANDIDATES})")
    p.add_argument("--verify-min-past", type=positive_int, metavar="M",
                   help="with --verify N > 1: score candidates once M of the past frames' steps have executed "
                        "actions (default: all of them, the paper's rule; fewer verifies earlier in an episode)")
    p.checks.append(_verify_min_past_needs_verify)


def given_only_with(flag: str, dest: str, other: str, other_dest: str) -> Callable[[argparse.Namespace], str | None]:
    """A parser check refusing `flag` (default None) given without `other`, which alone makes it count:
    accepted and ignored, it would look like a setting the run used."""
    def check(args: argparse.Namespace) -> str | None:
        if getattr(args, dest) is not None and not getattr(args, other_dest):
            return f"argument {flag}: applies with {other} only; give {other} with it"
        return None
    return check


def _verify_min_past_needs_verify(args: argparse.Namespace) -> str | None:
    """--verify-min-past alone would be silently ignored: without candidates nothing is scored."""
    if args.verify_min_past is not None and args.verify == 1:
        return (f"argument --verify-min-past: applies to self-verification only; give --verify N (N >= 2 "
                f"candidates) with it, got --verify-min-past {args.verify_min_past} and --verify 1")
    return None


def backend_options(args: argparse.Namespace) -> dict:
    """The load_backend keywords that add_backend_options parsed."""
    return {"backend": args.backend, "device": args.device, "sampler": args.sampler, "steps": args.steps,
            "precision": args.precision,
            "precision_tolerance": args.precision_tolerance, "graphs": not args.no_cuda_graphs,
            "candidates": args.verify, "min_verified": args.verify_min_past}
