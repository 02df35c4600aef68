"""DP-T structure: shapes, block naming/order, causal masking, inference path == training path."""

import json
import pytest
import torch

from polcache.config import PolicyConfig
from polcache.policy.denoiser import DiffusionTransformer
from polcache.policy.executor import COMPUTE, DeltaStore

from helpers import tiny_policy


def test_default_shape_matches_paper():
    m = DiffusionTransformer(7, 64, PolicyConfig())
    assert len(m.blocks) == 24
    assert m.block_names[:4] == ["layers.0.sa", "layers.0.ca", "layers.0.ffn", "layers.1.sa"]
    assert m.block_names[-1] == "layers.7.ffn"
    assert [b.kind for b in m.blocks[:3]] == ["sa", "ca", "ffn"]
    assert m.pos_emb.shape == (1, 16, 256)


def test_predict_shapes_state_and_image():
    p = tiny_policy(image=True)
    obs = {"state": torch.randn(3, 2, 5), "image_cam": torch.randint(0, 255, (3, 2, 24, 24, 3), dtype=torch.uint8)}
    out = p.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (3, 8, 3)
    assert out["action_pred"].shape == (3, 16, 3)
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:9])
    loss = p.compute_loss({"obs": obs, "action": torch.randn(3, 16, 3)})
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_self_attention_is_causal_over_action_tokens():
    m = DiffusionTransformer(3, 8, PolicyConfig(n_layers=2, width=32, p_drop_attn=0.0)).eval()
    x = torch.randn(1, 16, 3)
    obs = torch.randn(1, 2, 8)
    t = torch.tensor([10.0])
    y = m(x, t, obs)
    x2 = x.clone()
    x2[:, 9] += 5.0
    y2 = m(x2, t, obs)
    assert torch.allclose(y[:, :9], y2[:, :9], atol=1e-6)
    assert (y[:, 9:] - y2[:, 9:]).abs().amax() > 1e-6


def test_action_token_zero_does_not_see_later_observations():
    m = DiffusionTransformer(3, 8, PolicyConfig(n_layers=2, width=32, p_drop_attn=0.0)).eval()
    x, obs, t = torch.randn(1, 16, 3), torch.randn(1, 2, 8), torch.tensor([10.0])
    obs2 = obs.clone()
    obs2[:, 1] += 3.0
    y, y2 = m(x, t, obs), m(x, t, obs2)
    assert torch.allclose(y[:, 0], y2[:, 0], atol=1e-6)
    assert (y[:, 1:] - y2[:, 1:]).abs().amax() > 1e-6


def test_step_with_precomputed_chunk_equals_forward():
    m = DiffusionTransformer(3, 8, PolicyConfig(n_layers=3, width=32)).eval()
    x, obs = torch.randn(2, 16, 3), torch.randn(2, 2, 8)
    ts = torch.tensor([90.0, 40.0, 0.0])
    with torch.no_grad():
        ctx = m.prepare_chunk(obs, ts)
        for k, t in enumerate(ts):
            torch.testing.assert_close(m.step(x, k, ctx), m(x, t.expand(2), obs), atol=1e-5, rtol=1e-5)


