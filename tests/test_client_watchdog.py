"""Watchdog: hold the last action, then one safe stop, then a clean resume."""

from __future__ import annotations

import numpy as np

from polcache_client.watchdog import State, Watchdog

A = np.ones(2, np.float32)
B = np.full(2, 2.0, np.float32)


def test_waiting_until_the_first_action():
    w = Watchdog(hold_s=0.1)
    assert w.step(0.0, None) == (State.WAITING, None, False)
    assert w.step(1.0, None) == (State.WAITING, None, False)  # never stops a robot that never moved
    state, action, stop = w.step(1.1, A)
    assert state is State.FRESH and action is A and not stop


def test_hold_then_stop_once_then_resume():
    w = Watchdog(hold_s=0.1)
    w.step(0.0, A)
    state, action, stop = w.step(0.05, None)
    assert state is State.HOLDING and action is A and not stop
    assert w.step(0.1, None).state is State.HOLDING
    assert w.step(0.15, None) == (State.STOPPED, None, True)
    assert w.step(0.2, None) == (State.STOPPED, None, False)  # safe_stop is requested once
    state, action, stop = w.step(0.3, B)
    assert state is State.FRESH and action is B and not stop
    assert w.step(0.35, None).action is B  # holds the new action, not the one before the stop


def test_reset_returns_to_waiting():
    w = Watchdog(hold_s=0.1)
    w.step(0.0, A)
    w.reset()
    assert w.step(0.01, None) == (State.WAITING, None, False)
