"""Block-wise adaptive caching: calibration, the ACS solver, Bubbling Union, schedules and plans."""

from polcache.cache.acs import solve_acs

__all__ = ["solve_acs"]
