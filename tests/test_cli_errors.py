"""Bad input gives one clear line naming the problem, never a traceback."""

from pathlib import Path

import pytest

from polcache.cli import main


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
    (lambda ck: (ck / "config.yaml").write_text(""), "config.yaml: empty or not a mapping (truncated?)"),
    (lambda ck: (ck / "config.yaml").write_text("policy: [unclosed"), "config.yaml: while parsing"),
    (lambda ck: _other_normalizer(ck, state_dim=8), "normalizer.safetensors: 'state' statistics have 8 dimensions but "
                                                    "the model's state has 39 (a normalizer from another model?)"),
], ids=["meta-list", "meta-binary", "meta-action-dim", "meta-obs-spec", "config-empty", "config-yaml",
        "normalizer-of-another-model"])
def test_a_damaged_checkpoint_file_is_named_in_one_line(capsys, tmp_path, damage, match):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3", ck)
    damage(ck)
    assert match in _err(capsys, ["eval", "--checkpoint", str(ck), "--episodes", "1"])


def _other_normalizer(ck, state_dim):
    import numpy as np
    from safetensors.torch import save_file

    from polcache.data import Normalizer

    rng = np.random.default_rng(0)
    other = Normalizer.fit({"state": rng.normal(size=(20, state_dim)), "action": rng.normal(size=(20, 4))})
    save_file(other.state_dict(), str(ck / "normalizer.safetensors"))


def _edit_meta(ck, **changes):
    import json

    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps(meta | changes))


def test_a_sampler_that_does_not_fit_the_objective_is_refused_before_any_episode(capsys):
    checkpoint = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/reach-v3"  # epsilon DP-T
    err = _err(capsys, ["eval", "--checkpoint", str(checkpoint), "--sampler", "flow", "--episodes", "1"])
    assert err.endswith("--sampler flow does not fit policy.objective=epsilon (a denoiser trained to predict "
                        "noise): use --sampler ddpm or ddim")


def test_a_training_runs_folder_points_to_its_checkpoint(capsys, tmp_path):
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / "meta.json").write_text("{}")
    err = _err(capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "1"])
    assert err.endswith(f"a training run: pass {tmp_path / 'run' / 'last'}")


def test_nested_commands_are_named_and_ptp_embed_asks_for_the_dataset(capsys, tmp_path, monkeypatch):
    checkpoint = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/cue-reach-ptp"
    monkeypatch.chdir(tmp_path)  # where the checkpoint's data/cue-reach.zarr is not
    err = _err(capsys, ["ptp", "embed", "--checkpoint", str(checkpoint), "--out", "x.zarr"])
    assert err.startswith("polcache ptp embed: error:") and err.endswith("which is not here: pass --dataset")


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy:\n  widht: 64\n")
    err = _err(capsys, ["train", "--config", str(cfg)])
    assert "policy.widht" in err


def test_bad_override_value(capsys):
    assert "train.steps" in _err(capsys, ["train", "--config", "configs/metaworld_small.yaml", "train.steps=lots"])


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML (ParserError); quote a string, write a "
                      "list as [a, b]"),
    (["train.steps=3", "train=5"], "override 'train=5': 'train' is a section; set its keys, e.g. train.KEY=VALUE"),
    (["train.log_every=0"], "train.log_every must be an integer >= 1, got 0"),  # was a ZeroDivisionError
    (["policy.n_heads=0"], "policy.n_heads must be an integer >= 1, got 0"),
])
def test_bad_overrides_are_one_line(capsys, overrides, message):
    err = _err(capsys, ["train", "--config", "configs/recommended_cpu.yaml", *overrides])
    assert err == f"polcache train: error: {message}"


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


@pytest.mark.parametrize("argv, match", [
    (["eval", "--episodes", "x"], "polcache eval: error: argument --episodes: expected a positive integer, got 'x' "
                                  "(see polcache eval --help)"),
    (["ptp", "embed", "--batch-size", "x"], "polcache ptp embed: error: argument --batch-size"),
    ([], "polcache: error: the following arguments are required: COMMAND"),
], ids=["flag", "nested", "no-command"])
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
    # record --out on the dataset would replace it, with the run in it
    assert train(data, data).endswith(f"out={data} is dataset {data}: writing the dataset again would delete the "
                                      "run; give an out directory outside it")
    other = demo_dataset(tmp_path / "other.zarr")
    assert f"out={other / 'runs/x'} is inside dataset {other}:" in train(data, other / "runs/x")
    assert train(tmp_path / "run/last/d.zarr", tmp_path / "run").endswith(
        f"dataset {tmp_path / 'run/last/d.zarr'} is inside {tmp_path / 'run/last'}, which training replaces; move the "
        "dataset or give another out directory")
    assert sorted(p.name for p in data.iterdir()) == ["data", "meta", "zarr.json"]
