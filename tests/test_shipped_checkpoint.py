"""The checkpoint shipped in the repository loads, fits its task and predicts sane actions."""

from pathlib import Path

import numpy as np
import pytest

from polcache.envs import make_env
from polcache.policy import load_backend, load_policy
from polcache.policy.checkpoint import check_compatible

ASSETS = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints"
SHIPPED = ASSETS / "reach-v3"
PTP = ASSETS / "cue-reach-ptp"
PTP_IMAGE = ASSETS / "cue-reach-ptp-image"


@pytest.mark.parametrize("checkpoint", [SHIPPED, PTP, PTP_IMAGE], ids=lambda p: p.name)
def test_shipped_checkpoint_is_small_and_complete(checkpoint):
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < 8 * 2**20
    assert not (checkpoint / "train").exists()  # inference weights only


def test_shipped_checkpoint_loads_fits_and_predicts():
    policy, cfg, meta = load_policy(SHIPPED)
    assert meta["task"] == "reach-v3" and cfg.policy.sampler.kind == "ddim"
    env = make_env("reach-v3", seed=0)
    check_compatible(meta, env.observation_spec(), env.action_dim, "reach-v3")
    obs = env.reset()["state"]
    backend = load_backend(str(SHIPPED))
    acts = backend.predict({"state": np.stack([obs, obs])[None]}, seed=0)
    assert acts.shape == (1, 8, 4) and np.isfinite(acts).all()
    assert np.abs(acts).max() <= 1.5  # actions in the expert's range, not noise
    again = backend.predict({"state": np.stack([obs, obs])[None]}, seed=0)
    np.testing.assert_array_equal(acts, again)


@pytest.mark.slow
def test_shipped_ptp_checkpoint_remembers_the_cue():
    """The long-context PTP policy on cue-reach (16 frames at stride 3): it solves the memory task
    on these seeds, where a 2-frame policy picks a pad by chance (BENCHMARKS.md, PTP section)."""
    from polcache.sim.evaluate import evaluate

    backend = load_backend(str(PTP))
    assert backend.spec.n_obs_steps == 16 and backend.spec.obs_stride == 3 and backend.spec.task == "cue-reach"
    result = evaluate(backend, "cue-reach", episodes=6, seed=1000, progress=False)
    assert result.successes >= 5, result.summary()


@pytest.mark.slow
def test_shipped_image_ptp_checkpoint_reads_the_cue_from_pixels():
    """The multistage PTP policy on cue-reach with a camera (the state carries no cue there): the
    frozen short-context image encoder + a long-context head fine-tuned on its standardised stored
    embeddings (BENCHMARKS.md, PTP with images)."""
    from polcache.sim.evaluate import evaluate

    backend = load_backend(str(PTP_IMAGE))
    assert set(backend.spec.obs) == {"state", "image_top"} and backend.spec.n_obs_steps == 16
    assert "embedding" in backend.policy.normalizer.keys
    result = evaluate(backend, "cue-reach", episodes=6, seed=1000, progress=False)
    assert result.successes >= 5, result.summary()
