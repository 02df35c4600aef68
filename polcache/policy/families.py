"""Policy families by name: the config (`policy.family`) and every checkpoint name the
architecture, and `train`, `ptp finetune` and `load_policy` build it from here, so no command
hard-codes one constructor. A new family (e.g. a VLA with a flow-matching action expert)
registers its builder; DP-T is the default, so checkpoints written before families existed load
as DP-T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from polcache.config import PolicyConfig
from polcache.data.normalize import Normalizer
from polcache.errors import ConfigError
from polcache.policy.spec import ArraySpec

Builder = Callable[[PolicyConfig, dict[str, ArraySpec], Sequence[str], int, Normalizer, str], nn.Module]


@dataclass(frozen=True)
class PolicyFamily:
    name: str
    build: Builder  # (policy config, obs spec, obs keys, action dim, normaliser, task) -> policy
    description: str


FAMILIES: dict[str, PolicyFamily] = {}


def register_family(family: PolicyFamily) -> None:
    FAMILIES[family.name] = family


def get_family(name: str) -> PolicyFamily:
    if name not in FAMILIES:
        raise ConfigError(f"policy.family {name!r} is not a known policy family (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def build_policy(cfg: PolicyConfig, obs_spec: dict[str, ArraySpec], obs_keys: Sequence[str], action_dim: int,
                 normalizer: Normalizer, task: str = "") -> nn.Module:
    """The policy of `cfg.family`, initialised."""
    return get_family(cfg.family).build(cfg, obs_spec, obs_keys, action_dim, normalizer, task)


def _dpt(cfg, obs_spec, obs_keys, action_dim, normalizer, task):
    from polcache.policy.policy import DiffusionPolicy

    return DiffusionPolicy(cfg, obs_spec, obs_keys, action_dim, normalizer, task)


register_family(PolicyFamily("dp-t", _dpt, "transformer diffusion policy (Chi et al. 2023), DDPM/DDIM/flow"))


def _vla(cfg, obs_spec, obs_keys, action_dim, normalizer, task):
    from polcache.policy.vla import VisionLanguageAction

    return VisionLanguageAction(cfg, obs_spec, obs_keys, action_dim, normalizer, task)


register_family(PolicyFamily("vla", _vla, "vision-language prefix + flow-matching action expert (pi0/SmolVLA style)"))
