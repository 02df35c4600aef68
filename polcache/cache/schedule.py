"""Schedules: per-block update steps, stored as a versioned JSON file and compiled to a plan.

A schedule says, for every named block, at which denoising steps it recomputes its delta;
at every other step the block reuses (or forecasts) its last delta. It records what it is
only valid for -- the model (a hash of config, weights and normaliser) and the sampler
with its step count K -- plus the budget, the Bubbling Union size and the calibration it
was solved from, so other ACS variants can be re-solved from the file without rerunning
the model. `to_plan` turns it into the (K, n_blocks) op table that the torch executor,
ONNX Runtime and TensorRT all read: an exported denoiser exposes each block (or each run of
blocks between cached ones) and the host follows `Plan.table()` row by row -- compute and
keep the delta, add the kept delta, or add last + slope * (k - k_last) -- so no plan logic
lives inside the exported graph.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polcache.atomic import atomic_write_text
from polcache.config import SAMPLER_KINDS
from polcache.cache.acs import acs_score, solve_acs
from polcache.cache.bubbling import bubbling_union, legacy_layer_kind, top_blocks
from polcache.cache.errors import CacheError
from polcache.errors import cut_short
from polcache.cache.spec import ACS_METHODS, OBJECTIVES
from polcache.jsonfile import read_json_object
from polcache.policy.blocks import FFN
from polcache.policy.executor import COMPUTE, REUSE, Plan
from polcache.cache.protocol import CacheTarget
from polcache.cache.schedule_keys import check_schedule_keys
from polcache.policy.samplers import Sampler

FORMAT = "polcache-cache-schedule"
VERSION = 2  # 2 added the objective, squared distances and sensitivities; version 1 files read as "similarity"
METHODS = ACS_METHODS  # ACS + Bubbling Union, per-block ACS, one ACS for all blocks
# What ACS maximises per block: "similarity" -- the cosine similarity kept (the paper); "error-bound" --
# minus the first-order bound on the action error, sum over steps t of
# sqrt(sensitivity[t]) * ||delta[start] - delta[t]||, which ignores steps whose errors cannot reach
# the actions and spends updates where they do. Up to a constant per block: `distance` is per element,
# so the bound's factor sqrt(delta size) drops out (ACS ranks one block's steps; the value is no bound).
# (Named in polcache.cache.spec, with the spec grammar.)


@dataclass
class Calibration:
    """Statistics of uncached sampling on calibration observations, per block (model order)."""

    block_names: list[str]
    similarity: np.ndarray  # (n_blocks, K, K): mean over samples of cos(delta at step a, delta at step t)
    l1: np.ndarray  # (n_blocks,): mean pairwise L1 distance (per element) of a block's deltas across steps
    samples: int
    source: str
    seed: int
    distance: np.ndarray | None = None  # (n_blocks, K, K): mean per-element squared distance of the deltas
    sensitivity: np.ndarray | None = None  # (n_blocks, K): see polcache.cache.sensitivity
    layer_kind: list[tuple[int, str]] | None = None  # per block, from the model's Blocks (None: parsed, legacy)

    def __post_init__(self) -> None:
        if self.layer_kind is None:
            self.layer_kind = [legacy_layer_kind(n) for n in self.block_names]
        self.layer_kind = [(int(layer), str(kind)) for layer, kind in self.layer_kind]

    @property
    def steps(self) -> int:
        return int(self.similarity.shape[-1])

    def objective_matrix(self, objective: str) -> np.ndarray:
        """(n_blocks, K, K) scores for ACS: entry [i, a, t] is what serving step t with block i's
        delta from step a keeps (higher is better)."""
        if objective == "similarity":
            return self.similarity
        if objective != "error-bound":
            raise CacheError(f"unknown schedule objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.distance is None or self.sensitivity is None:
            raise CacheError("the error-bound objective needs the calibration's distances and sensitivities "
                             "(recalibrate with this version, or use the similarity objective)")
        return -np.sqrt(np.clip(self.sensitivity[:, None, :] * self.distance, 0.0, None))

    def to_json(self) -> dict:
        d = {"source": self.source, "samples": self.samples, "seed": self.seed,
             "l1": dict(zip(self.block_names, np.round(self.l1, 8).tolist())),
             "similarity": np.round(self.similarity, 6).tolist()}
        if self.distance is not None:
            d["distance"] = _significant(self.distance).tolist()
        if self.sensitivity is not None:
            d["sensitivity"] = _significant(self.sensitivity).tolist()
        return d

    @classmethod
    def from_json(cls, d: dict, block_names: list[str]) -> "Calibration":
        """The calibration a schedule file holds; ValueError naming a field that is missing, not one
        score per block, not finite, or negative where scores cannot be (a schedule is re-solved from
        them: `bac:S:n@FILE`)."""
        def scores(key: str, non_negative: bool) -> np.ndarray:
            try:
                a = np.asarray(d[key], dtype=np.float64)
            except (TypeError, ValueError):  # text, ragged rows: said as this field's, like every other damage
                a = np.array([np.nan])
            if a.ndim < 1 or len(a) != len(block_names) or not np.isfinite(a).all() or (non_negative and (a < 0).any()):
                raise ValueError(f"calibration.{key} must hold one row of finite{' non-negative' if non_negative else ''} "
                                 f"scores per block ({len(block_names)})")
            return a

        for key in ("similarity", "l1", "samples", "source", "seed"):
            if key not in d:
                raise ValueError(f"calibration lacks {key!r}")
        missing = [n for n in block_names if n not in d["l1"]]
        if missing:
            raise ValueError(f"calibration.l1 lacks block {missing[0]!r}")
        d = {**d, "l1": [d["l1"][n] for n in block_names]}
        return cls(block_names=list(block_names), similarity=scores("similarity", False), l1=scores("l1", True),
                   samples=int(d["samples"]), source=str(d["source"]), seed=int(d["seed"]),
                   distance=scores("distance", True) if "distance" in d else None,
                   sensitivity=scores("sensitivity", True) if "sensitivity" in d else None)


def _significant(a: np.ndarray, digits: int = 5) -> np.ndarray:
    """Round to `digits` significant digits (values span many decades; fixed decimals would zero them)."""
    return np.asarray([float(f"{v:.{digits}g}") for v in np.ravel(a)]).reshape(np.shape(a))


@dataclass
class Schedule:
    method: str
    model_hash: str
    sampler: str
    steps: int  # K
    budget: int  # S: update steps per block chosen by ACS (plus the last step with force_last)
    bu_blocks: int  # n: blocks widened by Bubbling Union (0 unless method is bac)
    force_last: bool
    update_steps: dict[str, list[int]]  # block name -> sorted update steps, in model block order
    calibration: Calibration
    objective: str = "similarity"  # one of OBJECTIVES
    family: str = "dp-t"  # the policy family calibrated (files from before families existed: DP-T)
    bu_selected: list[str] = field(default_factory=list)
    created: str = ""
    code_version: str = ""

    @property
    def block_evals(self) -> int:
        return sum(len(s) for s in self.update_steps.values())

    def kept_similarity(self) -> dict[str, float]:
        """Per block: mean over steps of the similarity between the delta used and the true one."""
        sim = self.calibration.similarity
        return {n: acs_score(sim[i], s) / self.steps for i, (n, s) in enumerate(self.update_steps.items())}

    def to_plan(self) -> Plan:
        """The (K, n_blocks) op table: COMPUTE at a block's update steps, REUSE elsewhere."""
        sets = [set(s) for s in self.update_steps.values()]
        ops = tuple(tuple(COMPUTE if k in s else REUSE for s in sets) for k in range(self.steps))
        return Plan(ops, method=self.method)


