"""Meta-World v3 tasks behind the TaskEnv interface."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mujoco
import numpy as np

from polcache.envs.base import TaskEnv


def metaworld_tasks() -> list[str]:
    """Every Meta-World v3 task that ships a scripted expert (all 50 in metaworld 3.1.1)."""
    from metaworld.policies import ENV_POLICY_MAP

    return sorted(ENV_POLICY_MAP)


class MetaWorldEnv(TaskEnv):
    """A Meta-World MT1 task; state is Meta-World's 39-d observation (hand, gripper, objects,
    previous frame, goal).

    Meta-World's MT1 picks each episode's goal from 50 pre-drawn ones, with a generator that
    reset(seed=...) does not touch, so episodes would not follow the seed. Here the env draws
    its object/goal vector from its own generator, re-seeded on every reset: each seed gives
    its own reproducible episode from the same distribution MT1 draws from.
    """

    default_cameras = ("corner",)
    action_dim = 4

    def __init__(self, task: str, seed: int | None, image: bool, cameras: tuple[str, ...] | None, image_size: int) -> None:
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers Meta-World/MT1 with gymnasium)
        from metaworld.wrappers import RandomTaskSelectWrapper

        self.task = task
        self.description = f"{task.removesuffix('-v3').replace('-', ' ')} (Meta-World {task})"
        self._gym = gym.make("Meta-World/MT1", env_name=task, seed=0, disable_env_checker=True)
        self.max_episode_steps = int(self._gym.spec.max_episode_steps)
        self.state_dim = int(self._gym.observation_space.shape[0])
        self._sim = self._gym.unwrapped
        # MT1's first task sets the goal-observable flag; then episodes come from our seed.
        selector = self._gym
        while not isinstance(selector, RandomTaskSelectWrapper):
            selector = selector.env
        selector.toggle_sample_tasks_on_reset(False)
        self._sim.set_task(selector.tasks[0])
        self._sim._freeze_rand_vec = False
        self._sim.seeded_rand_vec = True
        super().__init__(self._sim.model, seed, image, cameras, image_size)

    @property
    def data(self) -> mujoco.MjData:
        return self._sim.data

    @property
    def control_period_s(self) -> float:
        return float(self._sim.dt)  # timestep x frame skip: 0.0125 s (80 Hz) in Meta-World v3

    def _reset(self, seed: int) -> np.ndarray:
        self._sim.seed(seed)
        state, _ = self._gym.reset(seed=seed)
        return state

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        # The MT1 TimeLimit truncates at spec.max_episode_steps; success never terminates.
        state, reward, terminated, truncated, info = self._gym.step(action)
        return state, float(reward), terminated or truncated, bool(info["success"])

    def rest_action(self, last: np.ndarray) -> np.ndarray:
        """No hand motion; the gripper keeps its last command (zero effort would let go of a held object)."""
        return np.concatenate([np.zeros(3, dtype=last.dtype), last[3:]])

    def goal(self) -> np.ndarray:
        """The episode's goal position, for checking that seeds vary the task."""
        return np.array(self._sim._target_pos, dtype=np.float64)

    def close(self) -> None:
        super().close()
        self._gym.close()


def metaworld_expert(task: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Meta-World's scripted policy for `task`, reading the 39-d state."""
    from metaworld.policies import ENV_POLICY_MAP

    # The experts' gains saturate by design; Meta-World warns about it on every new policy.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
    policy = ENV_POLICY_MAP[task]()

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(policy.get_action(obs["state"].astype(np.float64)), dtype=np.float32)

    act.__name__ = f"metaworld.policies.{type(policy).__name__}"
    return act
