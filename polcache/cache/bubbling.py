"""Bubbling Union (BU): stop feed-forward blocks from recomputing on stale upstream inputs.

With per-block schedules, an FFN block that recomputes at its own update step reads a
residual stream corrupted by upstream blocks still serving stale deltas, and has no
normalisation inside its branch to absorb that error. BU picks the blocks whose outputs
change most across steps (mean pairwise L1 distance in the uncached run) and lets each
of them also update whenever an FFN block at its layer or later updates.

Blocks are described by their layer and kind as the model's `Block`s carry them (any policy
family: a VLA action expert's feed-forward blocks are kind `ffn` too), never parsed from names;
`legacy_layer_kind` reads schedule files written before the layers and kinds were stored.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from polcache.cache.errors import CacheError
from polcache.policy.blocks import FFN

_NAME = re.compile(r"^layers\.(\d+)\.(sa|ca|ffn)$")


def legacy_layer_kind(name: str) -> tuple[int, str]:
    """`layers.<i>.<kind>` -> (i, kind), for schedule files that predate stored layers/kinds."""
    m = _NAME.match(name)
    if m is None:
        raise CacheError(f"block name {name!r} is not of the form layers.<i>.<sa|ca|ffn>")
    return int(m.group(1)), m.group(2)


def top_blocks(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the n highest-scoring blocks, highest first (equal scores: earlier block first)."""
    if not 0 <= n <= len(scores):
        raise CacheError(f"Bubbling Union block count must be in 0..{len(scores)}, got {n}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:n]]


def bubbling_union(update_steps: Sequence[Sequence[int]], layer_kind: Sequence[tuple[int, str]],
                   selected: Sequence[int]) -> list[list[int]]:
    """Per-block update steps after BU: each selected block gains the (original, per-block ACS)
    update steps of every FFN block at the same or a later layer; `layer_kind[i]` is block i's
    (layer, kind)."""
    if len(update_steps) != len(layer_kind):
        raise CacheError(f"{len(update_steps)} step lists for {len(layer_kind)} blocks")
    out = [sorted(set(s)) for s in update_steps]
    for u in selected:
        layer_u = layer_kind[u][0]
        merged = set(out[u])
        for j, (layer, kind) in enumerate(layer_kind):
            if kind == FFN and layer >= layer_u:
                merged.update(update_steps[j])
        out[u] = sorted(merged)
    return out
