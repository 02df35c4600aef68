"""Import-only stand-in for torchvision, copied ONLY into the LeRobot benchmark venv.

Why it exists: no registry torchvision loads next to torch 2.13 CPU (0.25.0, the newest that
lerobot 0.4.4 allows, and 0.28.0 and 0.29.1 all fail on import: "operator torchvision::nms does not
exist", their _C.so was built for another torch). LeRobot imports torchvision at module level in
policies/diffusion/modeling_diffusion.py (the image encoder only), datasets/utils.py,
datasets/transforms.py and datasets/video_utils.py (image and video paths only). A state-only
DiffusionPolicy trained on a dataset without images runs none of that code.

What it provides: the module names those imports ask for and nothing that works. (transformers,
which lerobot's policy registry imports, reads transforms.InterpolationMode's member names at import
time when it finds a torchvision; that enum of names is here, with no code behind it.) Every attribute
of a shimmed module is a _Refused that raises ShimCalled when called or looked into, and
transforms.v2.Transform (which LeRobot subclasses at import time) raises when instantiated. So if
any shimmed code ran, the benchmark would stop with ShimCalled instead of silently doing something
else. benchmarks/bench_peer_lerobot.py checks that this shim is what it imported.
"""

import enum
import sys
import types

import torch

__version__ = "0.0.0+polcache-shim"
IS_POLCACHE_SHIM = True


class ShimCalled(RuntimeError):
    """Raised when LeRobot reaches torchvision code, which a state-only policy must never do."""


def _refuse(what: str) -> "ShimCalled":
    return ShimCalled(f"torchvision shim: {what} was used; this venv has no real torchvision "
                      "(only a state-only policy may run here)")


class _Refused:
    """Stands in for any torchvision function or class; using it in any way raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise _refuse(self._name)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise _refuse(f"{self._name}.{attr}")


class _ShimModule(types.ModuleType):
    """A torchvision submodule whose every attribute is a _Refused."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Refused(f"{self.__name__}.{attr}")


class Transform(torch.nn.Module):
    """Base class LeRobot's datasets/transforms.py subclasses; instantiating it raises."""

    def __init__(self, *args, **kwargs) -> None:
        raise _refuse("torchvision.transforms.v2.Transform")


class InterpolationMode(enum.Enum):
    """The member names transformers maps PIL resampling modes to at import time; names only."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _install(name: str) -> _ShimModule:
    module = _ShimModule(name)
    sys.modules[name] = module
    parent, _, leaf = name.rpartition(".")
    setattr(sys.modules[parent], leaf, module)
    return module


for _name in ("transforms", "transforms.functional", "transforms.v2", "transforms.v2.functional",
              "models", "ops", "ops.misc", "io"):
    _install(f"{__name__}.{_name}")
sys.modules[f"{__name__}.transforms.v2"].Transform = Transform
sys.modules[f"{__name__}.transforms"].InterpolationMode = InterpolationMode


def __getattr__(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Refused(f"torchvision.{attr}")
