"""Policies: DP-T denoiser built from named blocks, encoders, samplers, checkpoints, backends."""

from polcache.policy.backend import TorchBackend, load_backend
from polcache.policy.checkpoint import load_policy, save_checkpoint
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.spec import ArraySpec, PolicyBackend, PolicySpec

__all__ = ["ArraySpec", "DiffusionPolicy", "PolicyBackend", "PolicySpec", "TorchBackend", "load_backend",
           "load_policy", "save_checkpoint"]