def model_hash(policy: CacheTarget) -> str:
    """sha256 of what decides the model's outputs: identity (config, keys, shapes), weights and normaliser."""
    h = hashlib.sha256()
    h.update(json.dumps(policy.identity(), sort_keys=True).encode())
    tensors = dict(policy.state_dict())
    tensors.update({f"normalizer.{k}": v for k, v in policy.normalizer.state_dict().items()})
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def build_schedule(calibration: Calibration, method: str, budget: int, bu_blocks: int, force_last: bool,
                   model: str, sampler: str, objective: str = "similarity", family: str = "dp-t") -> Schedule:
    """Solve ACS per block (or once on the mean scores for `unified`) on the objective's scores,
    then Bubbling Union for `bac`."""
    if method not in METHODS:
        raise CacheError(f"unknown schedule method {method!r}: expected one of {', '.join(METHODS)}")
    names, sim = calibration.block_names, calibration.objective_matrix(objective)
    if method == "unified":
        steps = [solve_acs(sim.mean(axis=0), budget, force_last)] * len(names)
    else:
        steps = [solve_acs(sim[i], budget, force_last) for i in range(len(names))]
    selected: list[int] = []
    if method == "bac":
        selected = top_blocks(calibration.l1, bu_blocks)
        steps = bubbling_union(steps, calibration.layer_kind, selected)
    return Schedule(method=method, model_hash=model, sampler=sampler, steps=calibration.steps, budget=int(budget),
                    bu_blocks=int(bu_blocks) if method == "bac" else 0, force_last=bool(force_last),
                    update_steps={n: list(s) for n, s in zip(names, steps)}, calibration=calibration,
                    objective=objective, family=family, bu_selected=[names[i] for i in selected])


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write the schedule as JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, schedule_text(schedule))
    return path


