"""pad-reach: cue-reach's scene with the cue removed, so only the instruction says where to go.

Three tasks, one per pad (pad-reach-left, -middle, -right). Nothing in the state or the image
tells them apart: no pad ever lights up, the expert approaches the dock the same way whatever
the target, and the dock holds the end effector until the go signal. A policy that ignores its
instruction can do no better than pick a pad: 1/3 over the three tasks, and a policy given
another pad's instruction goes to that pad and fails. This is the test that a
language-conditioned policy reads its words, which Meta-World cannot give (each MT10 task has
its own scene, so the state already names the task).
"""

from __future__ import annotations

import numpy as np

from polcache.envs.cue_reach import CueReachEnv

PAD_NAMES = ("left", "middle", "right")  # pad0, pad1 (straight ahead of the dock), pad2
PAD_REACH_TASKS = tuple(f"pad-reach-{name}" for name in PAD_NAMES)


class PadReachEnv(CueReachEnv):
    """One pad-reach task: the target is fixed by the task name; the cue never shows."""

    shows_cue = False

    def __init__(self, task: str, seed: int | None, image: bool, cameras: tuple[str, ...] | None,
                 image_size: int) -> None:
        self.task = task
        self._pad = PAD_REACH_TASKS.index(task)
        self.description = (f"{task}: wait at the dock until it turns green, then move to the {PAD_NAMES[self._pad]} pad "
                            "(only the instruction says which)")
        super().__init__(seed, image, cameras, image_size)

    def _choose_target(self, rng: np.random.Generator) -> int:
        return self._pad
