"""Block-wise adaptive caching: calibration, the ACS solver, Bubbling Union, schedules and plans.

`resolve_plan(spec, policy, sampler)` turns a `--cache` spec into a plan (grammar in
polcache.cache.resolve); `plan_summary(plan)` says what eval reports about it.
"""

from polcache.cache.acs import solve_acs
from polcache.cache.errors import CacheError
from polcache.cache.resolve import plan_summary, resolve_plan

__all__ = ["CacheError", "plan_summary", "resolve_plan", "solve_acs"]