def schedule_text(schedule: Schedule) -> str:
    """The schedule's file, as save_schedule writes it."""
    from polcache.policy.checkpoint import code_version

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "method": schedule.method,
        "objective": schedule.objective,
        "model": {"hash": schedule.model_hash, "family": schedule.family, "blocks": list(schedule.update_steps),
                  "layers": [layer for layer, _ in schedule.calibration.layer_kind],
                  "kinds": [kind for _, kind in schedule.calibration.layer_kind]},
        "sampler": {"kind": schedule.sampler, "steps": schedule.steps},
        "budget": schedule.budget,
        "bu_blocks": schedule.bu_blocks,
        "force_last": schedule.force_last,
        "bu_selected": schedule.bu_selected,
        "block_evaluations": schedule.block_evals,
        "block_evaluations_uncached": schedule.steps * len(schedule.update_steps),
        "update_steps": schedule.update_steps,
        "created": schedule.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": schedule.code_version or code_version(),
        "calibration": schedule.calibration.to_json(),
    }
    return _dumps(doc) + "\n"


def _dumps(obj, depth: int = 0) -> str:
    """Indented JSON whose innermost lists (update steps, similarity rows) stay on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (list, dict)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def _whole(value: Any, field: str) -> int:
    """An integer as JSON wrote it: "3", 2.7 or true in a hand-edited file is refused, not coerced."""
    if type(value) is not int:
        raise ValueError(f"{field} must be an integer, got {_shown(value)}")
    return value


def _names(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field} must be a list of block names, got {_shown(value)}")
    return value


def _flag(value: Any, field: str) -> bool:
    """A JSON boolean: "false" (a string, so truthy) or 0 in a hand-edited file is refused, not coerced."""
    if type(value) is not bool:
        raise ValueError(f"{field} must be true or false, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A value of the file for a message, cut short."""
    return cut_short(repr(value))


def _expected_updates(schedule: Schedule) -> int:
    """How many update steps ACS gives every block (`solve_acs`): the budget, plus the last step with
    force_last unless the budget already covers steps 0..K-2."""
    K, budget = schedule.steps, schedule.budget
    if not schedule.force_last or K == 1:
        return budget
    return K if budget >= K - 1 else budget + 1


