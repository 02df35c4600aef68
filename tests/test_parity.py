"""The parity gate judges the median probe: one chaotic probe passes, a graph wrong everywhere or
NaN anywhere does not."""

import numpy as np
import pytest

from polcache.errors import PrecisionError
from polcache.policy.parity import DEFAULT_TOLERANCE, PROBES, check_parity, chunk_deviation

rng = np.random.default_rng(0)
REFERENCE = rng.uniform(-1, 1, (PROBES, 16, 4))


def test_a_single_probe_far_off_passes_and_is_reported():
    candidate = REFERENCE + 1e-4
    candidate[3, 5, 1] += 0.13  # rounding carried through the sampler's chain on one input
    deviation = chunk_deviation(REFERENCE, candidate)
    assert deviation["median_abs"] == pytest.approx(1e-4) and deviation["max_abs"] == pytest.approx(0.1301)
    check_parity(deviation, "graph", DEFAULT_TOLERANCE)


@pytest.mark.parametrize("damage", [
    lambda c: c + 0.06,  # an offset on every probe (a wrong constant)
    lambda c: -c,  # a broken engine (cosine -1)
    lambda c: np.where(np.arange(PROBES)[:, None, None] < PROBES // 2 + 1, c + 0.2, c),  # most probes wrong
], ids=["offset", "negated", "most-probes"])
def test_a_candidate_wrong_on_most_probes_is_refused(damage):
    with pytest.raises(PrecisionError, match="disagrees with fp32 by .* on the median of 8 probe observations"):
        check_parity(chunk_deviation(REFERENCE, damage(REFERENCE.copy())), "graph", DEFAULT_TOLERANCE)


def test_nan_on_one_probe_is_refused():
    candidate = REFERENCE.copy()
    candidate[0, 0, 0] = np.nan
    with pytest.raises(PrecisionError, match="worst probe nan"):
        check_parity(chunk_deviation(REFERENCE, candidate), "graph", DEFAULT_TOLERANCE)
