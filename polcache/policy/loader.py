"""`load_backend`: one loader for every backend kind, so a command or an embedding program names
a checkpoint or an exported artifact and gets a `PolicyBackend`. Torch is imported only for a
checkpoint: an artifact runs on a robot computer with ONNX Runtime and numpy alone."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from polcache.errors import ConfigError, ExportError, PolcacheError
from polcache.policy.parity import DEFAULT_TOLERANCE
from polcache.policy.spec import PolicyBackend


MAX_CANDIDATES = 256  # self-verification's candidate chunks, sampled as one batch: 100000 ran out of memory


def check_options(steps: int | None, threads: int | None = None, precision_tolerance: float | None = None,
                  candidates: int = 1, min_verified: int | None = None) -> None:
    """Backend options a caller of the Python API may get wrong, refused before anything loads
    (a string or a fraction would otherwise fail later, deep inside loading or predict)."""
    for name, value, default in (("steps", steps, "the default"), ("threads", threads, "the default"),
                                 ("candidates", candidates, None), ("min_verified", min_verified, "all past frames")):
        if value is None and default is not None:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            none = f" (or None: {default})" if default is not None else ""
            raise ConfigError(f"{name}: expected an integer >= 1{none}, got {value!r}")
    if candidates > MAX_CANDIDATES:
        raise ConfigError(f"candidates: expected at most {MAX_CANDIDATES} (sampled as one batch), got {candidates}")
    tol = precision_tolerance
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf):
        raise ConfigError(f"precision_tolerance: expected a finite number >= 0 (normalised action units), got {tol!r}")


BACKENDS = ("torch", "ort", "trt")
PRECISIONS = ("fp32", "bf16", "fp16")  # the denoiser's (polcache.policy.precision)


def load_backend(checkpoint: str, cache: str | None = None, sampler: str | None = None, steps: int | None = None,
                 device: str = "cpu", backend: str | None = None, threads: int | None = None,
                 precision: str = "fp32", precision_tolerance: float | None = None, graphs: bool = True,
                 candidates: int = 1, min_verified: int | None = None, max_batch: int = 8) -> PolicyBackend:
    """Load a policy as a backend on `device` (cpu, cuda, cuda:N, auto).

    `checkpoint` is a checkpoint directory (backend "torch", the default for one) or an artifact
    written by `polcache export` (backend "ort", the default for one, or "trt"). For a checkpoint,
    `cache` names a schedule file or a baseline spec (see polcache.cache); for an artifact, `cache`,
    `sampler` and `steps` default to the exported ones and are refused if they differ from them.
    `threads`: ONNX Runtime intra-op threads (default: torch's thread count). `precision`: the
    denoiser's (torch: fp32|bf16|fp16; trt: fp32|fp16; ort: fp32), checked against fp32 within
    `precision_tolerance` before serving. `graphs`: CUDA graphs for the torch backend on a GPU.
    `candidates` > 1: self-verification (torch backend only), scored once `min_verified` past
    frames' steps have executed actions (default: all). `max_batch`: the most observations one call
    predicts (the TensorRT engines' batch profile, 1..max_batch; `polcache serve --max-batch`)."""
    check_options(steps, threads, precision_tolerance, candidates, min_verified)
    tolerance = DEFAULT_TOLERANCE if precision_tolerance is None else precision_tolerance
    path = Path(checkpoint)
    exported = (path / "manifest.json").is_file()
    kind = backend or ("ort" if exported else "torch")
    if kind not in BACKENDS:
        raise PolcacheError(f"unknown backend {kind!r}: expected {', '.join(BACKENDS)}")
    if kind == "trt":
        from polcache.export.trt_backend import require_tensorrt

        require_tensorrt()  # one line before anything else is checked
    if kind in ("ort", "trt"):
        if candidates > 1:
            raise PolcacheError(f"self-verification (--verify {candidates}) runs on the torch backend only")
        if not exported and (path / "model.safetensors").is_file():
            raise ExportError(f"{path} is a checkpoint, not an exported policy: run `polcache export --checkpoint "
                              f"{path} --format onnx --out DIR` (with the --cache/--sampler/--steps to run) and "
                              "pass DIR")
        if kind == "ort" and precision != "fp32":
            raise ExportError(f"--precision {precision}: the ONNX Runtime backend runs the exported fp32 graphs; "
                              "use --backend trt for fp16 engines or --backend torch for bf16/fp16")
        from polcache.export.manifest import check_request, read_manifest

        check_request(read_manifest(path, verify=False), str(path), cache, sampler, steps)
        if kind == "trt":
            from polcache.export.trt_backend import TrtBackend

            return TrtBackend(path, device=device, precision=precision, max_batch=max_batch,
                              precision_tolerance=tolerance)
        from polcache.export.ort_backend import OrtBackend

        return OrtBackend(path, device=device, threads=threads)
    from polcache.export.manifest import refuse_exported

    refuse_exported(path, "run it with --backend ort")
    from polcache.policy.backend import TorchBackend
    from polcache.policy.checkpoint import load_policy
    from polcache.policy.device import resolve_device

    device = resolve_device(device)
    policy, _, _ = load_policy(checkpoint, device)
    plan = None
    if cache is not None:
        from polcache.cache import resolve_plan  # lazily: caching is optional for plain inference

        sampler_obj = policy.sampler(sampler, steps)
        plan = resolve_plan(cache, policy, sampler_obj)
    return TorchBackend(policy, sampler, steps, plan, device, precision=precision, graphs=graphs,
                        precision_tolerance=tolerance, candidates=candidates, min_verified=min_verified)
