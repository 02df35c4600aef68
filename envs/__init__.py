"""Simulation tasks (imported as polcache.envs): Meta-World v3 and the cue-reach memory task,
behind one small TaskEnv interface, plus scripted experts and demonstration recording.

Exports are lazy, so that importing the package (the `polcache` command does, to register
`record`) never imports MuJoCo: a robot workstation serves policies without the sim extra."""

import os

from polcache.lazy import lazy_exports

# MuJoCo reads MUJOCO_GL at its first import: EGL renders headless, GLFW needs a display.
os.environ.setdefault("MUJOCO_GL", "egl")

_EXPORTS = {
    "TaskEnv": "polcache.envs.base",
    "Perturbations": "polcache.envs.record",
    "record_demonstrations": "polcache.envs.record",
    "check_task": "polcache.envs.registry",
    "list_tasks": "polcache.envs.registry",
    "make_env": "polcache.envs.registry",
    "make_expert": "polcache.envs.registry",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, hint=(
    f" (MuJoCo's renderer, MUJOCO_GL={os.environ['MUJOCO_GL']}: egl needs libEGL, osmesa needs libosmesa6; "
    "MUJOCO_GL=disable runs state-only tasks without one)"))
