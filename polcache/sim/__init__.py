"""Simulation evaluation of any PolicyBackend."""

from polcache.sim.evaluate import EvalResult, evaluate
from polcache.sim.stats import percentiles_ms, wilson_interval

__all__ = ["EvalResult", "evaluate", "percentiles_ms", "wilson_interval"]
