"""The task interface the recorder, evaluator and simulated robot share.

Deliberately smaller than gym.Env: a dict observation in the policy's own layout
("state" float32, "image_<camera>" uint8), one `done` flag and `info["success"]`, so callers
never deal with terminated/truncated pairs or per-task observation quirks.
"""

from __future__ import annotations

import abc
import difflib

import mujoco
import numpy as np

from polcache.envs.render import CameraRenderer
from polcache.errors import PolcacheError
from polcache.policy.spec import ArraySpec


class TaskEnv(abc.ABC):
    """One simulated task. Subclasses provide the simulation; this class assembles observations.

    Seeding: the first reset() without a seed uses the seed given at construction; each later
    one uses the previous episode's seed + 1. So `make_env(t, seed=s)` replays the same
    episodes as `reset(seed=s)`, `reset(seed=s + 1)`, ...
    """

    task: str
    description: str
    max_episode_steps: int
    action_dim: int
    state_dim: int
    default_cameras: tuple[str, ...]

    def __init__(
        self,
        model: mujoco.MjModel,
        seed: int | None,
        image: bool,
        cameras: tuple[str, ...] | None,
        image_size: int,
    ) -> None:
        self.model = model
        self._camera_renderer = CameraRenderer(model)
        self.cameras: tuple[str, ...] = tuple(cameras) if cameras else (self.default_cameras if image else ())
        for camera in self.cameras:
            self._check_camera(camera)
        if image_size <= 0:
            raise PolcacheError(f"image_size must be positive, got {image_size}")
        self.image = bool(self.cameras)
        self.image_size = int(image_size)
        self._next_seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)

    # --- implemented by each task -------------------------------------------------------

    @property
    @abc.abstractmethod
    def data(self) -> mujoco.MjData:
        """The live MjData, for rendering."""

    @property
    @abc.abstractmethod
    def control_period_s(self) -> float:
        """Simulated seconds per step (sets the fps a recorded dataset states)."""

    @abc.abstractmethod
    def _reset(self, seed: int) -> np.ndarray:
        """Start the episode determined by `seed`; return the state vector."""

    @abc.abstractmethod
    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        """Apply one action; return (state, reward, done, success)."""

    # --- shared ----------------------------------------------------------------------------

    def rest_action(self, last: np.ndarray) -> np.ndarray:
        """The action that keeps the robot where it is, given the one it last executed (what a
        recorded stop executes): zero, for velocity and position-delta actions; a task with a
        gripper overrides it so the gripper keeps its command."""
        return np.zeros_like(last)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start a new episode; the same seed always gives the same episode."""
        if seed is None:
            seed = self._next_seed
        self._next_seed = int(seed) + 1
        return self._observe(self._reset(int(seed)))

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        """Apply `action` (clipped to [-1, 1]); done is True once the episode is over."""
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.action_dim,):
            raise PolcacheError(f"{self.task}: action must have {self.action_dim} values, got {action.shape[0]}")
        state, reward, done, success = self._step(np.clip(action, -1.0, 1.0))
        return self._observe(state), float(reward), bool(done), {"success": bool(success)}

    def observation_spec(self) -> dict[str, ArraySpec]:
        spec = {"state": ArraySpec((self.state_dim,), "float32")}
        for camera in self.cameras:
            spec[f"image_{camera}"] = ArraySpec((self.image_size, self.image_size, 3), "uint8")
        return spec

    def render(self, camera: str | None = None, size: int | None = None) -> np.ndarray:
        """uint8 HxWx3 frame for videos; defaults to the first observation camera (or the task's default)."""
        camera = camera or (self.cameras or self.default_cameras)[0]
        self._check_camera(camera)
        return self._camera_renderer.render(self.data, camera, size or self.image_size)

    def close(self) -> None:
        self._camera_renderer.close()

    def _observe(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": np.asarray(state, dtype=np.float32)}
        for camera in self.cameras:
            obs[f"image_{camera}"] = self._camera_renderer.render(self.data, camera, self.image_size)
        return obs

    def _check_camera(self, camera: str) -> None:
        names = self._camera_renderer.camera_names
        if camera not in names:
            close = difflib.get_close_matches(camera, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PolcacheError(f"{self.task}: unknown camera {camera!r} (cameras: {', '.join(names)}){hint}")

    def __enter__(self) -> "TaskEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