def test_blocks_run_in_order_and_all_compute_plan_is_exact():
    p = tiny_policy(n_layers=2)
    feats = p.encode({"state": torch.randn(2, 2, 5)})
    s = p.sampler()
    store = DeltaStore(len(p.denoiser.blocks))
    a = p.sample(feats, s, generator=torch.Generator().manual_seed(1), store=store)
    assert store.last_step == [s.num_steps - 1] * 6
    plan = [[COMPUTE] * 6 for _ in range(s.num_steps)]
    b = p.sample(feats, s, plan=plan, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_same_seed_same_actions_different_seed_different_actions():
    p = tiny_policy()
    obs = {"state": torch.randn(1, 2, 5)}
    a = p.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    b = p.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    c = p.predict_action(obs, generator=torch.Generator().manual_seed(4))["action"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kept_time_keys_values_follow_weight_changes():
    p = tiny_policy()
    obs = {"state": torch.randn(1, 2, 5)}
    before = p.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    other = tiny_policy(seed=1)
    other.normalizer = p.normalizer  # only the weights differ
    p.load_state_dict(other.state_dict())
    after = p.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    expected = other.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected)


def test_policy_families_by_name_and_old_checkpoints_load_as_dp_t(tmp_path, capsys):
    import yaml

    from polcache.cli import main
    from polcache.config import ExperimentConfig
    from polcache.errors import CheckpointError, ConfigError
    from polcache.policy import load_policy, save_checkpoint
    from polcache.policy.families import FAMILIES, get_family

    assert "dp-t" in FAMILIES
    with pytest.raises(ConfigError, match="policy.family 'vla-x' is not a known policy family"):
        get_family("vla-x")
    p = tiny_policy()
    path = save_checkpoint(tmp_path / "ck", ExperimentConfig(task="test", policy=p.cfg), p)
    assert json.loads((path / "meta.json").read_text())["family"] == "dp-t"
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"family": "vla"}))  # was read, never compared
    with pytest.raises(CheckpointError, match="meta.json says policy family 'vla', config.yaml 'dp-t'"):
        load_policy(path)
    del meta["sha256"]["config.yaml"]  # a checkpoint from before families existed (and config digests)
    (path / "meta.json").write_text(json.dumps(meta))
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    del cfg["policy"]["family"]
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_policy(path)[1].policy.family == "dp-t"
    cfg["policy"]["family"] = "vla-x"
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="'vla-x' is not a known policy family"):
        load_policy(path)
    assert main(["eval", "--checkpoint", str(path), "--episodes", "1"]) == 2
    assert "not a known policy family" in capsys.readouterr().err
    # a mistyped family in a config with an instruction key: the family is named, not the key
    assert main(["train", "--config", "configs/vla_mt10.yaml", "dataset=none.zarr", f"out={tmp_path / 'r'}",
                 "policy.family=fo"]) == 2
    assert "policy.family 'fo' is not a known policy family (known: dp-t, vla)" in capsys.readouterr().err


@pytest.mark.parametrize("edit, named", [
    (("n_layers", 1), r"\(\d+ unexpected tensors, e\.g\. denoiser\.blocks\.\d+\.\S+\)"),
    (("n_layers", 4), r"\(\d+ tensors missing, e\.g\. denoiser\.blocks\.\d+\.\S+\)"),
    (("width", 48), r"\(\d+ tensors of another shape, e\.g\. \S+ is \(.*\), the config makes \(.*\)\)"),
])
def test_a_config_edited_after_training_is_one_short_line(tmp_path, edit, named):
    """A changed layer count printed torch's list of every missing key: one line of thousands of characters."""
    import yaml

    from polcache.config import ExperimentConfig
    from polcache.errors import CheckpointError
    from polcache.policy import load_policy, save_checkpoint

    p = tiny_policy()
    path = save_checkpoint(tmp_path / "ck", ExperimentConfig(task="test", policy=p.cfg), p)
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    cfg["policy"][edit[0]] = edit[1]
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="config.yaml: its content does not match the sha256 in meta.json"):
        load_policy(path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]["config.yaml"]  # saved before config digests: the weights' shapes still catch it
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match config\.yaml " + named
                       + "; was config.yaml edited after training") as info:
        load_policy(path)
    assert len(str(info.value)) < 300


def test_a_config_cut_at_a_line_end_is_refused_not_run_with_defaults(tmp_path):
    """A 16-step DDIM config cut after `kind: ddim` parsed, and the policy sampled with the default step count."""
    from polcache.config import ExperimentConfig
    from polcache.errors import CheckpointError
    from polcache.policy import load_policy, save_checkpoint
    from polcache.config import SamplerConfig

    p = tiny_policy()
    cfg = ExperimentConfig(task="test", policy=p.cfg)
    cfg.policy.sampler = SamplerConfig(kind="ddim", inference_steps=16)
    path = save_checkpoint(tmp_path / "ck", cfg, p)
    assert load_policy(path)[1].policy.sampler.inference_steps == 16
    text = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text(text[:text.index("kind: ddim") + len("kind: ddim\n")])
    with pytest.raises(CheckpointError, match="config.yaml: its content does not match the sha256 in meta.json "
                                              r"\(damaged or changed after it was saved\)"):
        load_policy(path)


def test_checkpoint_files_follow_the_umask(tmp_path):
    """Weights readable by whoever may read the config (a server running as another user):
    safetensors' own writer made them owner-only."""
    import os
    import stat

    from polcache.config import ExperimentConfig
    from polcache.policy import save_checkpoint
    from polcache.policy.checkpoint import TrainState

    p = tiny_policy()
    state = TrainState(model=dict(p.state_dict()), optimizer={}, lr_scheduler={}, step=1)
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ck", ExperimentConfig(task="test", policy=p.cfg), p, train_state=state)
    finally:
        os.umask(old)
    for f in ("config.yaml", "model.safetensors", "normalizer.safetensors", "train/model.safetensors"):
        assert stat.S_IMODE(os.stat(path / f).st_mode) == 0o644, f
