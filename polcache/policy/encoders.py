"""Observation encoders: one feature vector per observation step.

`state` goes through an MLP; each `image_<camera>` through its own small GroupNorm CNN
with a spatial-softmax keypoint head (as in Chi et al. / robomimic, trained from scratch,
GroupNorm so that batch statistics never leak between training and deployment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polcache.config import ImageEncoderConfig, PolicyConfig
from polcache.errors import ConfigError
from polcache.policy.spec import ArraySpec

MIN_IMAGE_SIDE = 8  # pixels: the smallest crop the image trunk takes


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2K) expected image coordinates of K keypoints."""

    def __init__(self, channels: int, keypoints: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        B, K, H, W = x.shape
        ys = torch.linspace(-1.0, 1.0, H, device=x.device)
        xs = torch.linspace(-1.0, 1.0, W, device=x.device)
        attn = F.softmax(x.flatten(2), dim=-1).view(B, K, H, W)
        ex = (attn.sum(2) * xs).sum(-1)
        ey = (attn.sum(3) * ys).sum(-1)
        return torch.cat([ex, ey], dim=-1)


class ConvTrunk(nn.Module):
    """(N, H, W, 3) uint8 -> (N, 2c, H/4, W/4) feature maps: a random crop while training (the
    centre one at inference), then a small GroupNorm CNN. DP-T reads keypoints off it, the VLA
    pools it into image tokens."""

    def __init__(self, key: str, image_shape: tuple[int, ...], cfg: ImageEncoderConfig):
        """`image_shape`: (H, W, 3) of observation `key` (named in its refusal)."""
        super().__init__()
        c = cfg.channels
        height, width = image_shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:  # the crop below would not fit: a traceback in the first step
            raise ConfigError(f"obs {key!r}: images of {height}x{width} pixels are smaller than the image encoder "
                              f"takes ({MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} at least)")
        # a square crop, crop_fraction of the height (as every trained policy's), inside a portrait image too
        self.crop = min(max(MIN_IMAGE_SIDE, int(round(height * cfg.crop_fraction))), width)
        self.channels = 2 * c

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(max(1, cout // 16), cout), nn.Mish()]

        self.net = nn.Sequential(*conv(3, c, 2), *conv(c, c, 1), *conv(c, 2 * c, 2), *conv(2 * c, 2 * c, 1))

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        c = self.crop
        if self.training:  # one random crop per image
            top = torch.randint(0, H - c + 1, (1,)).item()
            left = torch.randint(0, W - c + 1, (1,)).item()
        else:
            top, left = (H - c) // 2, (W - c) // 2
        return x[..., top:top + c, left:left + c]

    def feature_map(self, img: torch.Tensor) -> torch.Tensor:
        x = img.permute(0, 3, 1, 2).float() / 255.0
        return self.net(self._crop(x))


class ImageEncoder(ConvTrunk):
    def __init__(self, key: str, image_shape: tuple[int, ...], cfg: ImageEncoderConfig):
        super().__init__(key, image_shape, cfg)
        self.keypoints = SpatialSoftmax(self.channels, cfg.keypoints)
        self.out = nn.Linear(2 * cfg.keypoints, cfg.feature_dim)
        self.feature_dim = cfg.feature_dim

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, feature_dim)."""
        return self.out(self.keypoints(self.feature_map(img)))


class ObsEncoder(nn.Module):
    def __init__(self, obs_spec: dict[str, ArraySpec], obs_keys: list[str], cfg: PolicyConfig):
        super().__init__()
        self.obs_keys = list(obs_keys)
        self.encoders = nn.ModuleDict()
        dim = 0
        for key in self.obs_keys:
            spec = obs_spec[key]
            if key == "state":
                self.encoders[key] = nn.Sequential(
                    nn.Linear(spec.shape[0], cfg.state_hidden), nn.Mish(), nn.Linear(cfg.state_hidden, cfg.state_hidden))
                dim += cfg.state_hidden
            else:
                self.encoders[key] = ImageEncoder(key, spec.shape, cfg.image)
                dim += cfg.image.feature_dim
        self.feature_dim = dim
        self.memory_tokens = cfg.n_obs_steps  # one conditioning token per observation step ...
        self.causal_memory = True  # ... each visible to the action tokens from its own time on
        self.per_frame = True  # a frame's features never depend on other frames: a session may keep them

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs[key]: (B, To, ...) with `state` already normalised -> (B, To, feature_dim)."""
        feats = []
        for key in self.obs_keys:
            x = obs[key]
            B, To = x.shape[:2]
            feats.append(self.encoders[key](x.reshape(B * To, *x.shape[2:])).view(B, To, -1))
        return torch.cat(feats, dim=-1)
