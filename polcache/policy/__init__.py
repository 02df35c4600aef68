"""Policies: the denoisers of every family (DP-T, the VLA's action expert) built from named blocks,
encoders, samplers, checkpoints, backends.

Imports are lazy so that torch-free code (the robot client, simulated robots) can use
`polcache.policy.spec` without paying for torch."""

from polcache.lazy import lazy_exports

_EXPORTS = {
    "ArraySpec": "polcache.policy.spec",
    "InferenceError": "polcache.errors",
    "ObservationError": "polcache.errors",
    "PolicyBackend": "polcache.policy.spec",
    "PolicySpec": "polcache.policy.spec",
    "DiffusionPolicy": "polcache.policy.policy",
    "TorchBackend": "polcache.policy.backend",
    "load_backend": "polcache.policy.loader",
    "load_policy": "polcache.policy.checkpoint",
    "save_checkpoint": "polcache.policy.checkpoint",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
