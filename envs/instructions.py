"""Instructions per task for language-conditioned policies: several paraphrases to train on and
held-out ones that training never sees (evaluation checks the policy follows the meaning, not
the exact words). Written for Meta-World's MT10 and our cue-reach and pad-reach tasks."""

from __future__ import annotations

import numpy as np

from polcache.errors import PolcacheError
from polcache.policy.language import encode_instruction

SPLITS = ("train", "heldout")

INSTRUCTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "reach-v3": {
        "train": ("reach the goal", "move the gripper to the target", "put the hand on the goal point",
                  "go to the target position", "bring the end effector to the goal"),
        "heldout": ("touch the target spot with the gripper", "move your hand to the goal location"),
    },
    "push-v3": {
        "train": ("push the puck to the goal", "slide the puck onto the target", "shove the puck to the goal point",
                  "push the block to the target", "move the puck to the goal by pushing it"),
        "heldout": ("nudge the puck over to the target", "push the small puck to the goal spot"),
    },
    "pick-place-v3": {
        "train": ("pick up the puck and place it at the goal", "grab the puck and put it on the target",
                  "lift the puck and set it down at the goal", "pick the puck up and move it to the target",
                  "grasp the puck and place it on the goal"),
        "heldout": ("take the puck and drop it at the target", "pick and place the puck onto the goal"),
    },
    "door-open-v3": {
        "train": ("open the door", "pull the door open", "swing the door open by its handle",
                  "open the door with the handle", "pull the handle to open the door"),
        "heldout": ("swing open the door", "get the door open"),
    },
    "drawer-open-v3": {
        "train": ("open the drawer", "pull the drawer open", "pull out the drawer",
                  "slide the drawer open", "open the drawer by its handle"),
        "heldout": ("pull the drawer out all the way", "get the drawer open"),
    },
    "drawer-close-v3": {
        "train": ("close the drawer", "push the drawer closed", "push in the drawer",
                  "slide the drawer shut", "shut the drawer"),
        "heldout": ("push the drawer shut", "get the drawer closed"),
    },
    "button-press-topdown-v3": {
        "train": ("press the button from the top", "push the button down", "press down on the button",
                  "push the button from above", "press the button"),
        "heldout": ("press the button down from above", "hit the button from the top"),
    },
    "peg-insert-side-v3": {
        "train": ("insert the peg into the hole", "put the peg in the hole from the side",
                  "push the peg sideways into the hole", "grab the peg and insert it in the hole",
                  "slide the peg into the side hole"),
        "heldout": ("fit the peg into the hole", "place the peg in the side hole"),
    },
    "window-open-v3": {
        "train": ("open the window", "slide the window open", "push the window open to the side",
                  "open the sliding window", "slide the window to open it"),
        "heldout": ("get the window open", "move the window open"),
    },
    "window-close-v3": {
        "train": ("close the window", "slide the window closed", "push the window shut",
                  "close the sliding window", "slide the window to close it"),
        "heldout": ("get the window closed", "move the window shut"),
    },
    "cue-reach": {
        "train": ("reach the target the cue showed", "go to the cued target", "move to the target shown by the cue",
                  "reach the cued goal", "touch the target the light pointed at"),
        "heldout": ("go where the cue pointed", "reach the goal the cue indicated"),
    },
    # pad-reach: the words are the only cue (envs/pad_reach.py). Twelve training phrasings in the
    # same frames for every pad, so only the pad's word tells them apart (five were too few for the
    # expert to ignore the frame: BENCHMARKS.md, pad-reach); the held-out ones use words and
    # frames the training set avoids ("leftmost", "centre", "the ... one, please").
    "pad-reach-left": {
        "train": ("go to the left pad", "reach the pad on the left", "move to the left target",
                  "touch the left pad", "head for the pad on the left side",
                  "I need you at the left pad", "left pad", "the pad on the left is your goal",
                  "aim for the left target", "could you reach the left pad",
                  "your target is the pad on the left", "move over to the left pad now"),
        "heldout": ("reach the leftmost pad", "the left one, please"),
    },
    "pad-reach-middle": {
        "train": ("go to the middle pad", "reach the pad in the middle", "move to the middle target",
                  "touch the middle pad", "head for the pad in the middle",
                  "I need you at the middle pad", "middle pad", "the pad in the middle is your goal",
                  "aim for the middle target", "could you reach the middle pad",
                  "your target is the pad in the middle", "move over to the middle pad now"),
        "heldout": ("reach the pad in the centre", "the middle one, please"),
    },
    "pad-reach-right": {
        "train": ("go to the right pad", "reach the pad on the right", "move to the right target",
                  "touch the right pad", "head for the pad on the right side",
                  "I need you at the right pad", "right pad", "the pad on the right is your goal",
                  "aim for the right target", "could you reach the right pad",
                  "your target is the pad on the right", "move over to the right pad now"),
        "heldout": ("reach the rightmost pad", "the right one, please"),
    },
}


def instructions(task: str, split: str = "train") -> tuple[str, ...]:
    """The task's instructions of one split (train | heldout)."""
    if split not in SPLITS:
        raise PolcacheError(f"instruction split {split!r}: expected one of {', '.join(SPLITS)}")
    if task not in INSTRUCTIONS:
        raise PolcacheError(f"no instructions are written for task {task!r} (have: {', '.join(sorted(INSTRUCTIONS))}); "
                            "give the policy one yourself (eval, sim-robot: --instruction TEXT)")
    return INSTRUCTIONS[task][split]


def instruction_array(task: str, split: str, index: int, length: int) -> np.ndarray:
    """The `index`-th instruction of the split (cycling), encoded for a policy reading `length` bytes."""
    texts = instructions(task, split)
    return encode_instruction(texts[index % len(texts)], length)
