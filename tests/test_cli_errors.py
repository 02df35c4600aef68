"""Bad input gives one clear line naming the problem, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polcache import cli, outputs
from polcache.cli import main
from polcache.config import load_config
from polcache.serve import cli as serve_cli


def _err(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unknown_task_in_record(capsys, tmp_path):
    err = _err(capsys, ["record", "--task", "reach-v9", "--episodes", "1", "--out", str(tmp_path / "x.zarr")])
    assert "reach-v9" in err and "reach-v3" in err


def test_missing_checkpoint(capsys, tmp_path):
    assert "not found" in _err(capsys, ["eval", "--checkpoint", str(tmp_path / "nope"), "--episodes", "1"])


def test_incomplete_checkpoint(capsys, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "meta.json").write_text("{}")
    assert "missing" in _err(capsys, ["eval", "--checkpoint", str(tmp_path / "ck"), "--episodes", "1"])


@pytest.mark.parametrize("damage, match", [
    (lambda ck: (ck / "meta.json").write_text("[1, 2]"), "meta.json: not a JSON object"),
    (lambda ck: (ck / "meta.json").write_bytes(b"\xff\xfe\x00garbage"), "meta.json: not valid JSON (truncated?)"),
    (lambda ck: _edit_meta(ck, action_dim="x"), "meta.json: malformed (ValueError"),
    (lambda ck: _edit_meta(ck, obs_spec=None), "meta.json: malformed (AttributeError"),
    # a config cut at a line end parses; its missing keys had taken their defaults (another sampler)
    (lambda ck: _truncate_lines(ck / "config.yaml"), "config.yaml: its content does not match the sha256 in "
                                                     "meta.json (damaged or changed after it was saved); it is the "
                                                     "record of the training run: to sample otherwise, eval and serve "
                                                     "take --sampler and --steps"),
    # checkpoints saved before the digests: what the files themselves say
    (lambda ck: _before_digests(ck, config=""), "config.yaml: empty or not a mapping (truncated?)"),
    (lambda ck: _before_digests(ck, config="policy: [unclosed"), "config.yaml: not valid YAML at line 1, column 18: "
                                                                 "expected ',' or ']', but got '<stream end>' "
                                                                 "(truncated or damaged?)"),
    (lambda ck: _before_digests(ck, config=(ck / "config.yaml").read_text() + "task: push-v3\n"),
     "config.yaml: duplicate key task on line"),
    (lambda ck: _other_normalizer(_before_digests(ck), state_dim=8),
     "normalizer.safetensors: 'state' statistics have 8 dimensions but the model's state has 39 (a normalizer "
     "from another model?)"),
    (lambda ck: (ck / "normalizer.safetensors").write_bytes(b""), "normalizer.safetensors: cannot read it, truncated "
                                                                  "or damaged? (SafetensorError: Error while "
                                                                  "deserializing: header too small)"),
    (lambda ck: _truncate(ck / "model.safetensors"), "model.safetensors: cannot read it, truncated or damaged?"),
    # meta.json's digests damaged: they switched the check off, and damaged weights loaded unnoticed
    (lambda ck: _edit_meta(ck, sha256=None), "meta.json: sha256.config.yaml is None, expected that file's sha256 "
                                             "(64 hex digits): meta.json is damaged"),
    (lambda ck: _edit_meta(ck, sha256={**_meta(ck)["sha256"], "model.safetensors": "x"}),
     "meta.json: sha256.model.safetensors is 'x', expected that file's sha256"),
], ids=["meta-list", "meta-binary", "meta-action-dim", "meta-obs-spec", "config-cut", "config-empty", "config-yaml",
        "config-duplicate-key", "normalizer-of-another-model", "normalizer-empty", "model-truncated", "digests-none",
        "digest-not-hex"])
def test_a_damaged_checkpoint_file_is_named_in_one_line(capsys, tmp_path, damage, match):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3", ck)
    damage(ck)
    assert match in _err(capsys, ["eval", "--checkpoint", str(ck), "--episodes", "1"])


def test_flipped_bits_in_saved_weights_are_named(tmp_path):
    """Bits flipped in the tensor data (not the header) loaded and acted with rc 0 where the values
    stayed finite; a checkpoint saved now records each file's sha256 and its loader checks it."""
    from helpers import tiny_policy

    from polcache.config import ExperimentConfig
    from polcache.errors import CheckpointError
    from polcache.policy import load_policy, save_checkpoint

    policy = tiny_policy(n_layers=1, width=32)
    ck = save_checkpoint(tmp_path / "ck", ExperimentConfig(task="", dataset="d.zarr", policy=policy.cfg), policy)
    load_policy(ck)  # intact: loads
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # the lowest bit of a weight: finite, plausible, wrong
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: its content does not match the sha256 in meta.json"):
        load_policy(ck)


def _other_normalizer(ck, state_dim):
    import numpy as np
    from safetensors.torch import save_file

    from polcache.data import Normalizer

    rng = np.random.default_rng(0)
    other = Normalizer.fit({"state": rng.normal(size=(20, state_dim)), "action": rng.normal(size=(20, 4))})
    save_file(other.state_dict(), str(ck / "normalizer.safetensors"))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:1000])


