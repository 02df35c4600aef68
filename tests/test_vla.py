"""The VLA family: registry round trip, prefix reuse, the cache protocol, instructions, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polcache.policy.spec import ArraySpec

from helpers import tiny_policy, tiny_vla, vla_observations

TEXTS = ["push the puck", "open the door", "reach the goal"]


def test_vla_checkpoint_round_trip_and_both_families_by_name(tmp_path):
    from polcache.config import ExperimentConfig
    from polcache.policy import load_policy, save_checkpoint
    from polcache.policy.vla import VisionLanguageAction

    for policy in (tiny_vla(image=True), tiny_policy()):
        family = policy.cfg.family
        path = save_checkpoint(tmp_path / family, ExperimentConfig(task="test", policy=policy.cfg,
                                                                     obs_keys=policy.obs_keys), policy)
        assert json.loads((path / "meta.json").read_text())["family"] == family
        loaded, cfg, _ = load_policy(path)
        assert cfg.policy.family == family
        assert isinstance(loaded, VisionLanguageAction) == (family == "vla")
        obs = (vla_observations(policy, TEXTS) if family == "vla"
               else {"state": torch.randn(3, policy.spec.n_obs_steps, 5)})
        expected = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))["action"]
        got = loaded.predict_action(obs, generator=torch.Generator().manual_seed(1))["action"]
        torch.testing.assert_close(got, expected)


def test_prefix_keys_values_computed_once_per_chunk_equal_recomputing_every_step():
    """The reference re-runs the prefix encoder and the plain forward pass (memory -> keys/values
    in every cross-attention block) at every flow step."""
    policy = tiny_vla(image=True)
    obs = vla_observations(policy, TEXTS)
    sampler = policy.sampler()
    gen = torch.Generator().manual_seed(3)
    x, noise = policy.initial_noise(len(TEXTS), sampler, gen)
    with torch.no_grad():
        fast = policy.denoise(policy.encode(obs), sampler, x.clone(), noise)
        ref = x.clone()
        for k in range(sampler.num_steps):
            t = sampler.timesteps[k].expand(len(TEXTS))
            out = policy.denoiser(ref, t, policy.encode(obs))
            ref = sampler.update(k, ref, out, None)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_prefix_sees_every_token_and_the_instruction_changes_the_actions():
    policy = tiny_vla()
    assert policy.encoder.memory_tokens == 2 * 1 + 16 // 4  # a state token per frame + text tokens
    ca = next(b for b in policy.cache_blocks if b.kind == "ca")
    assert torch.isfinite(ca.bias[:, :1 + policy.encoder.memory_tokens]).all()  # no causal mask on the prefix
    obs = vla_observations(policy, ["push the puck"])
    first = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    obs["instruction"] = vla_observations(policy, ["open the door"])["instruction"]
    other = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert not torch.allclose(first, other)


def test_cache_layer_calibrates_and_caches_both_families_through_its_protocol(tmp_path):
    from polcache.cache.calibrate import calibrate
    from polcache.cache.errors import CacheError
    from polcache.cache.protocol import CacheTarget
    from polcache.cache.resolve import resolve_plan
    from polcache.cache.schedule import build_schedule, check_fits, load_schedule, model_hash, save_schedule

    schedules = {}
    for policy in (tiny_vla(), tiny_policy()):
        assert isinstance(policy, CacheTarget)
        family = policy.cfg.family
        sampler = policy.sampler()
        obs = (vla_observations(policy, TEXTS * 2) if family == "vla"
               else {"state": torch.randn(6, policy.spec.n_obs_steps, 5)})
        calib = calibrate(policy, sampler, obs, sensitivity_samples=2)
        assert [(b.layer, b.kind) for b in policy.cache_blocks] == calib.layer_kind
        schedule = build_schedule(calib, "bac", 2, 2, True, model_hash(policy), sampler.kind, "error-bound",
                                  policy.identity()["family"])
        path = save_schedule(schedule, tmp_path / f"{family}.json")
        assert load_schedule(path).family == family
        plan = resolve_plan(f"bac:2:2@{path}", policy, sampler)
        cached = policy.sample(policy.encode(obs), sampler, plan, torch.Generator().manual_seed(0))
        assert torch.isfinite(cached).all()
        schedules[family] = (load_schedule(path), policy, sampler)
    with pytest.raises(CacheError, match="calibrated on a vla policy, this checkpoint is a dp-t policy"):
        check_fits(schedules["vla"][0], schedules["dp-t"][1], schedules["dp-t"][2])
    with pytest.raises(CacheError, match="calibrated for model"):
        check_fits(schedules["vla"][0], tiny_vla(seed=1), schedules["vla"][2])


def test_dp_t_model_hash_ignores_the_vla_section():
    """DP-T schedules calibrated before families existed stay valid."""
    from polcache.cache.schedule import model_hash
    from polcache.config import VLAConfig

    a = tiny_policy()
    before = model_hash(a)
    a.cfg.vla = VLAConfig(width=8)
    assert model_hash(a) == before


def test_instruction_encoding_refuses_what_a_robot_must_fix():
    from polcache.policy.language import InstructionError, decode_instruction, encode_instruction

    row = encode_instruction("öffne die Tür", 16)
    assert row.dtype == np.uint8 and row.shape == (16,) and decode_instruction(row) == "öffne die Tür"
    for bad, match in [("x" * 17, "17 UTF-8 bytes, at most 16"), (b"\xff\xfe", "not valid UTF-8"), ("", "empty"),
                       ("a\0b", "NUL"), (3, "expected a string")]:
        with pytest.raises(InstructionError, match=f"instruction: .*{match}"):
            encode_instruction(bad, 16)


def test_configs_name_the_language_key_and_family_together():
    from polcache.config import ExperimentConfig, PolicyConfig, validate
    from polcache.errors import ConfigError

    with pytest.raises(ConfigError, match="'instruction' needs a language-conditioned family"):
        validate(ExperimentConfig(obs_keys=["state", "instruction"]))
    with pytest.raises(ConfigError, match="policy.family=vla: obs_keys must include 'instruction'"):
        validate(ExperimentConfig(obs_keys=["state"], policy=PolicyConfig(family="vla")))
    cfg = ExperimentConfig(obs_keys=["state", "instruction"], policy=PolicyConfig(family="vla"))
    cfg.policy.vla.instruction_bytes, cfg.policy.vla.bytes_per_token = 30, 4
    with pytest.raises(ConfigError, match="instruction_bytes .30. must be a multiple"):
        validate(cfg)


def test_a_setting_the_family_never_reads_is_refused_and_a_checkpoints_full_config_is_not():
    """policy.vla.width on a DP-T, policy.state_hidden on a VLA: trained, recorded in config.yaml, and
    changed nothing, without a word."""
    from pathlib import Path

    from polcache.config import load_config
    from polcache.errors import ConfigError

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"policy.vla.width: read by policy.family=vla only, and this config trains "
                                          r"dp-t: it would change nothing"):
        load_config(root / "configs" / "recommended_cpu.yaml", ["policy.vla.width=64"])
    with pytest.raises(ConfigError, match="policy.state_hidden: read by dp-t's state encoder only"):
        load_config(_config(), ["policy.state_hidden=7"])
    for checkpoint in ("reach-v3", "cue-reach-ptp-image"):  # every key of both families, at their defaults
        load_config(root / "polcache" / "assets" / "checkpoints" / checkpoint / "config.yaml")


@pytest.mark.slow
def test_multitask_record_train_eval_with_instructions(tmp_path, monkeypatch, capsys):
    """Record two Meta-World tasks with instructions, train a VLA a few steps, evaluate it with the
    held-out paraphrases and with another task's instruction, calibrate and cache it."""
    from polcache.cli import main
    from polcache.data import open_dataset
    from polcache.policy.language import decode_instruction

    monkeypatch.chdir(tmp_path)
    assert main(["record", "--task", "reach-v3,push-v3", "--episodes", "2", "--instructions", "48",
                 "--out", "mt.zarr"]) == 0
    store = open_dataset("mt.zarr")
    assert store.tasks == ["reach-v3"] * 2 + ["push-v3"] * 2
    assert store.attrs["task"] == "" and store.attrs["tasks_recorded"] == ["reach-v3", "push-v3"]  # no single task
    assert decode_instruction(store.episode(3).obs["instruction"][0]) == "slide the puck onto the target"
    assert main(["train", "--config", str(_config()), "dataset=mt.zarr", "out=run0", "train.steps=1"]) == 2
    assert ("policy.vla.instruction_bytes is 64 but the observation 'instruction' holds 48 bytes (as recorded with "
            "--instructions): set policy.vla.instruction_bytes to match") in capsys.readouterr().err
    assert main(["record", "--task", "hammer-v3", "--episodes", "1", "--instructions", "48", "--out", "h.zarr"]) == 2
    assert ("--instructions: no instructions are written for task 'hammer-v3'" in capsys.readouterr().err
            and not (tmp_path / "h.zarr").exists())
    assert main(["record", "--task", "reach-v3", "--episodes", "1", "--instructions", "8", "--out", "h.zarr"]) == 2
    assert "--instructions 8: the longest instruction of reach-v3 (" in capsys.readouterr().err  # before recording
    # a width that holds the training paraphrases but not the held-out ones eval and sim-robot send was accepted
    assert main(["record", "--task", "reach-v3", "--episodes", "1", "--instructions", "34", "--out", "h.zarr"]) == 2
    assert ("('touch the target spot with the gripper', held-out paraphrases included: eval and sim-robot send those) "
            "takes 38 UTF-8 bytes; give at least 38") in capsys.readouterr().err
    assert main(["train", "--config", str(_config()), "dataset=mt.zarr", "out=run", "train.steps=4",
                 "train.epochs=0", "train.val_windows=4", "policy.vla.instruction_bytes=48", "policy.n_layers=2",
                 "policy.width=32", "policy.vla.width=32"]) == 0
    assert ("next: polcache eval --checkpoint run/last --task TASK (in simulation; TASK one of push-v3, reach-v3)"
            in capsys.readouterr().out)  # a multi-task checkpoint names no task of its own
    assert main(["eval", "--checkpoint", "run/last", "--episodes", "1"]) == 2  # which of its tasks?
    assert "names no task: pass --task (it was trained on push-v3, reach-v3)" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "2", "--max-steps", "8",
                 "--no-progress", "--json", "heldout.json"]) == 0
    result = json.loads((tmp_path / "heldout.json").read_text())
    assert [e["instruction"] for e in result["per_episode"]] == ["nudge the puck over to the target",
                                                                "push the small puck to the goal spot"]
    assert ("instructions: 2 heldout paraphrases of push-v3, one per episode in turn: 'nudge the puck over to the "
            "target'; 'push the small puck to the goal spot'\n") in capsys.readouterr().out
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "1", "--max-steps", "8",
                 "--no-progress", "--instruction", "open the door", "--json", "swapped.json"]) == 0
    assert json.loads((tmp_path / "swapped.json").read_text())["extra"]["instructions"] == ["open the door"]
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "1",
                 "--instruction", "x" * 49]) == 2
    assert "--instruction: 49 UTF-8 bytes, at most 48 allowed" in capsys.readouterr().err
    from polcache.envs.instructions import INSTRUCTIONS  # a held-out paraphrase wider than the policy reads
    monkeypatch.setitem(INSTRUCTIONS, "push-v3", {**INSTRUCTIONS["push-v3"], "heldout": ("y" * 49,)})
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "1"]) == 2
    assert "push-v3's heldout paraphrase 'yyyyy" in capsys.readouterr().err  # it blamed --instruction, not given
    assert main(["eval", "--checkpoint", "run/last", "--task", "push-v3", "--episodes", "1", "--instruction", "go",
                 "--instructions", "train"]) == 2  # which one? the split was ignored without a word
    assert "--instructions train: give it or --instruction, not both" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", "run/last", "--budget", "3", "--bu-blocks", "2", "--samples", "4",
                 "--out", "sched.json"]) == 0
    assert json.loads((tmp_path / "sched.json").read_text())["model"]["family"] == "vla"
    assert main(["eval", "--checkpoint", "run/last", "--task", "reach-v3", "--episodes", "1", "--max-steps", "8",
                 "--no-progress", "--cache", "sched.json"]) == 0


