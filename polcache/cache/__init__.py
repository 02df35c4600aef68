"""Block-wise adaptive caching: calibration, the ACS solver, Bubbling Union, schedules and plans.

`resolve_plan(spec, policy, sampler)` turns a `--cache` spec into a plan (grammar in
polcache.cache.resolve); `plan_summary(plan)` says what eval reports about it. Imports are lazy
(polcache.lazy), so registering the `calibrate` command does not pay for torch.
"""

from polcache.lazy import lazy_exports

_EXPORTS = {
    "CacheError": "polcache.cache.errors",
    "plan_summary": "polcache.cache.resolve",
    "resolve_plan": "polcache.cache.resolve",
    "solve_acs": "polcache.cache.acs",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
