"""Cache specs (grammar: polcache.cache.spec) resolved to a plan for one model + sampler."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from polcache.cache.baselines import no_cache_plan, threshold_plan, uniform_plan, with_forecast
from polcache.cache.errors import CacheError
from polcache.cache.schedule import build_schedule, check_fits, load_schedule
from polcache.cache.spec import ACS_METHODS, parse_cache_spec
from polcache.policy.executor import COMPUTE, Plan, decided_at_run_time
from polcache.cache.protocol import CacheTarget
from polcache.policy.samplers import Sampler


def resolve_plan(cache_spec: str, policy: CacheTarget, sampler: Sampler) -> Plan:
    """Resolve a cache spec (see the module docstring) into the plan `policy.sample` runs."""
    spec = parse_cache_spec(cache_spec)
    K, n = sampler.num_steps, len(policy.cache_blocks)
    if spec.method == "schedule":
        schedule = load_schedule(spec.path)
        check_fits(schedule, policy, sampler, spec.path)
        plan = schedule.to_plan()
    elif spec.method in ACS_METHODS:
        source = load_schedule(spec.path)
        check_fits(source, policy, sampler, spec.path)
        with _named(cache_spec):  # a budget or Bubbling Union size this schedule's model cannot take
            plan = build_schedule(source.calibration, spec.method, int(spec.value), spec.bu_blocks, source.force_last,
                                  source.model_hash, source.sampler, spec.objective or source.objective,
                                  source.family).to_plan()
    elif spec.method == "uniform":
        with _named(cache_spec):  # an interval beyond this sampler's steps
            plan = uniform_plan(K, n, int(spec.value))
    elif spec.method == "threshold":
        with _named(cache_spec):
            plan = threshold_plan(K, n, spec.value)
    else:
        plan = no_cache_plan(K, n)
    if spec.forecast:
        plan = with_forecast(plan)
    return Plan(plan.ops, plan.method, spec.text, plan.threshold)


@contextmanager
def _named(cache_spec: str) -> Iterator[None]:
    """A cache spec this model or sampler cannot take is refused naming the spec (a launch config's
    server.cache=uniform:0 was refused as "uniform interval must be in 1..16", which names no setting)."""
    try:
        yield
    except CacheError as exc:
        raise CacheError(f"cache {cache_spec!r}: {exc}") from None


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
