"""The checkpoint shipped in the repository loads, fits its task and predicts sane actions."""

from pathlib import Path

import numpy as np

from polcache.envs import make_env
from polcache.policy import load_backend, load_policy
from polcache.policy.checkpoint import check_compatible

SHIPPED = Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3"


def test_shipped_checkpoint_is_small_and_complete():
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 8 * 2**20
    assert not (SHIPPED / "train").exists()  # inference weights only


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
