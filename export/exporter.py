"""Export a policy (checkpoint + sampler + step count + cache plan) as an ONNX artifact.

The cache plan is resolved with the same `--cache` grammar as the torch backend
(`polcache.cache.resolve_plan`) and compiled into the step graph. Plans decided at run time
(threshold caching: GATE ops) or extrapolating deltas (FORECAST) are refused: they run in
the torch backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

import polcache
from polcache.atomic import atomic_directory
from polcache.errors import ExportError
from polcache.outputs import check_output, json_kind
from polcache.export.manifest import FORMAT, MANIFEST, GraphEntry, Manifest, schedule_digest, schedule_parts, sha256_file
from polcache.policy.checkpoint import trained_tasks
from polcache.export.onnx_graphs import (OPSET, STEP_MODES, assemble_step, dims, io_description, trace_encoder,
                                         trace_pieces)
from polcache.policy.ops import COMPUTE, FORECAST, GATE
from polcache.policy.parity import DEFAULT_TOLERANCE, check_parity
from polcache.policy.policy import DiffusionPolicy

DEFAULT_STEP_MODE = "if"


def plan_table(policy: DiffusionPolicy, sampler, cache: str | None):
    """(plan or None, (K, n_blocks) bool compute table) for a --cache spec; refuses plans that an
    exported graph cannot run."""
    K, n = sampler.num_steps, len(policy.denoiser.blocks)
    if not cache or cache.strip() == "none":
        return None, np.ones((K, n), dtype=bool)
    from polcache.cache import resolve_plan

    plan = resolve_plan(cache, policy, sampler)
    table = plan.table()
    if (table == GATE).any():
        raise ExportError(f"--cache {cache}: the threshold cache decides at run time which blocks to compute (GATE "
                          "ops), which exported graphs do not do; run it with --backend torch, or export a static "
                          "plan (uniform:N, a schedule .json)")
    if (table == FORECAST).any():
        raise ExportError(f"--cache {cache}: forecasting (+forecast) is not exported; run it with --backend torch, "
                          "or export the plan without +forecast")
    compute = table == COMPUTE
    if not compute[0].all():
        raise ExportError(f"--cache {cache}: step 0 must compute every block (stored deltas start empty)")
    return plan, compute


def _schedule_sha(cache: str | None) -> str | None:
    path = schedule_parts(cache)[1] if cache else None
    return schedule_digest(path) if path is not None and path.is_file() else None


def check_artifact_output(out: str | Path, flag: str | None = None) -> Path:
    """Refuse, before any work, an --out that is not an earlier artifact: one is replaced whole,
    anything else is not ours (see check_output)."""
    return check_output(out, f"an exported policy (with {MANIFEST})", folder=True,  # a folder whose manifest.json
                        ours=lambda p: json_kind(p / MANIFEST, FORMAT), flag=flag, error=ExportError, whole=True)  # is another's: not ours


def export_policy(policy: DiffusionPolicy, out: str | Path, cache: str | None = None, sampler: str | None = None,
                  steps: int | None = None, step_mode: str = DEFAULT_STEP_MODE, checkpoint: str = "",
                  tolerance: float | None = DEFAULT_TOLERANCE, deviation: dict | None = None) -> Manifest:
    """Write the artifact directory `out` (atomically) and return its manifest. Before the artifact
    replaces `out` it is checked against the torch policy (`parity`, as `polcache export` does): where
    its median probe differs by more than `tolerance`, ExportError is raised and `out` is left as it
    was, so graphs that act differently from the policy are never written. tolerance=None skips the
    check. `deviation`, where given, receives the difference measured (chunk_deviation's keys)."""
    from polcache.cache import plan_summary
    from polcache.cache.schedule import model_hash

    if step_mode not in STEP_MODES:
        raise ExportError(f"unknown step mode {step_mode!r}: expected one of {', '.join(STEP_MODES)}")
    if policy.host_step is not None:
        raise ExportError(f"cannot export this policy: {policy.host_step}; serve it with the torch backend")
    out = check_artifact_output(out)
    t0 = time.perf_counter()
    was_training, device = policy.training, next(policy.parameters()).device
    policy = policy.cpu().eval()  # in place (a module's .cpu()): the caller's policy goes back below
    try:  # eval mode through the parity check too: dropout would make torch's reference random
        smp = policy.sampler(sampler, steps)
        plan, compute = plan_table(policy, smp, cache)
        encoder = trace_encoder(policy)
        pieces = trace_pieces(policy, smp)
        graphs: dict[str, onnx.ModelProto] = {"encoder": encoder}
        pattern_of_step: list[int] = []
        if step_mode == "if":
            graphs["step"] = assemble_step(pieces, compute=compute)
        else:
            patterns: dict[tuple, int] = {}
            for row in compute.tolist():
                pattern_of_step.append(patterns.setdefault(tuple(row), len(patterns)))
            for row, j in patterns.items():
                graphs[f"step_p{j}"] = assemble_step(pieces, pattern=row, name=f"polcache_step_p{j}")
        for name, model in graphs.items():
            try:
                onnx.checker.check_model(model, full_check=True)
            except onnx.checker.ValidationError as exc:  # a bug here, not a user error: keep the detail
                raise RuntimeError(f"exported graph {name} fails onnx.checker: {exc}") from exc
        action = policy.normalizer.stats("action")
        entries = {}
        with atomic_directory(out) as tmp:
            tmp.mkdir()
            for name, model in graphs.items():
                f = tmp / f"{name}.onnx"
                f.write_bytes(model.SerializeToString())
                entries[name] = GraphEntry(file=f.name, sha256=sha256_file(f), opset=OPSET, **io_description(model))
            manifest = Manifest(
                spec=policy.spec.to_dict(),
                model={"hash": model_hash(policy), "checkpoint": str(checkpoint), "block_names":
                       policy.denoiser.block_names, **dims(policy), **trained_tasks(checkpoint)},
                sampler={"kind": smp.kind, "steps": smp.num_steps, "clip_sample": bool(smp.clip_sample),
                         "needs_noise": bool(smp.needs_noise), "timesteps": smp.timesteps.tolist(),
                         **{c: getattr(smp, c).tolist() for c in "abcdes"}},
                cache={"spec": cache.strip() if cache else "none", "schedule_sha256": _schedule_sha(cache),
                       "summary": plan_summary(plan) if plan is not None else None,
                       "table": compute.astype(int).tolist()},
                normalizer={"action": {"scale": action["scale"].tolist(), "offset": action["offset"].tolist()}},
                graphs=entries, step_mode=step_mode, pattern_of_step=pattern_of_step,
                polcache_version=_code_version(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                export_seconds=round(time.perf_counter() - t0, 3))
            (tmp / MANIFEST).write_text(manifest.sealed_json())
            if tolerance is not None:
                measured = parity(policy, tmp, smp, plan)
                if deviation is not None:
                    deviation.update(measured)
                check_parity(measured, "the exported policy (ONNX Runtime)", tolerance, reference="torch",
                             error=ExportError, remedy=f"nothing was written to {out}; serve the policy with the torch "
                                                       "backend, or raise the tolerance (--tolerance) knowingly")
    finally:
        policy.to(device).train(was_training)
    return manifest


def _code_version() -> str:
    try:
        from polcache.policy.checkpoint import code_version

        return code_version()
    except Exception:  # noqa: BLE001 - a version string is never worth failing an export for
        return polcache.__version__


@torch.no_grad()
def torch_reference(policy: DiffusionPolicy, obs: dict[str, np.ndarray], sampler, plan, x: np.ndarray,
                    noise: np.ndarray | None) -> np.ndarray:
    """The torch policy's normalised sample from the same start and noise (for parity checks)."""
    feats = policy.encode({k: torch.as_tensor(v) for k, v in obs.items()})
    xs = policy.denoise(feats, sampler, torch.as_tensor(x), None if noise is None else torch.as_tensor(noise), plan)
    return xs.float().numpy()


def parity(policy: DiffusionPolicy, artifact: str | Path, sampler, plan) -> dict:
    """How far the artifact's normalised chunks are from torch's (polcache.policy.parity), on
    the precision gate's probe observations (inside the training data's state range, random pixels)
    with the same start and noise, so one tolerance means the same thing for both gates."""
    from polcache.export.ort_backend import OrtBackend
    from polcache.policy.parity import PROBES, chunk_deviation
    from polcache.policy.precision import probe_observations

    backend = OrtBackend(artifact, threads=1)
    obs = {k: v.numpy() for k, v in probe_observations(policy, PROBES).items()}
    x, noise = backend.initial_noise(PROBES, seed=0)
    return chunk_deviation(torch_reference(policy, obs, sampler, plan, x, noise), backend.sample(obs, x, noise))
