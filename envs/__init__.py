"""Simulation tasks (imported as polcache.envs): Meta-World v3 and the cue-reach memory task,
behind one small TaskEnv interface, plus scripted experts and demonstration recording."""

# First: the render module picks MUJOCO_GL, which only counts before mujoco's first import.
import polcache.envs.render  # noqa: F401  isort: skip

from polcache.envs.base import TaskEnv
from polcache.envs.record import record_demonstrations
from polcache.envs.registry import list_tasks, make_env, make_expert

__all__ = ["TaskEnv", "list_tasks", "make_env", "make_expert", "record_demonstrations"]
