"""Per-dimension affine normalisation of low-dim arrays (state, action).

Stored as scale/offset per key (y = x * scale + offset), like diffusion_policy's
LinearNormalizer, so a checkpoint needs no mode flag to be undone exactly; min/max/mean/std
are kept alongside as statistics. Images are not handled here: the model scales uint8 to [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

RANGE_EPS = 1e-4  # "limits": dims whose range is below this are shifted only, never divided
_FIELDS = ("scale", "offset", "min", "max", "mean", "std")


class Normalizer:
    """Per-key, per-last-dimension affine map fitted on training data."""

    def __init__(self, params: Mapping[str, Mapping[str, torch.Tensor]]):
        self._p = {k: {f: torch.as_tensor(v[f], dtype=torch.float32).reshape(-1) for f in _FIELDS} for k, v in params.items()}
        # scale/offset per (key, device, dtype): copying them to a GPU at every call would cost a
        # host-to-device transfer each time and make the chunk impossible to capture as a CUDA graph
        self._affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def fit(cls, arrays: Mapping[str, Any], mode: str | Mapping[str, str] = "limits",
            min_spread: float = RANGE_EPS) -> "Normalizer":
        """arrays: key -> (..., D); mode: one for all keys or key -> mode. "limits" maps [min, max]
        to [-1, 1] (Chi et al.); "gaussian" maps to zero mean, unit std. Dims whose range (std) is
        below `min_spread` are constant for this purpose: shifted to 0, never divided."""
        modes = {k: mode if isinstance(mode, str) else mode.get(k, "limits") for k in arrays}
        bad = {k: m for k, m in modes.items() if m not in ("limits", "gaussian")}
        if bad:
            raise ValueError(f"unknown normalizer mode {bad}; use 'limits' or 'gaussian'")
        params = {}
        for key, a in arrays.items():
            mode = modes[key]
            x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if x.ndim == 0 or x.size == 0:
                raise ValueError(f"normalizer: {key!r} needs a non-empty (..., D) array, got shape {x.shape}")
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            if not np.isfinite(x).all():
                raise ValueError(f"normalizer: {key!r} contains NaN or inf")
            lo, hi, mean, std = x.min(0), x.max(0), x.mean(0), x.std(0)
            if mode == "limits":
                flat = (hi - lo) < min_spread
                scale = 2.0 / np.where(flat, 2.0, hi - lo)
                offset = np.where(flat, -lo, -1.0 - scale * lo)
            else:
                flat = std < min_spread
                scale = 1.0 / np.where(flat, 1.0, std)
                offset = np.where(flat, -mean, -mean * scale)
            params[key] = {"scale": scale, "offset": offset, "min": lo, "max": hi, "mean": mean, "std": std}
        return cls(params)

    @property
    def keys(self) -> list[str]:
        return list(self._p)

    def __contains__(self, key: str) -> bool:
        return key in self._p

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        """min/max/mean/std (and scale/offset) of one key, float32 (D,)."""
        return dict(self._param(key))

    def _param(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self._p:
            raise KeyError(f"normalizer has no key {key!r}; have {list(self._p)}")
        return self._p[key]

    def _apply(self, key: str, x: Any, inverse: bool) -> Any:
        p = self._param(key)
        d = p["scale"].shape[0]
        if x.shape[-1:] != (d,):
            raise ValueError(f"normalizer {key!r}: last dim must be {d}, got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            where = (key, x.device, dtype)
            if where not in self._affine:
                self._affine[where] = (p["scale"].to(x.device, dtype), p["offset"].to(x.device, dtype))
            scale, offset = self._affine[where]
            x = x.to(dtype)
        else:
            x = np.asarray(x)
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
            scale, offset = p["scale"].numpy().astype(dtype), p["offset"].numpy().astype(dtype)
            x = x.astype(dtype, copy=False)
        return (x - offset) / scale if inverse else x * scale + offset

    def normalize(self, key: str, x: Any) -> Any:
        """x: (..., D) torch tensor or numpy array; result keeps its type, device and float dtype."""
        return self._apply(key, x, inverse=False)

    def unnormalize(self, key: str, x: Any) -> Any:
        """Inverse of normalize."""
        return self._apply(key, x, inverse=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat "<key>.<field>" -> float32 tensor, ready for safetensors.torch.save_file."""
        return {f"{k}.{f}": p[f].clone().contiguous() for k, p in self._p.items() for f in _FIELDS}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, torch.Tensor]) -> "Normalizer":
        params: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in d.items():
            key, _, field = name.rpartition(".")
            if field in _FIELDS and key:
                params.setdefault(key, {})[field] = t
        for key, p in params.items():
            missing = [f for f in _FIELDS if f not in p]
            if missing:
                raise KeyError(f"normalizer state_dict: {key!r} lacks {missing}")
        return cls(params)

    def __repr__(self) -> str:
        return f"Normalizer({ {k: int(p['scale'].shape[0]) for k, p in self._p.items()} })"


def differing_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys (state, action, ...) whose statistics differ between two normalizer state dicts, or
    that only one has: refitted on the same data they are equal, so this tells data apart."""
    return sorted({k.split(".")[0] for k in a.keys() ^ b.keys()}
                  | {k.split(".")[0] for k, v in a.items() if k in b and not torch.equal(v, b[k])})
