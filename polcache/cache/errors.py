"""The one error type of the cache package, so the CLI prints one clear line."""

from polcache.errors import PolcacheError


class CacheError(PolcacheError):
    """A bad cache spec, budget, schedule file, or a schedule used with the wrong model or sampler."""
