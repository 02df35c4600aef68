"""Fixed-rate pacing: an absolute grid, reported lateness, skipped (not bursted) ticks."""

from __future__ import annotations

import statistics

import pytest

from polcache_client.rate import MonotonicClock, Rate
from fakes import FakeClock


def test_ticks_follow_an_absolute_grid():
    clock = FakeClock(t=10.0)
    rate = Rate(50, clock)
    ticks = [rate.sleep() for _ in range(5)]
    assert [t.deadline for t in ticks] == pytest.approx([10.0 + i * 0.02 for i in range(5)])
    assert all(t.error == 0 and t.missed == 0 for t in ticks)


def test_lateness_is_reported_and_does_not_drift():
    clock = FakeClock(t=0.0)
    clock.lateness = 0.003
    rate = Rate(50, clock)
    ticks = [rate.sleep() for _ in range(4)]
    assert [t.error for t in ticks] == pytest.approx([0.003] * 4)
    assert [t.deadline for t in ticks] == pytest.approx([0.0, 0.02, 0.04, 0.06])


def test_a_stall_skips_grid_points_and_counts_them():
    clock = FakeClock(t=0.0)
    rate = Rate(50, clock)
    rate.sleep()
    clock.advance(0.075)  # the work after tick 0 took 3.75 periods
    tick = rate.sleep()
    assert tick.missed == 2  # 0.02 and 0.04 were skipped; 0.06 runs late
    assert tick.deadline == pytest.approx(0.06)
    assert rate.sleep().deadline == pytest.approx(0.08)


def test_a_fresh_grid_counts_no_pause_as_missed_and_never_ticks_within_a_period_of_the_last():
    clock = FakeClock(t=0.0)
    rate = Rate(50, clock)
    rate.sleep()
    clock.advance(0.008)  # an episode's reset took less than a period
    rate.reset()
    assert rate.sleep().deadline == pytest.approx(0.02)  # not at once: a 50 Hz loop would read above 50 Hz
    clock.advance(0.5)  # one that took 25 periods
    rate.reset()
    tick = rate.sleep()
    assert (tick.deadline, tick.missed) == (pytest.approx(0.52), 0)
    assert rate.sleep().deadline == pytest.approx(0.54)


def test_invalid_rate_is_refused():
    with pytest.raises(ValueError, match="positive"):
        Rate(0)


def test_monotonic_clock_wakes_close_to_the_deadline():
    rate = Rate(200, MonotonicClock())
    errors = [rate.sleep().error for _ in range(40)]
    assert min(errors) >= 0
    assert statistics.median(errors) < 0.001


def test_realtime_priority_or_a_clear_refusal():
    import subprocess
    import sys

    code = ("import os\nfrom polcache_client import use_realtime_priority\n"
            "try:\n    use_realtime_priority(10)\nexcept PermissionError as e:\n    print('refused', e)\n"
            "else:\n    print('fifo', os.sched_getscheduler(0) == os.SCHED_FIFO)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("fifo True") or ("refused" in out and "SCHED_FIFO" in out), out