def _check_steps_fit(schedule: Schedule) -> str | None:
    """Why the update steps cannot be what `build_schedule` solved for the file's own method, budget,
    force_last and Bubbling Union, or None. Every block has exactly the ACS count of updates, the last
    step among them with force_last; a block widened by Bubbling Union (bu_selected) has at least that
    many, including every update of each unwidened FFN block at its layer or later; `unified` gives
    every block the same steps."""
    names, K = list(schedule.update_steps), schedule.steps
    widened = schedule.bu_selected
    if schedule.method == "bac":
        if len(widened) != schedule.bu_blocks or len(set(widened)) != len(widened) or not set(widened) <= set(names):
            return (f"bu_selected must name {_shown(schedule.bu_blocks)} distinct blocks of model.blocks (bu_blocks), "
                    f"got {_shown(widened)}")
    elif widened or schedule.bu_blocks:
        return f"a {schedule.method} schedule widens no blocks: bu_blocks must be 0 and bu_selected empty"
    n = _expected_updates(schedule)
    why = f"budget {schedule.budget}" + (f" + the forced last step {K - 1}" if n == schedule.budget + 1 else "")
    if n == K and schedule.budget < K:
        why = f"budget {schedule.budget} with force_last covers every step"
    kinds = dict(zip(names, schedule.calibration.layer_kind))
    for name, steps in schedule.update_steps.items():
        if name not in widened and len(steps) != n:
            return f"update_steps.{name} has {len(steps)} update steps, expected {n} ({why})"
        if name in widened and len(steps) < n:
            return f"update_steps.{name} has {len(steps)} update steps, expected at least {n} ({why})"
        if schedule.force_last and K > 1 and steps[-1] != K - 1:
            return f"update_steps.{name} lacks the last step {K - 1}, which force_last recomputes"
        if name in widened:
            layer = kinds[name][0]
            for other, (other_layer, kind) in kinds.items():
                if kind == FFN and other_layer >= layer and other not in widened \
                        and not set(schedule.update_steps[other]) <= set(steps):
                    return (f"update_steps.{name} (widened by Bubbling Union) lacks updates of {other} "
                            f"(an FFN block at layer {other_layer} >= {layer})")
    if schedule.method == "unified" and len({tuple(s) for s in schedule.update_steps.values()}) > 1:
        return "a unified schedule gives every block the same update steps"
    return None


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file (format, version, shapes); not yet tied to a model."""
    path = Path(path)
    if path.is_dir():
        raise CacheError(f"schedule file {path} is a folder, not a file written by `polcache calibrate`")
    if not path.is_file():
        raise CacheError(f"schedule file not found: {path}")
    d = read_json_object(path, CacheError)
    fmt = d.get("format")
    if fmt != FORMAT:
        raise CacheError(f"{path}: not a polcache cache schedule (format {fmt!r})")
    if d.get("version") not in (1, VERSION):
        raise CacheError(f"{path}: schedule version {d.get('version')} is not supported (expected 1..{VERSION})")
    try:
        for key in ("model", "sampler", "update_steps", "calibration", "method", "budget", "bu_blocks", "force_last"):
            if key not in d:
                raise ValueError(f"missing field {key!r}")
        for key in ("model", "sampler", "update_steps", "calibration"):
            if not isinstance(d[key], dict):
                raise ValueError(f"{key} must be a JSON object")
        check_schedule_keys(d)
        names = list(d["model"]["blocks"])
        K = _whole(d["sampler"]["steps"], "sampler.steps")
        if set(d["update_steps"]) != set(names):
            odd = sorted(set(d["update_steps"]) ^ set(names))[:3]
            raise ValueError(f"update_steps names {odd} unlike model.blocks")
        for n in names:
            if not isinstance(d["update_steps"][n], list):
                raise ValueError(f"update_steps.{n} must be a list of steps")
        steps = {n: [_whole(s, f"update_steps.{n}") for s in d["update_steps"][n]] for n in names}
        calibration = Calibration.from_json(d["calibration"], names)
        if K != calibration.steps:  # before any check that would print K
            raise ValueError(f"sampler.steps {_shown(K)} disagrees with the calibration's {calibration.steps} steps")
        if "layers" in d["model"]:
            for key in ("layers", "kinds"):  # one entry per block, as model.blocks lists them
                if not isinstance(d["model"].get(key), list) or len(d["model"][key]) != len(names):
                    raise ValueError(f"model.{key} must list one entry per block of model.blocks ({len(names)})")
            calibration.layer_kind = [(int(a), str(b)) for a, b in zip(d["model"]["layers"], d["model"]["kinds"])]
        schedule = Schedule(method=str(d["method"]), model_hash=str(d["model"]["hash"]),
                            sampler=str(d["sampler"]["kind"]), steps=K, budget=_whole(d["budget"], "budget"),
                            bu_blocks=_whole(d["bu_blocks"], "bu_blocks"),
                            force_last=_flag(d["force_last"], "force_last"), update_steps=steps, calibration=calibration,
                            objective=str(d.get("objective", "similarity")),
                            family=str(d["model"].get("family", "dp-t")),
                            bu_selected=_names(d.get("bu_selected", []), "bu_selected"), created=str(d.get("created", "")),
                            code_version=str(d.get("code_version", "")))
    except KeyError as exc:  # an entry a nested object lacks
        raise CacheError(f"{path}: malformed schedule (missing entry {exc})") from None
    except TypeError as exc:
        raise CacheError(f"{path}: malformed schedule (a value of the wrong type: {exc})") from None
    except ValueError as exc:
        raise CacheError(f"{path}: malformed schedule ({exc})") from None
    bad = [n for n, s in steps.items() if not s or s[0] != 0 or s != sorted(set(s)) or s[-1] >= K]
    if bad:
        raise CacheError(f"{path}: update steps of {bad[0]} must be sorted, distinct, start at 0 and stay below K={K}")
    expected = {"similarity": (len(names), K, K), "distance": (len(names), K, K), "sensitivity": (len(names), K)}
    for key, shape in expected.items():
        value = getattr(calibration, key)
        if value is not None and value.shape != shape:
            raise CacheError(f"{path}: calibration {key} has shape {value.shape}, expected {shape}")
    if schedule.method not in METHODS:
        raise CacheError(f"{path}: unknown method {schedule.method!r} (expected one of {', '.join(METHODS)})")
    if not 1 <= schedule.budget <= K:
        raise CacheError(f"{path}: budget {_shown(schedule.budget)} must be in 1..K={K} update steps")
    if schedule.objective not in OBJECTIVES:
        raise CacheError(f"{path}: unknown objective {schedule.objective!r} (expected one of {', '.join(OBJECTIVES)})")
    if schedule.sampler not in SAMPLER_KINDS:  # before check_fits, whose advice would be --sampler <this>
        raise CacheError(f"{path}: unknown sampler.kind {schedule.sampler!r} (expected one of "
                         f"{', '.join(SAMPLER_KINDS)})")
    why = _check_steps_fit(schedule)
    if why:  # a hand edit: the plan would not be the one the file says it is (method, budget, force_last)
        raise CacheError(f"{path}: {why}")
    # the counts are written for readers of the file; one that disagrees with the steps was edited
    for key, counted in (("block_evaluations", schedule.block_evals),
                         ("block_evaluations_uncached", K * len(names))):
        if key in d and d[key] != counted:
            raise CacheError(f"{path}: {key} {_shown(d[key])} disagrees with update_steps ({counted}): edited by hand? "
                             f"calibrate again")
    return schedule


def check_fits(schedule: Schedule, policy: CacheTarget, sampler: Sampler, where: str = "schedule") -> None:
    """Refuse a schedule calibrated for another family, model, sampler or step count."""
    family = policy.identity()["family"]
    if schedule.family != family:
        raise CacheError(f"{where} was calibrated on a {schedule.family} policy, this checkpoint is a {family} policy: "
                         "run `polcache calibrate` for this checkpoint")
    mine = model_hash(policy)
    if schedule.model_hash != mine:
        raise CacheError(f"{where} was calibrated for model {schedule.model_hash[7:19]}, not this one ({mine[7:19]}): "
                         "run `polcache calibrate` for this checkpoint")
    if (schedule.sampler, schedule.steps) != (sampler.kind, sampler.num_steps):
        raise CacheError(f"{where} is for {schedule.sampler} with K={schedule.steps} steps, but the sampler is "
                         f"{sampler.kind} with K={sampler.num_steps}: pass --sampler {schedule.sampler} "
                         f"--steps {schedule.steps}, or recalibrate")
    names = [b.name for b in policy.cache_blocks]
    if list(schedule.update_steps) != names:
        raise CacheError(f"{where} names blocks {list(schedule.update_steps)[:3]}..., the model has {names[:3]}...")
