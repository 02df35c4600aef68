"""Bubbling Union on hand-made cases."""

import pytest

from polcache.cache.bubbling import bubbling_union, legacy_layer_kind, top_blocks
from polcache.cache.errors import CacheError

NAMES = [f"layers.{i}.{k}" for i in range(3) for k in ("sa", "ca", "ffn")]
WHERE = [(i, k) for i in range(3) for k in ("sa", "ca", "ffn")]  # (layer, kind) as the Blocks carry them
# per-block ACS steps: FFN blocks at layers 0, 1, 2 update at {0,5}, {0,6}, {0,7}; others at {0, i}
STEPS = [[0, 5] if n == "layers.0.ffn" else [0, 6] if n == "layers.1.ffn" else [0, 7] if n == "layers.2.ffn"
         else [0, 10 + i] for i, n in enumerate(NAMES)]


def test_selected_block_gains_ffn_steps_of_its_layer_and_later():
    out = bubbling_union(STEPS, WHERE, [NAMES.index("layers.1.sa")])
    assert out[NAMES.index("layers.1.sa")] == [0, 6, 7, 13]
    unselected = [i for i in range(len(NAMES)) if NAMES[i] != "layers.1.sa"]
    assert [out[i] for i in unselected] == [STEPS[i] for i in unselected]


def test_first_layer_block_gains_every_ffn_and_ffn_gains_later_ffns():
    out = bubbling_union(STEPS, WHERE, [NAMES.index("layers.0.ca"), NAMES.index("layers.1.ffn")])
    assert out[NAMES.index("layers.0.ca")] == [0, 5, 6, 7, 11]
    assert out[NAMES.index("layers.1.ffn")] == [0, 6, 7]  # original ACS steps of other FFNs, not BU'd ones


def test_last_ffn_and_no_selection_are_unchanged():
    assert bubbling_union(STEPS, WHERE, [NAMES.index("layers.2.ffn")]) == STEPS
    assert bubbling_union(STEPS, WHERE, []) == STEPS


def test_top_blocks_highest_first_ties_earliest():
    assert top_blocks([0.1, 0.5, 0.3, 0.5], 2) == [1, 3]
    assert top_blocks([0.1, 0.5, 0.3, 0.5], 0) == []
    with pytest.raises(CacheError, match="0..4"):
        top_blocks([0.1, 0.5, 0.3, 0.5], 5)


def test_blocks_are_described_by_layer_and_kind_not_by_their_names():
    renamed = ["expert.attn.0", "expert.cross.0", "expert.mlp.0", "expert.attn.1", "expert.cross.1", "expert.mlp.1",
               "expert.attn.2", "expert.cross.2", "expert.mlp.2"]  # another family's naming, same structure
    assert bubbling_union(STEPS, WHERE, [renamed.index("expert.attn.1")]) == bubbling_union(
        STEPS, WHERE, [NAMES.index("layers.1.sa")])


def test_legacy_schedule_names_are_parsed_or_rejected():
    assert legacy_layer_kind("layers.12.ffn") == (12, "ffn")
    with pytest.raises(CacheError, match="layers"):
        legacy_layer_kind("decoder.3.mlp")
