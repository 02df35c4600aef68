"""Policies: DP-T denoiser built from named blocks, encoders, samplers, checkpoints, backends.

Imports are lazy so that torch-free code (the robot client, simulated robots) can use
`polcache.policy.spec` without paying for torch."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ArraySpec": "polcache.policy.spec",
    "PolicyBackend": "polcache.policy.spec",
    "PolicySpec": "polcache.policy.spec",
    "DiffusionPolicy": "polcache.policy.policy",
    "TorchBackend": "polcache.policy.backend",
    "load_backend": "polcache.policy.backend",
    "load_policy": "polcache.policy.checkpoint",
    "save_checkpoint": "polcache.policy.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polcache.policy' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
