"""What the Python API is given is checked once, for every backend (PolicySpec.check_observations):
a wrong observation is an ObservationError naming the key and what was expected, never actions
computed from misread input or an error from deep inside torch."""

import math
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_policy
from polcache.errors import ConfigError, ObservationError, PolcacheError
from polcache.policy import load_backend
from polcache.policy.backend import TorchBackend

rng = np.random.default_rng(0)
STATE = rng.normal(size=(1, 2, 5)).astype(np.float32)
IMAGE = rng.integers(0, 256, (1, 2, 24, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(tiny_policy(image=True), "ddim", 4)


@pytest.mark.parametrize("obs, match", [
    ([STATE], "expected a dict of key -> array, got list"),
    ({"state": STATE}, "observation 'image_cam' missing"),
    ({"state": STATE[:, :1], "image_cam": IMAGE[:, :1]}, r"'state': expected shape \(batch, 2, 5\)"),  # one frame
    ({"state": STATE[0], "image_cam": IMAGE[0]}, r"'state': expected shape \(batch, 2, 5\) with batch >= 1"),
    ({"state": STATE[:0], "image_cam": IMAGE[:0]}, "with batch >= 1, got \\(0, 2, 5\\)"),
    ({"state": STATE, "image_cam": IMAGE.astype(np.float32) / 255}, "'image_cam': expected uint8, got float32 "
                                                                     r"\(pixels 0-255\)"),
    ({"state": STATE, "image_cam": IMAGE.astype(np.int8)}, "'image_cam': expected uint8, got int8"),
    ({"state": STATE, "image_cam": IMAGE[..., :2, :]}, r"'image_cam': expected shape \(batch, 2, 24, 24, 3\)"),
    ({"state": STATE, "image_cam": IMAGE.transpose(0, 1, 4, 2, 3)}, "'image_cam': expected shape"),  # channels first
    ({"state": np.full_like(STATE, np.nan), "image_cam": IMAGE}, "'state' contains NaN or infinite values"),
    ({"state": STATE.astype(bool), "image_cam": IMAGE}, "'state': expected float32, got bool"),
    ({"state": np.repeat(STATE, 2, 0), "image_cam": IMAGE}, "'image_cam' has batch 1, the others 2"),
], ids=["list", "missing", "one-frame", "no-batch", "batch-0", "float-image", "int8-image", "image-size",
        "channels-first", "nan", "bool-state", "batch-mismatch"])
def test_a_wrong_observation_is_named(backend, obs, match):
    with pytest.raises(ObservationError, match=match):
        backend.predict(obs, seed=0)
    with pytest.raises(ObservationError, match=match):
        backend.session().predict(obs, [0, 1], seed=0)


def test_an_instructions_dtype_error_says_it_holds_text_not_pixels():
    """An instruction is uint8 like an image, but its bytes are text: the hint said "(pixels 0-255)"."""
    from polcache.policy.spec import ArraySpec, PolicySpec

    spec = PolicySpec({"instruction": ArraySpec((8,), "uint8")}, action_dim=2, n_obs_steps=1, horizon=4,
                      n_action_steps=2)
    with pytest.raises(ObservationError, match=r"^observation 'instruction': expected uint8, got int64 "
                                               r"\(UTF-8 bytes, zero-padded\)$"):
        spec.check_observations({"instruction": np.zeros((1, 1, 8), np.int64)})


def test_what_is_accepted_reads_as_the_policys_dtypes(backend):
    ref = backend.predict({"state": STATE, "image_cam": IMAGE}, seed=0)
    # float64 state is cast; a flipped (negative-stride) image is copied; extra keys are ignored
    flipped = np.ascontiguousarray(IMAGE[..., ::-1])[..., ::-1]
    got = backend.predict({"state": STATE.astype(np.float64), "image_cam": flipped, "extra": 1}, seed=0)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got.shape == (1, backend.spec.n_action_steps, backend.spec.action_dim) and got.dtype == np.float32


@pytest.mark.parametrize("seed", [-1, 2**70, 1.5, "a", True])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused(backend, seed):
    with pytest.raises(ObservationError, match="seed: expected an integer in 0..2\\^63-1"):
        backend.predict({"state": STATE, "image_cam": IMAGE}, seed=seed)


def test_a_session_refuses_steps_that_go_back_instead_of_reusing_old_frames():
    b = TorchBackend(tiny_policy(), "ddim", 4)
    s = b.session()
    s.predict({"state": STATE}, [44, 45], seed=0)
    with pytest.raises(ObservationError, match="call reset\\(\\) before a new episode"):
        s.predict({"state": STATE + 1}, [0, 1], seed=0)  # a new episode counted from 0
    with pytest.raises(ObservationError, match="frame steps must ascend"):
        s.predict({"state": STATE}, [47, 46], seed=0)
    for steps in ([45.0, 46.7], ["45", "46"], [True, 46]):
        with pytest.raises(ObservationError, match="seqs: expected integer control steps"):
            s.predict({"state": STATE}, steps, seed=0)
    s.reset()
    fresh = b.session().predict({"state": STATE + 1}, [0, 1], seed=0)
    np.testing.assert_array_equal(s.predict({"state": STATE + 1}, [0, 1], seed=0), fresh)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps: expected an integer >= 1"),
    ({"steps": 2.7}, "steps: expected an integer >= 1"),
    ({"threads": 0}, "threads: expected an integer >= 1"),
    ({"precision_tolerance": -1}, "precision_tolerance: expected a finite number >= 0"),
    ({"precision_tolerance": math.nan}, "precision_tolerance: expected a finite number >= 0"),
    ({"precision_tolerance": "0.1"}, "precision_tolerance: expected a finite number >= 0"),
    ({"candidates": "4"}, "candidates: expected an integer >= 1, got '4'"),
    ({"candidates": 2.5}, "candidates: expected an integer >= 1, got 2.5"),
    ({"candidates": True}, "candidates: expected an integer >= 1"),
    ({"candidates": 0}, "candidates: expected an integer >= 1"),
    ({"candidates": 257}, "candidates: expected at most 256 \\(sampled as one batch\\), got 257"),
    ({"min_verified": 1.5}, "min_verified: expected an integer >= 1 \\(or None: all past frames\\), got 1.5"),
    ({"min_verified": "1"}, "min_verified: expected an integer >= 1"),
])
def test_backend_options_are_checked_before_loading(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_backend(str(Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"), **kwargs)


def test_a_stopped_server_cannot_be_started_again():
    from polcache.serve.server import PolicyServer

    server = PolicyServer(TorchBackend(tiny_policy(), "ddim", 4), "tcp://127.0.0.1:0").start()
    server.stop()
    with pytest.raises(PolcacheError, match="create a new PolicyServer"):
        server.start()


@pytest.mark.parametrize("kwargs, match", [
    ({"deadline_ms": -1}, "deadline_ms must be a positive number"),
    ({"max_sessions": 0}, "max_sessions must be >= 1"),
    ({"session_timeout_s": math.nan}, "session_timeout_s must be a positive number"),
    ({"max_message_bytes": 0}, "max_message_bytes must be >= 4096"),
])
def test_server_options_are_checked(kwargs, match):
    from polcache.serve.server import PolicyServer

    with pytest.raises(PolcacheError, match=match):
        PolicyServer(TorchBackend(tiny_policy(), "ddim", 4), "tcp://127.0.0.1:0", **kwargs)


def test_an_instruction_that_is_no_text_is_refused_in_process():
    """In process, an empty, garbled or NUL-split instruction array ran (a robot's is checked as text
    at the server); warm-ups and timing runs give a written placeholder."""
    from helpers import tiny_vla

    backend = TorchBackend(tiny_vla(), "flow", 2)
    obs = backend.spec.placeholder_observations(2)
    assert backend.predict(obs, seed=0).shape[0] == 2
    width = obs["instruction"].shape[-1]
    for row, why in ((np.zeros(width, np.uint8), "empty \\(all zero bytes\\)"),
                     (np.array([104, 0, 105] + [0] * (width - 3), np.uint8), "a zero byte inside the text"),
                     (np.array([0xff] + [0] * (width - 1), np.uint8), "not valid UTF-8 \\(byte 0\\)")):
        bad = {k: v.copy() for k, v in obs.items()}
        bad["instruction"][1, 0] = row
        with pytest.raises(ObservationError, match=f"observation 'instruction' \\[1, 0\\]: {why}"):
            backend.predict(bad, seed=0)
