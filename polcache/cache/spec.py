"""`--cache SPEC`: one grammar naming every cache method, resolved to a plan for one model + sampler.

    none                   no caching: every block at every step
    uniform:N              every block recomputed every N steps (FORA / DeepCache)
    threshold:T            dynamic residual-threshold cache (TeaCache / first-block cache), T >= 0
    PATH.json              a schedule written by `polcache calibrate` (BAC by default); the
                           suffix in any case (.JSON), '@' allowed in the name (x@y.json)
    bac:S:n@PATH.json      ACS with S update steps per block + Bubbling Union over n blocks,
    blockwise:S@PATH.json  ACS per block without Bubbling Union,
    unified:S@PATH.json    one ACS schedule for all blocks from their mean scores,
                           each re-solved from the calibration stored in the schedule file
                           (which also fixes the model, sampler, K and the forced last step)
                           with the file's objective, or the one named after S (or n):
                           e.g. bac:10:5:similarity@PATH.json is the paper's BAC

Any spec except none and threshold:T may end in `+forecast`: skipped blocks extrapolate their
delta from the last two updates instead of reusing the last one (e.g. `run.json+forecast`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from polcache.cache.errors import CacheError

# what ACS maximises per block (polcache.cache.schedule): the error bound (default) or the paper's similarity
OBJECTIVES = ("error-bound", "similarity")

FORECAST_SUFFIX = "+forecast"
ACS_METHODS = ("bac", "blockwise", "unified")  # the specs METHOD:S...@PATH that re-solve a calibration


def _number(text: str, kind: type, what: str, spec: str):
    try:
        return kind(text)
    except ValueError:
        raise CacheError(f"cache spec {spec!r}: {what} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


@dataclass(frozen=True)
class CacheSpec:
    """A cache spec read by the grammar alone: what `resolve_plan` builds, before any model or file."""

    text: str
    method: str  # none, uniform, threshold, schedule (a calibrated file as is), bac, blockwise, unified
    forecast: bool = False
    value: float = 0  # uniform's interval N, threshold's T, or the ACS budget S
    bu_blocks: int = 0  # bac's Bubbling Union block count n
    objective: str | None = None  # re-solving with another objective than the file's
    path: str | None = None  # the schedule file


def parse_cache_spec(cache_spec: str) -> CacheSpec:
    """Check a cache spec's grammar (see the module docstring) without a model, so a launch config
    is refused before anything starts; CacheError naming what is wrong."""
    spec = cache_spec.strip()
    if not spec:  # an empty --cache (an unset shell variable, say) is not a silent "none"
        raise CacheError("cache spec is empty: give none, uniform:N, threshold:T, a schedule .json or "
                         "bac:S:n@PATH.json")
    forecast = spec.endswith(FORECAST_SUFFIX)
    body = spec[: -len(FORECAST_SUFFIX)] if forecast else spec
    head, _, args = body.partition(":")
    # a schedule file: a .json name (any case, as `polcache calibrate --out` takes it) that is not
    # METHOD:...@PATH -- '@' elsewhere in a file's name (x@y.json) is part of the path, and an
    # existing file wins over the grammar
    if body.lower().endswith(".json") and (head not in ACS_METHODS or "@" not in args or os.path.isfile(body)):
        parsed = CacheSpec(spec, "schedule", forecast, path=body)
    elif head in ACS_METHODS:
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
        parsed = CacheSpec(spec, head, forecast, budget, bu, objective, path)
    elif head == "uniform" and args:
        parsed = CacheSpec(spec, head, forecast, _number(args, int, "the interval N", spec))
    elif head == "threshold" and args:
        threshold = _number(args, float, "the threshold T", spec)
        if not 0 <= threshold < float("inf"):
            raise CacheError(f"cache spec {spec!r}: the threshold T must be a finite number >= 0")
        parsed = CacheSpec(spec, head, forecast, threshold)
    elif body == "none":
        parsed = CacheSpec(spec, "none", forecast)
    else:
        raise CacheError(f"unknown cache spec {spec!r}: expected none, uniform:N, threshold:T, a schedule .json, "
                         "bac:S:n@PATH.json, blockwise:S@PATH.json or unified:S@PATH.json (optionally +forecast)")
    if forecast and parsed.method == "none":
        raise CacheError(f"cache spec {spec!r}: nothing is skipped without caching, so nothing to forecast")
    if forecast and parsed.method == "threshold":  # here, so a launch config is refused before anything starts
        raise CacheError(f"cache spec {spec!r}: +forecast applies to static plans, not to the threshold cache")
    return parsed