def _truncate_lines(file: Path) -> None:
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join(lines[:len(lines) // 2]))


def _before_digests(ck: Path, config: str | None = None) -> Path:
    """The checkpoint as saved before meta.json held sha256 digests, with `config` as its config.yaml."""
    meta = _meta(ck)
    del meta["sha256"]
    (ck / "meta.json").write_text(json.dumps(meta))
    if config is not None:
        (ck / "config.yaml").write_text(config)
    return ck


def _meta(ck: Path) -> dict:
    return json.loads((ck / "meta.json").read_text())


def _edit_meta(ck, **changes):
    (ck / "meta.json").write_text(json.dumps(_meta(ck) | changes))


def test_a_sampler_that_does_not_fit_the_objective_is_refused_before_any_episode(capsys):
    checkpoint = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"  # epsilon DP-T
    err = _err(capsys, ["eval", "--checkpoint", str(checkpoint), "--sampler", "flow", "--episodes", "1"])
    assert err.endswith("--sampler flow does not fit policy.objective=epsilon (a denoiser trained to predict "
                        "noise): use --sampler ddpm or ddim")


def test_too_many_denoising_steps_name_the_flag(capsys):
    err = _err(capsys, ["eval", "--checkpoint", str(CHECKPOINT), "--steps", "100000", "--episodes", "1"])
    assert err.endswith("--steps 100000: ddim takes 1..100 inference steps (one per noise level trained, "
                        "policy.sampler.train_steps)")


def test_eval_on_another_task_than_trained_warns_naming_both(capsys):
    """Allowed (transfer tests) but rarely meant: sim-robot said so, eval ran without a word."""
    assert main(["eval", "--checkpoint", str(CHECKPOINT), "--task", "push-v3", "--episodes", "1", "--max-steps", "2",
                 "--no-progress"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: the checkpoint's policy was trained on reach-v3, this evaluation runs push-v3"]
    assert main(["eval", "--checkpoint", str(CHECKPOINT), "--task", "reach-v3", "--episodes", "1", "--max-steps", "2",
                 "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    # an unknown task is refused, not first warned about as another task
    assert _err(capsys, ["eval", "--checkpoint", str(CHECKPOINT), "--task", "reach-v4", "--episodes", "1"]) == (
        "polcache eval: error: unknown task 'reach-v4'; did you mean reach-v3, reach-wall-v3, cue-reach?")


def test_a_training_runs_folder_points_to_its_checkpoint(capsys, tmp_path):
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / "meta.json").write_text("{}")
    err = _err(capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1"])
    assert err.endswith(f"a training run: pass {tmp_path / 'run' / 'last'}")


def test_nested_commands_are_named_and_ptp_embed_asks_for_the_dataset(capsys, tmp_path, monkeypatch):
    checkpoint = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/cue-reach-ptp"
    monkeypatch.chdir(tmp_path)  # where the checkpoint's data/cue-reach.zarr is not
    err = _err(capsys, ["ptp", "embed", "--checkpoint", str(checkpoint), "--out", "x.zarr"])
    assert err.startswith("polcache ptp embed: error:") and err.endswith("which is not here (nor above the checkpoint): pass --dataset PATH")


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: reach-v3\npolicy:\n  width: 64\n  widht: 64\n")
    err = _err(capsys, ["train", "--config", str(cfg)])
    # the file's line too: a typo in a long config was named by its dotted path alone
    assert err.startswith(f"polcache train: error: {cfg}, line 4: unknown config key in 'policy': 'policy.widht' "
                          "(known: ")
    cfg.write_text("task: reach-v3\ntrain:\n  lr: fast\n")  # a value of the wrong type too
    assert _err(capsys, ["train", "--config", str(cfg)]) == (f"polcache train: error: {cfg}, line 3: train.lr: "
                                                             "expected a number, got 'fast'")
    cfg.write_text("task: reach-v3\n")  # an override's typo is the override's, not the file's
    assert _err(capsys, ["train", "--config", str(cfg), "policy.widht=3"]).startswith(
        "polcache train: error: unknown config key in 'policy': 'policy.widht'")
    launch = tmp_path / "launch.yaml"
    launch.write_text("robot:\n  episodez: 3\n")
    assert _err(capsys, ["launch", str(launch)]).startswith(f"polcache launch: error: {launch}, line 2: unknown "
                                                            "config key in 'robot': 'robot.episodez'")


def test_bad_override_value(capsys):
    assert "train.steps" in _err(capsys, ["train", "--config", "configs/metaworld_small.yaml", "train.steps=lots"])


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML (ParserError); quote a string, write a "
                      "list as [a, b]"),
    (["train.steps=3", "train=5"], "override 'train=5': 'train' is a section; set its keys, e.g. train.KEY=VALUE"),
    (["train.log_every=0"], "train.log_every must be an integer >= 1, got 0"),  # was a ZeroDivisionError
    (["policy.n_heads=0"], "policy.n_heads must be an integer >= 1, got 0"),
    # the config trains 100 epochs; the message blamed train.epochs (0), which the override had set aside
    (["train.steps=0"], "train.steps=0: expected a positive number of steps (the override replaces the config's "
                        "train.epochs; to train by epochs, set train.epochs=N instead)"),
    (["train.steps=0", "train.epochs=0"], "train.steps and train.epochs are both 0: expected a positive train.steps "
                                          "(optimizer steps) or train.epochs (passes over the training windows)"),
])
def test_bad_overrides_are_one_line(capsys, overrides, message):
    err = _err(capsys, ["train", "--config", "configs/recommended_cpu.yaml", *overrides])
    assert err == f"polcache train: error: {message}"


def test_a_key_given_twice_in_a_config_is_refused_naming_it_and_its_lines(capsys, tmp_path):
    """YAML would keep the last silently (the run trained with whichever lr came later)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1.0e-3\n  batch_size: 8\n  lr: 3.0e-3\n")
    assert _err(capsys, ["train", "--config", str(cfg)]) == (
        f"polcache train: error: {cfg}: duplicate key train.lr on line 4 (first on line 2); give each key once")
    assert _err(capsys, ["train", "--config", "configs/recommended_cpu.yaml", "policy.sampler={kind: ddim, kind: ddpm}"]
                ) == ("polcache train: error: override 'policy.sampler={kind: ddim, kind: ddpm}': duplicate key kind on "
                      "line 1 (first on line 1); give each key once")
    launch = tmp_path / "launch.yaml"  # `polcache launch` reads its config through the same loader
    launch.write_text("robot:\n  task: reach-v3\nrobot:\n  task: push-v3\n")
    assert _err(capsys, ["launch", str(launch)]).endswith(f"{launch}: duplicate key robot on line 3 (first on line 1); "
                                                          "give each key once")


def test_an_override_given_twice_with_two_values_is_refused(capsys, tmp_path):
    """It kept the last silently, unlike a flag or a YAML key given twice; the same value twice passes."""
    assert _err(capsys, ["train", "--config", "configs/recommended_cpu.yaml", "train.lr=1e-3", "train.lr=2e-3"]) == (
        "polcache train: error: override 'train.lr' given twice (1e-3, then 2e-3); it takes one value")
    assert "given twice" in _err(capsys, ["launch", "configs/launch/sim.yaml", "robot.episodes=5", "robot.episodes=9"])
    cfg = load_config("configs/recommended_cpu.yaml", ["train.lr=1e-3", "train.lr=1e-3"])
    assert cfg.train.lr == 1e-3


def test_a_config_file_that_is_not_yaml_names_the_line(capsys, tmp_path):
    """It said only "not valid YAML (ParserError)"."""
    launch = tmp_path / "launch.yaml"
    launch.write_text("server:\n  port: [1, 2\n")
    assert _err(capsys, ["launch", str(launch)]) == (f"polcache launch: error: {launch}: not valid YAML at line 3, "
                                                     "column 1: expected ',' or ']', but got '<stream end>'")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: a: b\n")
    assert _err(capsys, ["train", "--config", str(cfg)]) == (f"polcache train: error: {cfg}: not valid YAML at line 2, "
                                                             "column 8: mapping values are not allowed here")


def test_a_config_file_that_is_not_text_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  lr: \xff\xfe\x00\x81")
    assert _err(capsys, ["train", "--config", str(cfg)]).endswith(f"{cfg}: not a YAML text file (not UTF-8)")


def test_missing_dataset(capsys, tmp_path):
    err = _err(capsys, ["train", "--config", "configs/metaworld_small.yaml", f"dataset={tmp_path / 'none.zarr'}"])
    assert "none.zarr" in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_cli_numbers(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", "x", "--episodes", value])
    assert exc.value.code == 2
    assert "--episodes" in capsys.readouterr().err


def test_training_on_a_dataset_with_a_damaged_chunk_names_it(capsys, tmp_path):
    import numpy as np

    from polcache.data import Episode, write_dataset

    path = tmp_path / "demo.zarr"
    t = np.arange(20, dtype=np.float32)[:, None]
    write_dataset(path, [Episode(obs={"state": np.hstack([t, -t])}, action=np.hstack([t, t]))])
    (path / "data/obs/state/c/0/0").write_bytes(b"damaged!" * 4)
    err = _err(capsys, ["train", "--config", "configs/metaworld_small.yaml", f"dataset={path}", "obs_keys=[state]"])
    assert err.startswith("polcache train: error: ")
    assert "demo.zarr: data/obs/state chunk 0 (rows 0..19, episode 0) cannot be read (RuntimeError: Zstd" in err
    assert err.endswith("the dataset is damaged; record, import or copy it again")


def test_a_damaged_embedding_store_says_to_embed_again(tmp_path):
    """Its remedy was a demonstration's ("record, import or copy it again"): an embedding store is `ptp embed`'s."""
    import numpy as np

    from polcache.data import Episode, EpisodeStore, write_dataset
    from polcache.errors import DatasetError

    path = tmp_path / "emb.zarr"
    write_dataset(path, [Episode(obs={"embedding": np.ones((20, 8), np.float32)}, action=np.zeros((20, 2), np.float32))])
    (path / "data/obs/embedding/c/0/0").write_bytes(b"damaged!" * 4)
    with pytest.raises(DatasetError, match=r"the dataset is damaged; write it again with `polcache ptp embed`$"):
        EpisodeStore.open(path).array("embedding")


@pytest.mark.parametrize("argv, match", [
    (["eval", "--episodes", "x"], "polcache eval: error: argument --episodes: expected a positive integer, got 'x' "
                                  "(see polcache eval --help)"),
    (["ptp", "embed", "--batch-size", "x"], "polcache ptp embed: error: argument --batch-size"),
    ([], "polcache: error: the following arguments are required: COMMAND"),
    (["eval", "--checkpoint", "x", "--verify-min-past", "3"],
     "polcache eval: error: argument --verify-min-past: applies to self-verification only; give --verify N (N >= 2 "
     "candidates) with it, got --verify-min-past 3 and --verify 1"),
    (["serve", "--checkpoint", "x", "--verify", "1", "--verify-min-past", "2"],
     "polcache serve: error: argument --verify-min-past: applies to self-verification only"),
    (["data", "export-lerobot", "d", "--out", "o", "--crf", "99"],
     "argument --crf: expected an H.264 quality 0..51, got 99"),
    (["eval", "--checkpoint", "x", "--verify", "100000"],  # sampled as one batch: out of memory mid-episode
     "polcache eval: error: argument --verify: expected a candidate count in 1..256, got 100000"),
    # accepted and ignored, these looked like settings the run used
    (["eval", "--checkpoint", "x", "--video-episodes", "5"],
     "polcache eval: error: argument --video-episodes: applies with --video only; give --video with it"),
    (["sim-robot", "--task", "reach-v3", "--hz", "50", "--image-size", "64"],
     "polcache sim-robot: error: argument --image-size: applies with --cameras only; give --cameras with it"),
    (["export", "--checkpoint", "x", "--out", "o", "--no-verify", "--tolerance", "0.1"],
     "polcache export: error: argument --tolerance: limits the parity check, which --no-verify skips"),
], ids=["flag", "nested", "no-command", "eval-verify-min-past-alone", "serve-verify-min-past-alone", "crf",
        "verify-huge", "video-episodes-alone", "image-size-alone", "tolerance-no-verify"])
def test_a_bad_flag_is_one_line_not_the_usage_block(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_a_run_directory_that_is_a_file_or_inside_a_dataset_is_refused(capsys, tmp_path):
    from test_train_recipe import FAST, demo_dataset

    data = demo_dataset(tmp_path / "d.zarr")
    (tmp_path / "file").write_text("mine")

    def train(dataset, out) -> str:
        return _err(capsys, ["train", "--config", "configs/recommended_cpu.yaml", f"dataset={dataset}", f"out={out}",
                             *FAST])

    assert train(data, tmp_path / "file").endswith(f"out={tmp_path / 'file'}: exists and is not a directory; give a "
                                                   "run directory")
    assert (tmp_path / "file").read_text() == "mine"
    # below a file: said so (root's access() check called the file "not writable by this user")
    assert train(data, tmp_path / "file" / "run").endswith(f"out={tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is "
                                                          f"a file, not a folder; nothing was done")
    # record --out on the dataset would replace it, with the run in it
    assert train(data, data).endswith(f"out={data} is dataset {data}: writing the dataset again would delete the "
                                      "run; give an out directory outside it")
    # a language policy's config on a dataset recorded without instructions: where they come from
    said = _err(capsys, ["train", "--config", "configs/vla_mt10.yaml", f"dataset={data}", f"out={tmp_path / 'vla'}",
                         "train.steps=2", "--no-progress"])
    assert said.endswith("a language-conditioned policy reads 'instruction', which `polcache record --instructions` "
                         "and `polcache data import-lerobot --instructions` write"), said
    other = demo_dataset(tmp_path / "other.zarr")
    assert f"out={other / 'runs/x'} is inside {other}, a dataset:" in train(data, other / "runs/x")
    assert train(tmp_path / "run/last/d.zarr", tmp_path / "run").endswith(
        f"dataset {tmp_path / 'run/last/d.zarr'} is inside {tmp_path / 'run/last'}, which training replaces; move the "
        "dataset or give another out directory")
    assert sorted(p.name for p in data.iterdir()) == ["data", "meta", "zarr.json"]


# ------------------------------------------------------------ outputs: checked before any work, never replaced

CHECKPOINT = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"


def _dataset(path: Path, state_dim: int = 39) -> Path:
    import numpy as np

    from polcache.data import Episode, write_dataset

    t = np.arange(10, dtype=np.float32)[:, None]
    write_dataset(path, [Episode(obs={"state": np.repeat(t, state_dim, 1)}, action=np.repeat(t, 4, 1))])
    return path


def _tree_of(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_ptp_embed_refuses_its_own_input_and_another_dataset(capsys, tmp_path):
    data, other = _dataset(tmp_path / "reach.zarr"), _dataset(tmp_path / "other.zarr")
    before = _tree_of(other)
    for out, match in [(data, "is also the input"), (tmp_path / "." / "reach.zarr", "is also the input"),
                       (other, "exists and is a dataset, not an embedding store from `polcache ptp embed`; refusing")]:
        err = _err(capsys, ["ptp", "embed", "--checkpoint", str(CHECKPOINT), "--dataset", str(data),
                            "--out", str(out), "--no-progress"])
        assert err.startswith(f"polcache ptp embed: error: --out {out}: ") and match in err
    assert _tree_of(other) == before


def test_ptp_embed_replaces_its_own_store(capsys, tmp_path):
    data = _dataset(tmp_path / "reach.zarr")
    argv = ["ptp", "embed", "--checkpoint", str(CHECKPOINT), "--dataset", str(data), "--out", str(tmp_path / "e.zarr"),
            "--no-progress"]
    assert main(argv) == 0 and main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--out", "{meta}"],
    ["eval", "--checkpoint", str(CHECKPOINT), "--episodes", "1", "--json", "{meta}"],
    ["sim-robot", "--task", "reach-v3", "--hz", "10", "--server", "tcp://127.0.0.1:1", "--connect-timeout", "0.1",
     "--json", "{meta}"],
], ids=["calibrate", "eval", "sim-robot"])
def test_json_outputs_never_replace_a_file_of_another_kind_nor_write_inside_a_checkpoint(capsys, tmp_path, argv):
    import shutil

    meta = tmp_path / "meta.json"
    meta.write_text('{"mine": 1}')
    err = _err(capsys, [a.format(meta=meta) for a in argv])
    assert f"{meta}: exists and is not a" in err and "refusing to overwrite it" in err
    assert meta.read_text() == '{"mine": 1}'
    # a new file inside a checkpoint would vanish when training saves OUT/last again
    ck = shutil.copytree(CHECKPOINT, tmp_path / "run" / "last")
    inside = ck / "mine.json"
    err = _err(capsys, [a.format(meta=inside) for a in argv])
    assert f"{inside}: is inside {ck}, a checkpoint, which is replaced whole when it is written again" in err
    assert not inside.exists()


def test_outputs_inside_a_dataset_an_export_or_a_report_are_refused(capsys, tmp_path):
    from polcache.outputs import enclosing_output

    data = _dataset(tmp_path / "reach.zarr")
    err = _err(capsys, ["record", "--task", "reach-v3", "--episodes", "1", "--out", str(data / "sub.zarr")])
    assert f"--out {data / 'sub.zarr'}: is inside {data}, a dataset" in err
    assert enclosing_output(data / "data" / "action" / "x") == (data, "a dataset")  # the outermost store
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text('{"format": "polcache-export"}')
    assert enclosing_output(tmp_path / "art" / "x.json") == (tmp_path / "art", "an exported policy")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text('{"name": "a web app"}')
    assert enclosing_output(tmp_path / "web" / "x.json") is None
    assert enclosing_output(tmp_path / "reach.zarr") is None  # the dataset itself: its writer decides


def test_an_eval_result_is_recognised_with_or_without_its_marker(tmp_path):
    import json

    from polcache.errors import OutputError
    from polcache.sim.evaluate import RESULT_FORMAT, EvalResult, check_result_output

    new = EvalResult("reach-v3", 1, 1, 1.0, (0.2, 1.0), 10.0, {}, 0).to_dict()
    assert new["format"] == RESULT_FORMAT
    old = {k: v for k, v in new.items() if k != "format"}  # written before the marker
    for i, doc in enumerate([new, old]):
        (tmp_path / f"{i}.json").write_text(json.dumps(doc))
        check_result_output(tmp_path / f"{i}.json")
    (tmp_path / "other.json").write_text(json.dumps({"task": "reach-v3"}))
    with pytest.raises(OutputError, match="not an eval result"):
        check_result_output(tmp_path / "other.json")


def test_calibrate_wants_a_json_name_and_keeps_an_unrelated_png(capsys, tmp_path):
    calibrate = ["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--out"]
    assert "expected a .json name" in _err(capsys, calibrate + [str(tmp_path / "s.png")])
    (tmp_path / "keep.png").write_bytes(b"a picture of something else")
    err = _err(capsys, calibrate + [str(tmp_path / "keep.json")])
    assert f"{tmp_path / 'keep.png'}: exists and is not the heatmap of schedule keep.json" in err
    assert (tmp_path / "keep.png").read_bytes() == b"a picture of something else"


def test_an_interrupted_calibrate_leaves_the_old_schedule_and_heatmap_as_they_were(capsys, tmp_path, monkeypatch):
    """Ctrl-C while the heatmap was drawn had left the new schedule without a picture, said as
    "interrupted": the picture is drawn first now, and both are written together."""
    import polcache.cache.plot as plot

    out = tmp_path / "s.json"
    argv = ["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--samples", "1", "--batch-size", "1",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    old = out.read_bytes(), out.with_suffix(".png").read_bytes()

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "schedule_png", interrupted)  # Ctrl-C once the schedule is solved, drawing it
    assert main(argv + ["--seed", "1"]) == 130
    assert (out.read_bytes(), out.with_suffix(".png").read_bytes()) == old


def test_a_ctrl_c_a_library_turned_into_its_own_error_is_an_interruption(capsys, tmp_path, monkeypatch):
    """Ctrl-C while `import mujoco` ran came out as "ImportError: initialization failed" (raised while
    the KeyboardInterrupt was handled): a traceback and status 1, not "interrupted" and 130."""
    import polcache.cache.plot as plot

    def import_interrupted(*_):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    monkeypatch.setattr(plot, "schedule_png", import_interrupted)
    assert main(["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--samples", "1", "--batch-size",
                 "1", "--no-progress", "--out", str(tmp_path / "s.json")]) == 130
    assert capsys.readouterr().err == "polcache calibrate: interrupted\n"
    monkeypatch.setattr(plot, "schedule_png", lambda *_: (_ for _ in ()).throw(ImportError("a real one")))
    with pytest.raises(ImportError, match="a real one"):  # one without an interrupt behind it is not hidden
        main(["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--samples", "1", "--batch-size", "1",
              "--no-progress", "--out", str(tmp_path / "t.json")])


@pytest.fixture
def afile(tmp_path) -> Path:
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path / "afile"


OUTPUTS = {  # command line with OUT for the output, and whether that output is a folder
    "record": (["record", "--task", "reach-v3", "--episodes", "1", "--out", "OUT"], True),
    "calibrate": (["calibrate", "--checkpoint", str(CHECKPOINT), "--budget", "3", "--out", "OUT"], False),
    "eval": (["eval", "--checkpoint", str(CHECKPOINT), "--episodes", "1", "--json", "OUT"], False),
    "sim-robot": (["sim-robot", "--task", "reach-v3", "--hz", "10", "--server", "tcp://127.0.0.1:1", "--json", "OUT"],
                  False),
    "report": (["report", "RUN", "--out", "OUT"], True),
    "export": (["export", "--checkpoint", str(CHECKPOINT), "--out", "OUT"], True),
    "import-lerobot": (["data", "import-lerobot", "ROOT", "--out", "OUT"], True),
    "export-lerobot": (["data", "export-lerobot", "DATA", "--out", "OUT"], True),
    "ptp-embed": (["ptp", "embed", "--checkpoint", str(CHECKPOINT), "--dataset", "DATA", "--out", "OUT"], True),
    "keys": (["keys", "--dir", "OUT"], True),
}


@pytest.mark.parametrize("command", OUTPUTS)
@pytest.mark.parametrize("where", ["under-a-file", "wrong-kind", "empty", "unwritable", "full", "virtual"])
def test_every_output_path_is_checked_first_in_one_line(capsys, tmp_path, afile, command, where, monkeypatch):
    argv, folder = OUTPUTS[command]
    run = tmp_path / "run.jsonl"
    run.write_text("")
    if where == "virtual":  # /proc: root's access() calls it writable; report said "No such file" with status 1
        if not Path("/proc/self").exists():
            pytest.skip("no /proc here")
        out, match = "/proc/polcache-out", "/proc is on a file system where files cannot be created"
    elif where == "unwritable":  # found only after the work was done, before this check (tests run as root)
        locked = tmp_path / "locked"
        locked.mkdir()
        real_access = os.access
        monkeypatch.setattr(outputs.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
        out, match = locked / "out", f"{locked} is not writable by this user; nothing was done"
    elif where == "full":  # as a tmpfs filled with dd: record and eval ran every episode before the write failed
        full = tmp_path / "full"
        full.mkdir()
        real_statvfs = os.statvfs

        def statvfs(p):
            fs = real_statvfs(p)
            return fs if Path(p) != full else os.statvfs_result((*fs[:3], 0, 0, *fs[5:]))  # f_bfree, f_bavail
        monkeypatch.setattr(outputs.os, "statvfs", statvfs)
        out, match = full / "out", f"no space left on the file system of {full}; nothing was done"
    elif where == "under-a-file":
        out, match = afile / "sub", f"{afile} is a file, not a folder"
    elif where == "wrong-kind":
        out = afile if folder else tmp_path
        match = "is a file; expected" if folder else "is a folder; expected"
    else:
        out, match = "", "empty"
    subs = {"OUT": str(out), "RUN": str(run), "ROOT": str(tmp_path), "DATA": str(tmp_path / "d.zarr")}
    try:
        err = _err(capsys, [subs.get(a, a) for a in argv])
    except SystemExit as exc:  # refused by the flag's type (keys --dir '')
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.code == 2 and where == "empty"
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("command", [c for c, (_, folder) in OUTPUTS.items() if not folder])
def test_a_file_output_named_like_a_folder_is_refused(capsys, tmp_path, command):
    """`--out x.json/` would lose its slash to Path() and be written as a file named x.json."""
    argv, _ = OUTPUTS[command]
    err = _err(capsys, [str(tmp_path / "x.json") + "/" if a == "OUT" else a for a in argv])
    assert "ends with a slash" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_report_refuses_a_folder_or_file_it_did_not_write(capsys, tmp_path):
    run = tmp_path / "run.jsonl"
    run.write_text('{"kind": "tick", "t": 1.0, "robot": "arm"}\n')
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("my page")
    assert "exists and is not a report folder" in _err(capsys, ["report", str(run), "--out", str(site)])
    assert (site / "index.html").read_text() == "my page"
    assert "is also the input" in _err(capsys, ["report", str(run), "--out", str(run)])
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0  # its own earlier report is replaced


# ------------------------------------------------------------ flags: one type per kind of value

def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


SIM_ROBOT = ["sim-robot", "--task", "reach-v3", "--hz", "10", "--connect-timeout", "0.1"]
EVAL = ["eval", "--checkpoint", str(CHECKPOINT), "--episodes", "1", "--no-progress"]


@pytest.mark.parametrize("argv, flag", [
    (["record", "--task", "reach-v3", "--episodes", "1", "--out", "x.zarr", "--seed", "-1"], "--seed"),
    (EVAL + ["--seed", "-1"], "--seed"),
    (["calibrate", "--checkpoint", "x", "--budget", "2", "--out", "x.json", "--seed", "-1"], "--seed"),
    (SIM_ROBOT + ["--seed", "-1"], "--seed"),
    # beyond 2^63-1 a seed failed deep inside the run (torch's generator, the backends' seed check)
    (["record", "--task", "reach-v3", "--episodes", "1", "--out", "x.zarr", "--seed", str(2**63)], "--seed"),
    (EVAL + ["--seed", str(2**63)], "--seed"),
    (["calibrate", "--checkpoint", "x", "--budget", "2", "--out", "x.json", "--seed", "99999999999999999999"], "--seed"),
    (SIM_ROBOT + ["--seed", str(2**63)], "--seed"),
    (["serve", "--checkpoint", "x", "--metrics-port", "99999"], "--metrics-port"),
    (["serve", "--checkpoint", "x", "--metrics-port", "-1"], "--metrics-port"),
    (["dashboard", "--port", "99999"], "--port"),
    (["dashboard", "--port", "-1"], "--port"),
    (SIM_ROBOT + ["--metrics-port", "99999"], "--metrics-port"),
    (EVAL + ["--ensemble", "nan"], "--ensemble"),
    (EVAL + ["--ensemble", "inf"], "--ensemble"),
    (EVAL + ["--ensemble", "-1"], "--ensemble"),
    (SIM_ROBOT + ["--decay", "nan"], "--decay"),
    (["sim-robot", "--task", "reach-v3", "--hz", "1e9"], "--hz"),  # the server would refuse it at the handshake
    (SIM_ROBOT + ["--image-size", "100000"], "--image-size"),  # a 30 GB frame
    (SIM_ROBOT + ["--decay", "-1"], "--decay"),
    (EVAL + ["--delay", "-1"], "--delay"),
    (EVAL + ["--threads", "0"], "--threads"),
    (EVAL + ["--threads", "-1"], "--threads"),
    (EVAL + ["--threads", "100000"], "--threads"),
    (["serve", "--checkpoint", "x", "--metrics-file", ""], "--metrics-file"),  # it turned metrics off  # more than the machine's CPUs (100000 crashed OpenMP)
    (["serve", "--checkpoint", "x", "--threads", "100000"], "--threads"),
    (["calibrate", "--checkpoint", "x", "--budget", "2", "--out", "x.json", "--threads", "100000"], "--threads"),
    (EVAL + ["--precision-tolerance", "inf"], "--precision-tolerance"),
    (["ptp", "embed", "--checkpoint", "x", "--out", "y", "--batch-size", "0"], "--batch-size"),
    (["ptp", "embed", "--checkpoint", "x", "--out", "y", "--batch-size", "-4"], "--batch-size"),
    (["record", "--task", "reach-v3", "--episodes", "1", "--out", "x.zarr", "--instructions", "0"], "--instructions"),
    (["record", "--task", "reach-v3", "--episodes", "1", "--out", "x.zarr", "--instructions", "-3"], "--instructions"),
    (["record", "--task", "reach-v3", "--episodes", "1", "--out", "x.zarr", "--cameras", ""], "--cameras"),
    (["record", "--task", "reach-v3", "--episodes", "0", "--out", "x.zarr"], "--episodes"),
    (["ptp", "finetune", "--embeddings", "e", "--config", ""], "--config"),
    (["ptp", "finetune", "--embeddings", "e", "--config", str(CHECKPOINT.parents[3] / "configs")], "--config"),
    (["dashboard", "--host", ""], "--host"),
    (["keys", "--dir", ""], "--dir"),
])
def test_bad_flag_values_name_the_flag(capsys, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)  # where an accepted value would write
    err = _usage_error(capsys, argv)
    assert f"argument {flag}" in err and "expected" in err, err


def test_a_seed_names_its_range_and_a_huge_number_is_one_short_line(capsys):
    err = _usage_error(capsys, ["calibrate", "--checkpoint", "x", "--budget", "2", "--out", "x.json",
                                "--seed", "99999999999999999999"])
    assert "argument --seed: expected a seed in 0..2^63-1, got 99999999999999999999" in err, err
    huge = "1" + "0" * 400  # an int beyond float's range: the flag's check raised OverflowError (math.isfinite)
    err = _usage_error(capsys, ["calibrate", "--checkpoint", "x", "--budget", "2", "--out", "x.json", "--seed", huge])
    assert "argument --seed: expected a seed in 0..2^63-1, got 100000000000...0000 (401 characters)" in err, err
    assert "not found" in _err(capsys, ["calibrate", "--checkpoint", "nope", "--budget", huge, "--out", "x.json"])


def test_record_names_the_flag_when_called_as_a_library():
    from polcache.envs.record import record_demonstrations
    from polcache.errors import PolcacheError

    with pytest.raises(PolcacheError, match="--episodes must be a positive integer, got 0"):
        record_demonstrations("reach-v3", 0, "x.zarr")


def test_a_bind_port_out_of_range_is_refused_not_wrapped_around(capsys):
    err = _err(capsys, ["serve", "--checkpoint", str(CHECKPOINT), "--bind", "tcp://127.0.0.1:99999"])
    assert "--bind: port 99999 of tcp://127.0.0.1:99999 is not a port number" in err


def test_eval_refuses_more_action_steps_than_the_policy_makes(capsys):
    """Before the progress bar starts (with it on), so the refusal is the only line."""
    err = _err(capsys, [a for a in EVAL if a != "--no-progress"] + ["--action-steps", "100"])
    assert "--action-steps 100: the policy executes at most 8 actions per chunk" in err
    assert "a delay of 6 steps" in _err(capsys, [a for a in EVAL if a != "--no-progress"] + ["--delay", "6"])
    # the fix it names is one that can work: no --action-steps helps a delay of a whole chunk
    assert "(lower --action-steps to at most 2)" in _err(capsys, EVAL + ["--delay", "6"])
    assert "(--delay at most 7)" in _err(capsys, EVAL + ["--delay", "100", "--action-steps", "1"])
    # with the --action-steps given, the delay that fits them (it said 7, which 4 actions per chunk cannot take)
    assert ("(--delay at most 4 with --action-steps 4, 7 with --action-steps 1)"
            in _err(capsys, EVAL + ["--delay", "8", "--action-steps", "4"]))
    assert "(--delay at most 7, with --action-steps 1)" in _err(capsys, EVAL + ["--delay", "8"])
    assert "--task: empty task name" in _err(capsys, EVAL + ["--task", ""])  # not the checkpoint's, silently


def test_ptp_embed_names_a_checkpoint_that_does_not_fit_the_dataset(capsys, tmp_path):
    cue = CHECKPOINT.parent / "cue-reach-ptp"
    err = _err(capsys, ["ptp", "embed", "--checkpoint", str(cue), "--dataset", str(_dataset(tmp_path / "r.zarr")),
                        "--out", str(tmp_path / "e.zarr")])
    assert "observation 'state' is float32[39] per frame but the checkpoint's encoder takes float32[8]" in err


def test_ptp_embed_refuses_a_vla(tmp_path):
    from helpers import tiny_vla

    from polcache.errors import DatasetError
    from polcache.ptp.embeddings import check_embeddable

    with pytest.raises(DatasetError, match="the checkpoint is a vla policy"):
        check_embeddable(tiny_vla(), _dataset(tmp_path / "r.zarr"))


@pytest.mark.parametrize("argv", [["calibrate", "--budget", "2", "--out", "{tmp}/s.json"],
                                  ["ptp", "embed", "--out", "{tmp}/e.zarr"],
                                  ["eval", "--episodes", "1", "--backend", "torch"]], ids=["calibrate", "ptp", "eval"])
def test_an_exported_artifact_is_named_alike_where_a_checkpoint_is_needed(capsys, tmp_path, argv):
    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    err = _err(capsys, [a.format(tmp=tmp_path) for a in argv] + ["--checkpoint", str(artifact)])
    assert f"{artifact} is an exported policy (ONNX), not a checkpoint" in err


def test_ptp_finetune_refuses_another_task_and_another_dataset(capsys, tmp_path):
    data = _dataset(tmp_path / "reach.zarr")
    data_attrs = __import__("zarr").open_group(str(data), mode="r+").attrs
    data_attrs["task"] = "reach-v3"
    store = tmp_path / "e.zarr"
    assert main(["ptp", "embed", "--checkpoint", str(CHECKPOINT), "--dataset", str(data), "--out", str(store),
                 "--no-progress"]) == 0
    finetune = ["ptp", "finetune", "--embeddings", str(store), "--config", "configs/ptp_cue_reach.yaml",
                f"out={tmp_path / 'run'}"]
    err = _err(capsys, finetune)
    assert f"task is 'cue-reach' but dataset {data} (embedded in {store}) was recorded on 'reach-v3'" in err
    err = _err(capsys, finetune + ["task=reach-v3", f"dataset={tmp_path / 'other.zarr'}"])
    assert f"dataset is {tmp_path / 'other.zarr'} but {store} embeds {data}" in err
    assert not (tmp_path / "run").exists()


def test_a_config_task_a_multi_task_dataset_was_not_recorded_on_is_refused_by_train_and_ptp_finetune(capsys,
                                                                                                     tmp_path):
    """configs/ptp_cue_reach.yaml (task: cue-reach) on a pad-reach recording trained, and the checkpoint
    named cue-reach, which eval then ran without a word; ptp finetune compared the config's task with
    the encoder checkpoint's instead of the data's (an outside probe)."""
    import numpy as np

    from polcache.data import Episode, write_dataset

    t = np.arange(10, dtype=np.float32)[:, None]
    pads = ["pad-reach-left", "pad-reach-right"]
    data = tmp_path / "pads.zarr"
    write_dataset(data, [Episode(obs={"state": np.repeat(t, 39, 1)}, action=np.repeat(t, 4, 1), task=task)
                         for task in pads], {"tasks_recorded": pads})
    said = "task is 'cue-reach' but dataset {} was recorded on pad-reach-left, pad-reach-right; set task to one of them"
    err = _err(capsys, ["train", "--config", "configs/ptp_cue_reach.yaml", f"dataset={data}", f"out={tmp_path / 'a'}"])
    assert said.format(data) in err
    store = tmp_path / "e.zarr"
    assert main(["ptp", "embed", "--checkpoint", str(CHECKPOINT), "--dataset", str(data), "--out", str(store),
                 "--no-progress"]) == 0  # allowed (as calibrate allows another task's data), but said
    warned = capsys.readouterr().err
    assert (f"warning: the checkpoint's encoder was trained on reach-v3, {data} was recorded on pad-reach-left, "
            f"pad-reach-right" in warned) and warned.count("warning") == 1
    err = _err(capsys, ["ptp", "finetune", "--embeddings", str(store), "--config", "configs/ptp_cue_reach.yaml",
                        f"out={tmp_path / 'b'}"])
    assert said.format(f"{data} (embedded in {store})") in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dashboard_refuses_a_folder_as_metrics_file(capsys, tmp_path):
    assert f"--metrics {tmp_path}: is a folder" in _err(capsys, ["dashboard", "--metrics", str(tmp_path)])


@pytest.mark.parametrize("override, match", [("robot.seed=-1", "robot.seed: expected a seed in 0..2^63-1"),
                                             ("robot.seed=9223372036854775808",
                                              "robot.seed: expected a seed in 0..2^63-1"),
                                             ("robot.task=nonexist", "robot.task: unknown task 'nonexist'"),
                                             ("run_dir={afile}", "run_dir {afile}: is a file"),
                                             ("server.cache=bogus", "server.cache: unknown cache spec 'bogus'"),
                                             ("server.cache=bac:x:5@s.json", "server.cache: cache spec 'bac:x:5@s.json': "
                                                                             "the budget S must be an integer"),
                                             ("server.cache=/nope/s.json",
                                              "server.cache: schedule file not found: /nope/s.json")])
def test_launch_checks_before_starting_anything(capsys, afile, override, match):
    err = _err(capsys, ["launch", "configs/launch/sim.yaml", override.format(afile=afile)])
    assert match.format(afile=afile) in err


def test_launch_and_eval_name_a_folder_given_as_schedule_file(capsys, tmp_path):
    (tmp_path / "dir.json").mkdir()
    err = _err(capsys, ["launch", "configs/launch/sim.yaml", f"server.cache={tmp_path / 'dir.json'}"])
    assert f"server.cache: schedule file {tmp_path / 'dir.json'} is a folder" in err, err
    err = _err(capsys, EVAL + ["--cache", str(tmp_path / "dir.json")])
    assert f"schedule file {tmp_path / 'dir.json'} is a folder" in err, err


def test_sim_robot_with_a_keys_folder_without_keys_is_one_line(capsys, tmp_path):
    err = _err(capsys, SIM_ROBOT + ["--keys", str(tmp_path / "nokeys")])
    assert "client.key_secret and server.key not found (copy client.key_secret and server.key from the folder" in err


def test_a_metrics_file_under_a_file_is_named(capsys, afile):
    err = _err(capsys, ["serve", "--checkpoint", str(CHECKPOINT), "--metrics-file", str(afile / "x.jsonl")])
    assert f"{afile} is a file, not a folder" in err


@pytest.mark.parametrize("ended", ["finished", "interrupted", "interrupted-again"])
def test_the_command_exits_with_its_status_when_interrupted_on_its_way_out(monkeypatch, ended):
    """A Ctrl-C during the interpreter's teardown, after a finished export, made its status 130 with
    the artifact written; a second Ctrl-C while an interrupted command reports and exits turned its
    documented 130 into a death by SIGINT (-2 to a supervisor). Once the command ends, both are ignored."""
    import signal

    from polcache import cli

    def command(argv=None):
        if ended == "interrupted-again":
            raise KeyboardInterrupt
        return 0 if ended == "finished" else 130

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli, "main", command)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.console()
        assert exit_.value.code == (0 if ended == "finished" else 130)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_sigterm_stops_any_command_as_ctrl_c_does_saying_so():
    """A command without its own SIGTERM handling (`polcache calibrate`) died silently on a process
    manager's stop: status 143 with nothing said, unlike Ctrl-C's "interrupted". (In a child process:
    without the handling, the signal ends whichever process receives it.)"""
    script = """
import os, signal, sys, time
from polcache import cli
from polcache.cache import cli as cache_cli

def terminated(args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal arrives first
    return 0

cache_cli._run = terminated
status = cli.main(["calibrate", "--checkpoint", "c", "--out", "s.json", "--budget", "5"])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
sys.exit(status)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (143, "polcache calibrate: terminated\n")


def test_a_failure_of_the_system_is_one_line_naming_the_path(capsys, monkeypatch):
    """Disk full, a read-only file system met mid-write: a traceback (status 1) before."""
    def full(args):
        raise OSError(28, "No space left on device", "/data/run/.last.tmp-1/model.safetensors")
    monkeypatch.setattr(serve_cli, "_keys", full)
    assert cli.main(["keys", "--dir", "k"]) == 1
    assert capsys.readouterr().err == ("polcache keys: error: /data/run/.last.tmp-1/model.safetensors: No space left on "
                                       "device\n")


def test_a_library_message_with_newlines_is_printed_as_one_line():
    assert cli.one_line("cannot read part-0.parquet: Parquet magic bytes not found\n  in footer.\n") == (
        "cannot read part-0.parquet: Parquet magic bytes not found in footer.")


def test_a_folder_for_gifs_or_keys_that_is_itself_replaced_whole_is_refused(capsys, tmp_path):
    import shutil

    from polcache.errors import OutputError
    from polcache.serve.security import generate_keys

    data = _dataset(tmp_path / "reach.zarr")
    before = sorted(p.name for p in data.iterdir())
    err = _err(capsys, ["eval", "--checkpoint", str(CHECKPOINT), "--episodes", "1", "--video", str(data)])
    assert f"--video {data}: is a dataset, which is replaced whole when it is written again; give a path outside it" \
        in err
    assert sorted(p.name for p in data.iterdir()) == before
    ck = shutil.copytree(CHECKPOINT, tmp_path / "run" / "last")
    with pytest.raises(OutputError, match=f"--dir {ck}: is a checkpoint, which is replaced whole"):
        generate_keys(ck)
    assert not list(ck.glob("*.key*"))
    generate_keys(tmp_path / "keys")  # a folder of the user's own is fine


@pytest.mark.parametrize("argv, command", [(["eval", "--checkpoint", "ck", "--fast"], "eval"),
                                           (["ptp", "embed", "--checkpoint", "ck", "--out", "o", "--fast"], "ptp embed"),
                                           (["train", "--config", "configs/recommended_cpu.yaml", "--fast", "train.lr=1"],
                                            "train")])
def test_an_unknown_option_is_refused_by_its_command_pointing_at_its_help(capsys, argv, command):
    """It said "polcache: error: ... (see polcache --help)", whose page lists commands, not their options."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"polcache {command}: error: unrecognized arguments: --fast (see polcache "
                                       f"{command} --help)\n")


def test_a_flag_of_one_value_given_twice_with_two_values_is_refused(capsys, monkeypatch):
    """`serve --bind A --bind B` served on B alone, silently (argparse keeps the last); the same value
    twice changes nothing and passes, and flags that collect several values still do."""
    with pytest.raises(SystemExit) as info:
        main(["serve", "--checkpoint", "ck", "--bind", "tcp://127.0.0.1:5725", "--bind", "tcp://127.0.0.1:5726"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("polcache serve: error: --bind given twice (tcp://127.0.0.1:5725, then "
                                       "tcp://127.0.0.1:5726); it takes one value (see polcache serve --help)\n")
    parser = cli.build_parser()
    assert parser.parse_args(["eval", "--checkpoint", "ck", "--episodes", "3", "--episodes", "3"]).episodes == 3
    assert parser.parse_args(["eval", "--checkpoint", "ck", "--episodes", "4"]).episodes == 4  # a new parse forgets
    args = parser.parse_args(["dashboard", "--metrics", "a.jsonl", "--metrics", "b.jsonl"])
    assert args.metrics == ["a.jsonl", "b.jsonl"]



@pytest.mark.parametrize("refused", ["model.safetensors", "dataset"])
def test_a_file_the_system_will_not_let_us_read_is_said_as_such_not_as_damage(capsys, tmp_path, monkeypatch, refused):
    """A permission error read as "truncated or damaged?" or "not a polcache dataset". (Root reads any
    file, so the refusal is simulated.)"""
    import pathlib

    import zarr

    read_bytes = pathlib.Path.read_bytes
    if refused == "dataset":
        monkeypatch.setattr(zarr, "open_group", lambda path, **kw: _refuse(path))
        (tmp_path / "d.zarr").mkdir()
        argv = ["train", "--config", "configs/recommended_cpu.yaml", f"dataset={tmp_path / 'd.zarr'}",
                f"out={tmp_path / 'run'}"]
    else:
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda p: _refuse(p) if p.name == refused else read_bytes(p))
        argv = ["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("Permission denied") and "damaged" not in err and "not a polcache" not in err, err


def test_training_state_the_system_will_not_let_us_read_is_not_called_damaged(tmp_path, monkeypatch):
    """It said "pass --fresh to start over", which sets a good run aside."""
    import pathlib

    from polcache.policy.checkpoint import load_train_state

    (tmp_path / "train").mkdir()
    for name in ("model.safetensors", "state.pt"):
        (tmp_path / "train" / name).write_bytes(b"x")
    read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda p: _refuse(p) if p.name == "state.pt" else read_bytes(p))
    with pytest.raises(PermissionError):
        load_train_state(tmp_path)


def _refuse(path):
    raise PermissionError(13, "Permission denied", str(path))
