"""cue-reach: a memory task that a policy seeing only its last few observations cannot solve.

Episode timeline (t = observations seen so far, observation t comes before action t):
  t < CUE_STEPS        the correct pad is lit (state: one-hot cue; with a camera only the yellow pad)
  t >= CUE_STEPS       all pads look identical and the cue part of the state is zero
  by DOCK_BY           the end effector must have entered the dock, which captures it
                       (centred, zero velocity, actions ignored) until the go signal
  t >= GO_STEP         the dock turns green (state: go flag = 1); the end effector is free

Success: after the go signal, the first pad the end effector enters is the lit one
(centre within the pad radius); it stays True for the rest of the episode. Entering a pad
before the go signal, not being docked by DOCK_BY, or entering a wrong pad ends the episode
as a failure. Because the dock erases the approach path, observations DOCK_BY..GO_STEP are
identical whatever the target, so a policy that sees at most GO_STEP - DOCK_BY + 1 recent
observations at decision time picks a pad independently of the cue: 1/3 success at best.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

import mujoco
import numpy as np

from polcache.envs.base import TaskEnv

CUE_STEPS = 10
DOCK_BY = 30
GO_STEP = 35
MAX_STEPS = 70
FRAME_SKIP = 5  # physics steps per control step: 0.05 s at the model's 0.01 s timestep
START = np.array([0.0, -0.22])
START_JITTER = np.array([0.06, 0.03])

_PAD_OFF = np.array([0.25, 0.27, 0.33, 1.0])
_PAD_LIT = np.array([1.0, 0.85, 0.1, 1.0])
_DOCK_WAIT = np.array([0.35, 0.35, 0.38, 1.0])
_DOCK_GO = np.array([0.1, 0.8, 0.2, 1.0])


class CueReachEnv(TaskEnv):
    """Point-mass end effector with 2-D velocity actions in [-1, 1] (scaled to the actuators'
    speed range). State (8,): position xy, velocity xy, cue one-hot (zero after the cue
    phase, and always zero when a camera renders the scene: an image policy must read the lit
    pad from pixels), go flag."""

    task = "cue-reach"
    description = (
        "cue-reach: remember which pad lights up, wait at the dock until it turns green, "
        "then move to the pad that was lit"
    )
    default_cameras = ("top",)
    action_dim = 2
    state_dim = 8
    max_episode_steps = MAX_STEPS

    def __init__(self, seed: int | None, image: bool, cameras: tuple[str, ...] | None, image_size: int) -> None:
        xml = resources.files("polcache.envs").joinpath("assets/cue_reach.xml").read_text()
        self.model = mujoco.MjModel.from_xml_string(xml)
        self._data = mujoco.MjData(self.model)
        geom = lambda name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, name)  # noqa: E731
        self._pad_ids = [geom(f"pad{i}") for i in range(3)]
        self._dock_id = geom("dock")
        self.pads = self.model.geom_pos[self._pad_ids, :2].copy()
        self.pad_radius = float(self.model.geom_size[self._pad_ids[0], 0])
        self.dock = self.model.geom_pos[self._dock_id, :2].copy()
        self.dock_radius = float(self.model.geom_size[self._dock_id, 0])
        self.max_speed = float(self.model.actuator_ctrlrange[0, 1])
        self.target = 0
        super().__init__(self.model, seed, image, cameras, image_size)

    @property
    def data(self) -> mujoco.MjData:
        return self._data

    @property
    def position(self) -> np.ndarray:
        return self._data.qpos[:2].copy()

    @property
    def docked(self) -> bool:
        return self._docked

    @property
    def go(self) -> bool:
        return self._t >= GO_STEP

    shows_cue = True  # pad-reach (pad_reach.py) keeps the scene and hides the cue

    def _choose_target(self, rng: np.random.Generator) -> int:
        return int(rng.integers(3))

    def _reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        self.target = self._choose_target(rng)
        mujoco.mj_resetData(self.model, self._data)
        self._data.qpos[:2] = START + rng.uniform(-START_JITTER, START_JITTER)
        self._t = 0
        self._docked = False
        self._success = False
        self._paint()
        mujoco.mj_forward(self.model, self._data)  # camera and body poses for the first frame
        return self._state()

    @property
    def control_period_s(self) -> float:
        return float(self.model.opt.timestep) * FRAME_SKIP

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        failed = False
        if self._docked and not self.go:
            self._hold_at_dock()
        else:
            self._data.ctrl[:] = action * self.max_speed
            mujoco.mj_step(self.model, self._data, nstep=FRAME_SKIP)
        self._t += 1
        pos = self.position
        if not self.go and not self._docked and np.linalg.norm(pos - self.dock) < self.dock_radius:
            self._docked = True
            self._hold_at_dock()
        if not self._success:
            inside = [i for i in range(3) if np.linalg.norm(pos - self.pads[i]) < self.pad_radius]
            if inside:
                if self._t > GO_STEP and inside[0] == self.target:
                    self._success = True
                else:
                    failed = True  # a pad before the go signal, or the wrong pad
        if not self.go and not self._docked and self._t >= DOCK_BY:
            failed = True
        self._paint()
        done = failed or self._t >= self.max_episode_steps
        return self._state(), float(self._success), done, self._success

    def _hold_at_dock(self) -> None:
        self._data.qpos[:2] = self.dock
        self._data.qvel[:] = 0.0
        self._data.ctrl[:] = 0.0
        mujoco.mj_forward(self.model, self._data)

    def _paint(self) -> None:
        """Light the cue pad during the cue phase and the dock once the go signal is on."""
        for i, gid in enumerate(self._pad_ids):
            lit = self.shows_cue and self._t < CUE_STEPS and i == self.target
            self.model.geom_rgba[gid] = _PAD_LIT if lit else _PAD_OFF
        self.model.geom_rgba[self._dock_id] = _DOCK_GO if self.go else _DOCK_WAIT

    def _state(self) -> np.ndarray:
        cue = np.zeros(3)
        if self.shows_cue and self._t < CUE_STEPS and not self.image:  # with a camera the lit pad is the only cue
            cue[self.target] = 1.0
        return np.concatenate([self._data.qpos[:2], self._data.qvel[:2], cue, [float(self.go)]]).astype(np.float32)


def cue_reach_expert(env: CueReachEnv) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Scripted expert: dock, wait, then go to the true target (read from the env, not the cue)."""

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        pos = obs["state"][:2].astype(np.float64)
        if env.go:
            goal = env.pads[env.target]
        elif env.docked:
            return np.zeros(2, dtype=np.float32)
        else:
            goal = env.dock
        # Velocity proportional to the remaining distance (0.1 s time constant), saturating.
        return np.clip((goal - pos) / (0.1 * env.max_speed), -1.0, 1.0).astype(np.float32)

    act.__name__ = "polcache.envs.cue_reach.cue_reach_expert"
    return act
