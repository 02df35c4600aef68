"""`--cache SPEC`: one grammar naming every cache method, resolved to a plan for one model + sampler.

    none                   no caching: every block at every step
    uniform:N              every block recomputed every N steps (FORA / DeepCache)
    threshold:T            dynamic residual-threshold cache (TeaCache / first-block cache), T >= 0
    PATH.json              a schedule written by `polcache calibrate` (BAC by default)
    bac:S:n@PATH.json      ACS with S update steps per block + Bubbling Union over n blocks,
    blockwise:S@PATH.json  ACS per block without Bubbling Union,
    unified:S@PATH.json    one ACS schedule for all blocks from their mean scores,
                           each re-solved from the calibration stored in the schedule file
                           (which also fixes the model, sampler, K and the forced last step)
                           with the file's objective, or the one named after S (or n):
                           e.g. bac:10:5:similarity@PATH.json is the paper's BAC

Any spec except none and threshold may end in `+forecast`: skipped blocks extrapolate their
delta from the last two updates instead of reusing the last one (e.g. `run.json+forecast`).
"""

from __future__ import annotations

from typing import Sequence

from polcache.cache.baselines import no_cache_plan, threshold_plan, uniform_plan, with_forecast
from polcache.cache.errors import CacheError
from polcache.cache.schedule import OBJECTIVES, build_schedule, check_fits, load_schedule
from polcache.policy.executor import COMPUTE, Plan, decided_at_run_time
from polcache.cache.protocol import CacheTarget
from polcache.policy.samplers import Sampler

FORECAST_SUFFIX = "+forecast"


def _number(text: str, kind: type, what: str, spec: str):
    try:
        return kind(text)
    except ValueError:
        raise CacheError(f"cache spec {spec!r}: {what} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


def resolve_plan(cache_spec: str, policy: CacheTarget, sampler: Sampler) -> Plan:
    """Resolve a cache spec (see the module docstring) into the plan `policy.sample` runs."""
    spec = cache_spec.strip()
    forecast = spec.endswith(FORECAST_SUFFIX)
    body = spec[: -len(FORECAST_SUFFIX)] if forecast else spec
    K, n = sampler.num_steps, len(policy.cache_blocks)
    head, _, args = body.partition(":")
    if body.endswith(".json") and "@" not in body:
        schedule = load_schedule(body)
        check_fits(schedule, policy, sampler, body)
        plan = schedule.to_plan()
    elif head in ("bac", "blockwise", "unified"):
        params, at, path = args.partition("@")
        if not at or not path:
            raise CacheError(f"cache spec {spec!r}: {head} needs a calibration, e.g. {head}:"
                             f"{'10:5' if head == 'bac' else '10'}@schedule.json (from `polcache calibrate`)")
        fields = params.split(":")
        numbers = 2 if head == "bac" else 1
        objective = fields.pop() if len(fields) == numbers + 1 else None
        if len(fields) != numbers or (objective is not None and objective not in OBJECTIVES):
            raise CacheError(f"cache spec {spec!r}: expected {'bac:S:n' if head == 'bac' else head + ':S'}"
                             f"[:OBJECTIVE]@PATH.json, OBJECTIVE one of {', '.join(OBJECTIVES)}")
        budget = _number(fields[0], int, "the budget S", spec)
        bu = _number(fields[1], int, "the Bubbling Union block count n", spec) if head == "bac" else 0
        source = load_schedule(path)
        check_fits(source, policy, sampler, path)
        plan = build_schedule(source.calibration, head, budget, bu, source.force_last, source.model_hash,
                              source.sampler, objective or source.objective, source.family).to_plan()
    elif head == "uniform" and args:
        plan = uniform_plan(K, n, _number(args, int, "the interval N", spec))
    elif head == "threshold" and args:
        plan = threshold_plan(K, n, _number(args, float, "the threshold T", spec))
    elif body == "none":
        plan = no_cache_plan(K, n)
    else:
        raise CacheError(f"unknown cache spec {spec!r}: expected none, uniform:N, threshold:T, a schedule .json, "
                         "bac:S:n@PATH.json, blockwise:S@PATH.json or unified:S@PATH.json (optionally +forecast)")
    if forecast:
        if plan.method == "none":
            raise CacheError(f"cache spec {spec!r}: nothing is skipped without caching, so nothing to forecast")
        plan = with_forecast(plan)
    return Plan(plan.ops, plan.method, spec, plan.threshold)


def plan_summary(plan: Sequence[Sequence[int]]) -> dict:
    """What eval and benchmarks report about a plan: method, block evaluations and the compute
    limit (uncached block evaluations / performed). For the threshold cache they depend on the
    inputs: `block_evals` is None and `block_evals_min` counts the evaluations always done."""
    rows = [tuple(r) for r in plan]
    K, n = len(rows), len(rows[0]) if rows else 0
    computed = sum(r.count(COMPUTE) for r in rows)
    dynamic = decided_at_run_time(rows)
    out = {
        "method": getattr(plan, "method", "custom"),
        "source": getattr(plan, "source", ""),
        "steps": K,
        "blocks": n,
        "block_evals_uncached": K * n,
        "block_evals": None if dynamic else computed,
        "compute_limit": None if dynamic or not computed else round(K * n / computed, 4),
        "dynamic": dynamic,
    }
    if dynamic:
        out["block_evals_min"] = computed
        out["threshold"] = getattr(plan, "threshold", None)
    return out
