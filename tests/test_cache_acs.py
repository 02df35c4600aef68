"""solve_acs: exact against brute force, earliest among ties, forced last step, clear errors."""

import itertools

import numpy as np
import pytest

from polcache.cache import solve_acs
from polcache.cache.acs import acs_score
from polcache.cache.errors import CacheError


def brute_force(sim: np.ndarray, budget: int) -> tuple[float, list[int]]:
    """Best score and the lexicographically earliest optimal steps, by enumeration."""
    K = sim.shape[0]
    best, best_steps = -np.inf, None
    for rest in itertools.combinations(range(1, K), budget - 1):  # lexicographic order
        steps = [0, *rest]
        score = acs_score(sim, steps)
        if score > best + 1e-9:
            best, best_steps = score, steps
    return best, best_steps


@pytest.mark.parametrize("K", [1, 2, 5, 8])
def test_matches_brute_force_on_random_matrices(K):
    rng = np.random.default_rng(K)
    for _ in range(5):
        sim = rng.uniform(-1, 1, (K, K))
        for budget in range(1, K + 1):
            steps = solve_acs(sim, budget)
            score, expected = brute_force(sim, budget)
            assert steps == expected
            assert acs_score(sim, steps) == pytest.approx(score)


def test_ties_go_to_earliest_steps():
    assert solve_acs(np.ones((6, 6)), 3) == [0, 1, 2]
    sim = np.zeros((5, 5))
    assert solve_acs(sim, 2) == [0, 1]


def test_similarity_structure_is_followed():
    # two regimes: steps 0-3 alike, steps 4-7 alike, nothing alike across
    sim = np.zeros((8, 8))
    sim[:4, :4] = 1.0
    sim[4:, 4:] = 1.0
    assert solve_acs(sim, 2) == [0, 4]


def test_force_last_adds_the_final_step_and_optimises_the_rest():
    rng = np.random.default_rng(0)
    sim = rng.uniform(0, 1, (9, 9))
    steps = solve_acs(sim, 3, force_last=True)
    assert steps[-1] == 8 and len(steps) == 4
    assert steps[:-1] == brute_force(sim[:8, :8], 3)[1]
    assert solve_acs(sim, 8, force_last=True) == list(range(9))
    assert solve_acs(sim, 9, force_last=True) == list(range(9))
    assert solve_acs(np.ones((1, 1)), 1, force_last=True) == [0]


@pytest.mark.parametrize("budget", [0, 6, -1, 2.5, True])
def test_budget_out_of_range_is_an_error(budget):
    with pytest.raises(CacheError, match="budget"):
        solve_acs(np.eye(5), budget)


def test_bad_matrices_are_errors():
    with pytest.raises(CacheError, match="square"):
        solve_acs(np.ones((3, 4)), 2)
    with pytest.raises(CacheError, match="square"):
        solve_acs(np.ones(4), 2)
    with pytest.raises(CacheError, match="NaN"):
        solve_acs(np.full((3, 3), np.nan), 2)


def test_default_size_is_fast():
    import time

    sim = np.random.default_rng(1).uniform(0, 1, (100, 100))
    t = time.perf_counter()
    steps = solve_acs(sim, 20, force_last=True)
    assert time.perf_counter() - t < 0.5
    assert steps == sorted(set(steps)) and len(steps) == 21