def _config():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs" / "vla_mt10.yaml"


def test_images_too_small_for_the_encoder_are_refused_and_portrait_ones_train():
    """A 4x4 camera (import-lerobot --image-size 4x4) was a traceback in the first training step
    (its crop did not fit), a portrait one too (the crop came from the height alone)."""
    from polcache.config import PolicyConfig
    from polcache.errors import ConfigError
    from polcache.policy.encoders import ObsEncoder

    cfg = PolicyConfig()
    with pytest.raises(ConfigError, match=r"^obs 'image_top': images of 4x4 pixels are smaller than the image "
                                          r"encoder takes \(8x8 at least\)$"):
        ObsEncoder({"image_top": ArraySpec((4, 4, 3), "uint8")}, ["image_top"], cfg)
    encoder = ObsEncoder({"image_top": ArraySpec((48, 20, 3), "uint8")}, ["image_top"], cfg).train()
    features = encoder({"image_top": torch.randint(0, 256, (2, cfg.n_obs_steps, 48, 20, 3), dtype=torch.uint8)})
    assert features.shape == (2, cfg.n_obs_steps, encoder.feature_dim) and torch.isfinite(features).all()


@pytest.mark.parametrize("size", [24, 64, 96])
def test_image_tokens_are_a_grid_of_equal_cells_at_any_image_size(size):
    from polcache.config import PolicyConfig, VLAConfig
    from polcache.policy.vla import ImageTokens

    cfg = PolicyConfig(vla=VLAConfig(width=16, image_grid=4))
    cfg.image.channels = 8
    tokens = ImageTokens("image_top", (size, size, 3), cfg)(torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8))
    assert tokens.shape == (2, 16, 16)


def test_ptp_embed_refuses_a_vla_whose_encoder_reads_the_frames_together(tmp_path):
    from polcache.errors import DatasetError
    from polcache.ptp.embeddings import check_embeddable

    with pytest.raises(DatasetError, match="vla policy, whose encoder reads the frames together"):
        check_embeddable(tiny_vla(), tmp_path / "no-dataset-needed")  # refused before the dataset is opened
