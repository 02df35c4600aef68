"""Training windows cut from episodes, like diffusion_policy's SequenceSampler.

Sample (episode e, step t) -- t is the "current" step, the newest observation -- gives, with
frame stride s (polcache.policy.spec.frame_offsets / action_offsets, which the runtime uses too)
    obs[key]: steps t-(To-1)s, .., t-s, t                    (To frames)
    action:   steps t-(To-1)s, .., t-s (past, strided), t, t+1, .., t+H-To   (H actions;
              action[To-1] is due at step t)
Every step of every episode is one sample. Indices before the episode's first step repeat
the first frame/action, indices past its last step repeat the last one (the robot is
assumed to rest there), so a window never reads from another episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polcache.data.store import EpisodeStore
from polcache.policy.spec import action_offsets, frame_offsets


def episode_split(num_episodes: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split episode ids (not windows, which overlap) into sorted train and val lists.

    Train always keeps at least one (a 1-episode dataset has none to hold out); with val_fraction > 0
    and at least 2 episodes, val gets at least one."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(int(round(num_episodes * val_fraction)), num_episodes - 1)
    if val_fraction > 0 and num_episodes > 1:
        n_val = max(n_val, 1)
    perm = np.random.default_rng(seed).permutation(num_episodes)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


class SequenceDataset(torch.utils.data.Dataset):
    """Fixed-length (To obs, H action) windows over an EpisodeStore, padded at episode borders.

    Arrays are loaded into memory once (shared through the store's cache); __getitem__ is a
    lookup in a precomputed index table plus numpy fancy indexing. State/action come back as
    float32 tensors, images as uint8 (To, H, W, 3) tensors: the model scales them.
    """

    def __init__(
        self,
        store: EpisodeStore,
        horizon: int,
        n_obs_steps: int,
        keys: Sequence[str] | None = None,
        episode_ids: Sequence[int] | None = None,
        obs_stride: int = 1,
        frame_mode: str = "strided",
    ):
        if n_obs_steps < 1 or horizon < n_obs_steps:
            raise ValueError(f"need 1 <= n_obs_steps <= horizon, got n_obs_steps={n_obs_steps}, horizon={horizon}")
        self.keys = list(store.obs_keys if keys is None else keys)
        missing = [k for k in self.keys if k not in store.obs_keys]
        if missing:
            raise KeyError(f"{store.path}: obs keys {missing} not in dataset (have {store.obs_keys})")
        n_ep = store.num_episodes
        ids = list(range(n_ep)) if episode_ids is None else [int(i) for i in episode_ids]
        bad = [i for i in ids if not 0 <= i < n_ep]
        if bad:
            raise IndexError(f"episode ids {bad} out of range for {n_ep} episodes")
        self.horizon, self.n_obs_steps, self.episode_ids = horizon, n_obs_steps, ids
        self._obs = {k: store.array(k) for k in self.keys}
        self._action = store.array("action")

        ends, starts = store.episode_ends, store.episode_starts
        obs_rows, act_rows, where = [], [], []
        obs_off = np.asarray(frame_offsets(n_obs_steps, obs_stride, frame_mode))
        act_off = np.asarray(action_offsets(n_obs_steps, horizon, obs_stride, frame_mode))
        for e in ids:
            s, end = int(starts[e]), int(ends[e])
            t = np.arange(s, end)[:, None]
            obs_rows.append(np.clip(t + obs_off, s, end - 1))
            act_rows.append(np.clip(t + act_off, s, end - 1))
            where.append(np.stack([np.full(end - s, e), np.arange(end - s)], axis=1))
        empty = np.zeros((0, 0), np.int64)
        self._obs_idx = np.concatenate(obs_rows) if ids else empty  # (N, To) global step rows
        self._act_idx = np.concatenate(act_rows) if ids else empty  # (N, H)
        self._where = np.concatenate(where) if ids else np.zeros((0, 2), np.int64)  # (N, 2) episode, step

    def __len__(self) -> int:
        return len(self._obs_idx)

    def sample_info(self, i: int) -> tuple[int, int]:
        """(episode id, step within that episode) of sample i's current step."""
        e, t = self._where[i]
        return int(e), int(t)

    def __getitem__(self, i: int) -> dict:
        rows = self._obs_idx[i]
        obs = {}
        for k, arr in self._obs.items():
            x = arr[rows]  # fancy indexing copies: writable, safe to hand to torch
            obs[k] = torch.from_numpy(x if x.dtype == np.uint8 else x.astype(np.float32, copy=False))
        action = torch.from_numpy(self._action[self._act_idx[i]].astype(np.float32, copy=False))
        return {"obs": obs, "action": action}
