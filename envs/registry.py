"""Task names -> environments and scripted experts, with one error for an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import numpy as np

from polcache.envs.base import TaskEnv
from polcache.errors import PolcacheError, UnknownTaskError

CUE_REACH = "cue-reach"
PAD_REACH = "pad-reach-"
Expert = Callable[[dict[str, np.ndarray]], np.ndarray]


def _own_tasks() -> list[str]:
    """polcache's own tasks, which need MuJoCo but not Meta-World."""
    from polcache.envs.pad_reach import PAD_REACH_TASKS

    return [CUE_REACH, *PAD_REACH_TASKS]


def list_tasks() -> list[str]:
    """Every task make_env accepts: polcache's own, and all Meta-World v3 tasks where metaworld is
    installed (a robot workstation may have MuJoCo alone)."""
    from polcache.envs.metaworld_env import metaworld_tasks

    try:
        return metaworld_tasks() + _own_tasks()
    except ImportError:
        return _own_tasks()


def check_task(task: str) -> None:
    """Refuse an unknown task name in one line, with the closest known ones; polcache's own tasks
    are accepted without importing Meta-World."""
    if task in _own_tasks():
        return
    from polcache.envs.metaworld_env import metaworld_tasks

    try:
        tasks = metaworld_tasks() + _own_tasks()
    except ImportError:
        raise UnknownTaskError(f"task {task!r} is not one of polcache's own ({CUE_REACH}, {PAD_REACH}*), and "
                               f"Meta-World, whose task it may be, is not installed: pip install "
                               f"'polcache[sim]'") from None
    if task not in tasks:
        close = difflib.get_close_matches(task, tasks, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see polcache.envs.list_tasks()"
        raise UnknownTaskError(f"unknown task {task!r}{hint}")


def make_env(
    task: str,
    seed: int | None = None,
    image: bool = False,
    cameras: tuple[str, ...] | None = None,
    image_size: int = 96,
) -> TaskEnv:
    """Build `task`. image=True adds "image_<camera>" observations for `cameras` (default: the
    task's usual camera); giving cameras alone also turns images on."""
    check_task(task)
    cameras = tuple(cameras) if cameras else None
    if task == CUE_REACH:
        from polcache.envs.cue_reach import CueReachEnv

        return CueReachEnv(seed, image, cameras, image_size)
    if task.startswith(PAD_REACH):
        from polcache.envs.pad_reach import PadReachEnv

        return PadReachEnv(task, seed, image, cameras, image_size)
    from polcache.envs.metaworld_env import MetaWorldEnv

    return MetaWorldEnv(task, seed, image, cameras, image_size)


def make_expert(task: str, env: TaskEnv) -> Expert:
    """The scripted expert for `task`: obs dict -> action. `env` must be the env it acts in
    (cue-reach's and pad-reach's expert reads the true target from it)."""
    check_task(task)
    if env.task != task:
        raise PolcacheError(f"expert for {task!r} asked to act in a {env.task!r} env")
    if task == CUE_REACH or task.startswith(PAD_REACH):  # the same scene and expert
        from polcache.envs.cue_reach import cue_reach_expert

        return cue_reach_expert(env)
    from polcache.envs.metaworld_env import metaworld_expert

    return metaworld_expert(task)
