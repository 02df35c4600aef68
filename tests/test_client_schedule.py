"""Action schedule on a synthetic timeline: latency compensation, blending, epochs."""

from __future__ import annotations

import numpy as np
import pytest

from polcache_client.protocol import ActionChunk
from polcache_client.schedule import ActionSchedule

HZ = 10.0


def chunk(seq: int, t0: float, values, epoch: int = 0) -> ActionChunk:
    values = np.asarray(values, np.float32)
    return ActionChunk(epoch=epoch, seq=seq, obs_seqs=[seq], t_capture=t0, t_actions=t0 + np.arange(len(values)) / HZ,
                       actions=values[:, None].repeat(2, axis=1), timing={})


def value(schedule: ActionSchedule, now: float):
    action = schedule.action_at(now)
    return None if action is None else float(action[0])


def test_past_due_actions_are_dropped_and_the_rest_keep_their_times():
    s = ActionSchedule(HZ)
    assert s.add(chunk(0, 0.0, [0, 1, 2, 3]), now=0.12) == 1  # action 0 was due at 0.0
    assert value(s, 0.12) == 1.0  # due at 0.1, within half a period
    assert value(s, 0.2) == 2.0
    assert s.depth(0.2) == 2
    assert value(s, 0.3) == 3.0
    assert value(s, 0.4) is None and s.depth(0.4) == 0


def test_chunk_arriving_after_all_its_actions_is_dropped_entirely():
    s = ActionSchedule(HZ)
    assert s.add(chunk(0, 0.0, [0, 1]), now=0.5) == 2
    assert value(s, 0.5) is None


@pytest.mark.parametrize("blend, decay, expected", [("latest", 0.5, 10.0), ("ensemble", 0.0, 5.0),
                                                    ("ensemble", 1.0, 10.0 / (1 + np.exp(-1.0)))])
def test_overlapping_chunks_blend(blend, decay, expected):
    s = ActionSchedule(HZ, blend=blend, decay=decay)
    s.add(chunk(0, 0.0, [0, 0, 0, 0]), now=0.0)
    s.add(chunk(1, 0.1, [10, 10, 10, 10]), now=0.1)
    assert value(s, 0.2) == pytest.approx(expected)


def test_ensemble_uses_only_chunks_covering_now():
    s = ActionSchedule(HZ, decay=0.0)
    s.add(chunk(0, 0.0, [0, 0]), now=0.0)
    s.add(chunk(1, 0.1, [10, 10, 10]), now=0.1)
    assert value(s, 0.1) == 5.0
    assert value(s, 0.2) == 10.0  # the first chunk has ended


def test_stale_chunks_are_refused():
    s = ActionSchedule(HZ)
    assert s.add(chunk(5, 0.0, [1, 1]), now=0.0) == 0
    assert s.add(chunk(4, 0.0, [2, 2]), now=0.0) is None  # older than the newest accepted
    assert s.add(chunk(5, 0.0, [2, 2]), now=0.0) is None  # duplicate
    assert s.add(chunk(6, 0.0, [2, 2], epoch=1), now=0.0) is None  # another epoch


def test_reset_never_mixes_epochs():
    s = ActionSchedule(HZ)
    s.add(chunk(9, 0.0, [1, 1, 1, 1]), now=0.0)
    s.reset(epoch=1)
    assert value(s, 0.1) is None  # old chunk forgotten
    assert s.add(chunk(10, 0.0, [1, 1, 1, 1], epoch=0), now=0.1) is None  # in flight from before the reset
    assert s.add(chunk(0, 0.1, [7, 7]), now=0.1) is None  # epoch 0 again: refused
    assert s.add(chunk(0, 0.1, [7, 7], epoch=1), now=0.1) == 0  # first chunk of the new epoch, seq restarts
    assert value(s, 0.1) == 7.0


def test_chunks_are_bounded():
    s = ActionSchedule(HZ, max_chunks=3, decay=0.0)
    for seq in range(10):
        s.add(chunk(seq, 0.0, np.full(100, seq)), now=0.0)
    assert value(s, 0.0) == pytest.approx(8.0)  # mean of the last three (7, 8, 9)


def test_unknown_blend_mode_is_refused():
    with pytest.raises(ValueError, match="blend"):
        ActionSchedule(HZ, blend="median")


def test_a_large_decay_blends_without_overflow_and_nan_is_refused():
    import math

    import numpy as np
    import pytest

    from polcache_client import ActionSchedule
    from polcache_client.protocol import ActionChunk

    def chunk(seq, value):
        return ActionChunk(epoch=0, seq=seq, obs_seqs=[seq], t_capture=100.0, t_actions=100 + np.arange(8) / 20,
                           actions=np.full((8, 2), value, np.float32), timing={})

    for decay, want in ((-800.0, 1.0), (800.0, 2.0)):  # all weight on the oldest / the newest chunk
        s = ActionSchedule(20, decay=decay)
        s.reset(0)
        s.add(chunk(0, 1.0), 100.0)
        s.add(chunk(1, 2.0), 100.0)
        np.testing.assert_array_equal(s.action_at(100.0), [want, want])
    for bad in ({"decay": math.nan}, {"hz": 0}, {"max_chunks": 0}):
        with pytest.raises(ValueError):
            ActionSchedule(**({"hz": 20} | bad))
