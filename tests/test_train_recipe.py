"""Training-length, validation and augmentation options of the training recipe."""

import json
import os

import numpy as np
import pytest
import torch

from polcache.cli import main
from polcache.config import ConfigError, load_config
from polcache.data import Normalizer
from polcache.policy import load_policy
from polcache.policy.checkpoint import read_meta
from polcache.train.loop import total_steps

from test_integration import TINY, dataset  # noqa: F401  (module-scoped recorded dataset)


def test_epochs_set_the_step_count_from_the_data():
    cfg = load_config("configs/metaworld_small.yaml", ["train.epochs=3", "train.batch_size=64"])
    assert total_steps(cfg, 640) == 30
    assert total_steps(cfg, 1280) == 60  # twice the data, twice the steps
    assert total_steps(cfg, 10) == 3  # fewer windows than a batch: one batch per epoch
    assert total_steps(load_config("configs/metaworld_small.yaml", ["train.steps=123"]), 640) == 123
    # a step count on the command line wins over the file's epochs; both on the command line are refused (epochs
    # won, the steps given said nothing)
    assert load_config("configs/recommended_cpu.yaml").train.epochs == 100
    assert total_steps(load_config("configs/recommended_cpu.yaml", ["train.steps=5"]), 640) == 5
    with pytest.raises(ConfigError, match="train.steps=5 and train.epochs=2 both given: a run trains by one of them"):
        load_config("configs/recommended_cpu.yaml", ["train.steps=5", "train.epochs=2"])


@pytest.mark.parametrize("override, match", [
    ("train.state_norm=minmax", "train.state_norm"),
    ("train.action_norm=1", "train.action_norm"),
    ("train.state_noise=-0.1", "state_noise"),
    ("train.steps=0", "train.steps"),
    ("train.steps=100000000000000000000", r"train.steps must be an integer in \[0, 1000000000\], got 1000"),
    ("out=", r"out: expected a string, got nothing \(null: `key=` with no value, or a YAML null\)"),  # "got None"
    ("policy.n_layers.x=1", r"override 'policy.n_layers.x': 'n_layers' is not a section of keys: the config gives "
                            r"it 4"),
    ("train.action_norm=gaussian", "clips normalised actions"),  # with the default clip_sample: 0% on peg-insert
])
def test_recipe_options_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/metaworld_small.yaml", [override])


@pytest.mark.parametrize("value, message", [
    ("0", "train.epochs=0: expected a positive number of epochs (with train.epochs=0 the run would train "
          "train.steps=20000 steps; to train by steps, set train.steps=N instead)"),  # trained those 20000 steps
    ("-1", "train.epochs=-1: expected a positive number of epochs (with train.epochs=0 the run would train "
           "train.steps=20000 steps; to train by steps, set train.steps=N instead)"),
    ("1.5", "train.epochs: expected an integer, got 1.5"),
], ids=["zero", "negative", "fraction"])
def test_an_epochs_override_below_one_is_refused_like_a_steps_one(tmp_path, capsys, value, message):
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/recommended_cpu.yaml", f"dataset={tmp_path / 'd.zarr'}", f"out={run}",
                 f"train.epochs={value}", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"polcache train: error: {message}"
    assert not run.exists()
    # given with train.steps, epochs=0 says to train by steps
    assert load_config("configs/recommended_cpu.yaml", ["train.epochs=0", "train.steps=5"]).train.steps == 5


def test_normalizer_modes_per_key():
    rng = np.random.default_rng(0)
    state, action = rng.normal(3.0, 2.0, (500, 4)), rng.uniform(-5, 7, (500, 2))
    n = Normalizer.fit({"state": state, "action": action}, {"state": "gaussian", "action": "limits"})
    z = n.normalize("state", state)
    assert np.allclose(z.mean(0), 0, atol=1e-6) and np.allclose(z.std(0), 1, atol=1e-6)
    a = n.normalize("action", action)
    assert np.allclose(a.min(0), -1, atol=1e-6) and np.allclose(a.max(0), 1, atol=1e-6)
    with pytest.raises(ValueError, match="unknown normalizer mode"):
        Normalizer.fit({"state": state}, {"state": "robust"})


@pytest.mark.slow
def test_state_noise_perturbs_only_training_inputs(dataset, tmp_path):  # noqa: F811
    from polcache.data import EpisodeStore, SequenceDataset
    from polcache.train.loop import build_policy

    cfg = load_config("configs/metaworld_small.yaml", [*TINY, f"dataset={dataset}"])
    store = EpisodeStore.open(dataset)
    policy = build_policy(cfg, store).eval()  # no dropout: only the noise may differ
    batch = next(iter(torch.utils.data.DataLoader(SequenceDataset(store, 16, 2, ["state"]), batch_size=8)))

    def loss(noise: float) -> float:
        return policy.compute_loss(batch, torch.Generator().manual_seed(0), state_noise=noise).item()

    assert loss(0.0) == loss(0.0)
    assert loss(0.5) != loss(0.0)


@pytest.mark.slow
def test_epoch_training_keeps_the_best_validated_checkpoint(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = ["train", "--config", "configs/metaworld_small.yaml", f"dataset={dataset}", f"out={run}", *TINY,
            "train.epochs=2", "train.checkpoint_every=5", "train.val_fraction=0.5", "train.val_windows=8",
            "--no-progress"]
    assert main(args) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    plan, vals = log[0], [r for r in log if "val_action_mse" in r]
    assert plan["steps"] == 2 * max(1, plan["train_windows"] // 16)
    assert vals and all(r["val_action_mse"] >= 0 for r in vals)
    best_step = min(vals, key=lambda r: r["val_action_mse"])["step"]
    _, _, meta = load_policy(run / "best")
    assert meta["step"] == best_step
    assert meta["validation"]["val_action_mse"] == pytest.approx(min(r["val_action_mse"] for r in vals))
    # Resuming a finished run does not replace best with a worse score.
    assert main(args) == 0
    assert load_policy(run / "best")[2]["step"] == best_step


def test_exponent_numbers_without_a_dot_are_numbers():
    # YAML 1.1 reads `1e-3` as a string; a learning rate written that way must still work.
    assert load_config("configs/metaworld_small.yaml", ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config("configs/metaworld_small.yaml", ["train.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr must be a finite number in (0, 1e+38], got inf"),  # trained an all-NaN checkpoint
    ("train.lr=nan", "train.lr must be a finite number in (0, 1e+38], got nan"),
    ("train.lr=1e39", "train.lr must be a finite number in (0, 1e+38], got 1e+39"),  # AdamW's float32 update
    ("train.lr=-1", "train.lr must be a finite number in (0, 1e+38], got -1.0"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1, got 0"),
    ("policy.n_heads=0", "policy.n_heads must be an integer >= 1, got 0"),  # was a ZeroDivisionError
    ("policy.n_layers=0", "policy.n_layers must be an integer >= 1, got 0"),
    ("policy.width=-8", "policy.width must be an integer >= 1, got -8"),
    ("train.ema_decay=1", "train.ema_decay must be a finite number in [0, 1), got 1.0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be an integer >= 0, got -1"),
    ("policy.image.crop_fraction=0", "policy.image.crop_fraction must be a finite number in (0, 1], got 0.0"),
    ("train.state_noise=inf", "train.state_noise must be a finite number >= 0, got inf"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be an integer >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
    ("train.val_fraction=1", "train.val_fraction must be a finite number in [0, 1), got 1.0"),
    ("policy.sampler.train_steps=0", "policy.sampler.train_steps must be an integer >= 1, got 0"),
    ("train.num_workers=-1", "train.num_workers must be an integer >= 0, got -1"),
    ("train.threads=-2", "train.threads must be an integer >= 0, got -2"),
    ("policy.p_drop_attn=1", "policy.p_drop_attn must be a finite number in [0, 1), got 1.0"),
    ("policy.p_drop_emb=-0.1", "policy.p_drop_emb must be a finite number in [0, 1), got -0.1"),
    ("train.seed=-1", "train.seed must be an integer in [0, 9223372036854775807], got -1"),
    ("train.betas=[0.9, 1.5]", "train.betas[1] must be a finite number in [0, 1), got 1.5"),
    ("policy.vla.heads=0", "policy.vla.heads must be an integer >= 1, got 0"),
    ("policy.sampler.beta_schedule=cosine",
     "policy.sampler.beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got 'cosine'"),
])
def test_numeric_fields_outside_their_range_are_named(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/recommended_cpu.yaml", [override])
    assert str(exc.value) == message


def test_more_inference_steps_than_trained_noise_levels_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError) as exc:
        load_config("configs/recommended_cpu.yaml", ["policy.sampler.inference_steps=101"])
    assert str(exc.value) == ("policy.sampler.inference_steps (101) must be at most policy.sampler.train_steps (100): "
                              "a ddim step takes one of the trained noise levels")
    # a flow sampler integrates continuous time: any step count
    assert load_config("configs/vla_mt10.yaml", ["policy.sampler.inference_steps=200"]).policy.sampler.kind == "flow"


def test_every_numeric_config_field_has_a_range():
    """A numeric field added to a config dataclass without an entry in RANGES would go unchecked."""
    import dataclasses
    import typing

    from polcache.config import RANGES, ExperimentConfig

    def numeric(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp, key = typing.get_type_hints(cls)[f.name], prefix + f.name
            if dataclasses.is_dataclass(tp):
                yield from numeric(tp, key + ".")
            elif tp in (int, float) or typing.get_origin(tp) is tuple:
                yield key

    assert set(numeric(ExperimentConfig)) == set(RANGES)


FAST = ["policy.n_layers=1", "policy.width=16", "policy.n_heads=2", "policy.state_hidden=16",
        "policy.sampler.inference_steps=2", "train.batch_size=8", "train.steps=2", "train.checkpoint_every=2",
        "train.val_windows=2", "train.val_fraction=0.3", "train.warmup_steps=0", "train.threads=1", "--no-progress"]


def demo_dataset(path, task="demo", shift=0.0, n=3, fps=None):
    """A tiny recorded-looking dataset (no simulator): n episodes of 24 steps, 3-d state, 2-d action;
    recorded at `fps` control steps per second where given."""
    from polcache.data import Episode, write_dataset

    t = np.linspace(0, 1, 24, dtype=np.float32)[:, None]
    episodes = [Episode(obs={"state": np.hstack([t, t * i, -t]) + shift}, action=np.hstack([t, -t]) * (i + 1),
                        task=task) for i in range(n)]
    write_dataset(path, episodes, {"task": task} | ({"fps": fps} if fps else {}))
    return path


def train_cli(dataset, out, *extra):
    """`polcache train` on the FAST settings, with `extra` overrides in place of FAST's of the same keys (an
    epoch count in place of its step count)."""
    keys = {e.partition("=")[0] for e in extra}
    if "train.epochs" in keys:
        keys.add("train.steps")
    fast = [f for f in FAST if f.partition("=")[0] not in keys]
    return main(["train", "--config", "configs/recommended_cpu.yaml", f"dataset={dataset}", f"out={out}", *fast,
                 *extra])


def test_resuming_on_other_data_is_refused_naming_what_differs(tmp_path, capsys):
    run = tmp_path / "run"
    a, b = demo_dataset(tmp_path / "a.zarr", "task-a"), demo_dataset(tmp_path / "b.zarr", "task-b", shift=1.0)
    assert train_cli(a, run) == 0
    capsys.readouterr()
    assert train_cli(b, run, "train.steps=4") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"polcache train: error: cannot resume {run / 'last'}: task is 'task-b', the run's is 'task-a'; "
                   f"dataset {b} is not the run's {a} (the normaliser statistics of state differ); pass --fresh to start over "
                   "(the previous run is moved aside) or use another out directory")
    demo_dataset(a, "task-a", shift=0.5)  # recorded again at the same path
    assert train_cli(a, run, "train.steps=4") == 2
    assert f"dataset {a} changed since the run (the normaliser statistics of " in capsys.readouterr().err
    demo_dataset(a, "task-a")  # the run's data again, normalised another way: the mode is named, not the data
    assert train_cli(a, run, "train.steps=4", "train.state_norm=gaussian") == 2
    err = capsys.readouterr().err
    assert "train.state_norm is gaussian, the run's is limits (the normaliser is fitted with it)" in err
    assert "dataset" not in err
    assert load_policy(run / "last")[2]["step"] == 2  # untouched
    import shutil

    shutil.move(a, tmp_path / "moved.zarr")  # the same data at another path resumes
    demo_dataset(tmp_path / "a.zarr", "task-a")
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "copy.zarr")
    assert train_cli(tmp_path / "copy.zarr", run, "train.steps=4") == 0
    assert "holds the same data" in capsys.readouterr().out
    assert load_policy(run / "last")[2]["step"] == 4


def test_resuming_on_the_same_data_at_another_rate_is_refused(tmp_path, capsys):
    """The checkpoint records the rate its policy acts at (the dataset's fps): a resume on a copy of
    the data stating another rate switched it mid-run, in silence ("holds the same data")."""
    run = tmp_path / "run"
    assert train_cli(demo_dataset(tmp_path / "a.zarr", fps=20), run) == 0
    capsys.readouterr()
    slower = demo_dataset(tmp_path / "slower.zarr", fps=10)
    assert train_cli(slower, run, "train.steps=4") == 2
    assert (f"cannot resume {run / 'last'}: dataset {slower} is recorded at 10 fps, the run's policy acts at 20 Hz; "
            f"pass --fresh") in capsys.readouterr().err
    assert load_policy(run / "last")[0].spec.control_hz == 20.0  # untouched
    assert train_cli(demo_dataset(tmp_path / "copy.zarr", fps=20), run, "train.steps=4") == 0  # the same rate resumes
    unstated = tmp_path / "unstated"  # and the other way round: from no stated rate to one
    assert train_cli(demo_dataset(tmp_path / "none.zarr"), unstated) == 0
    capsys.readouterr()
    assert train_cli(slower, unstated, "train.steps=4") == 2
    said = capsys.readouterr()
    assert (f"dataset {slower} is recorded at 10 fps, the run's policy was trained on data that states no rate"
            in said.err) and "dataset rate" not in said.out  # no rate said for a run that did not go on


def test_resuming_with_another_validation_split_is_refused_naming_the_settings(tmp_path, capsys):
    """Another train.seed or train.val_fraction changed the held-out episodes mid-run: the run validated on
    episodes it had trained on and replaced best/ on that score."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4", "train.seed=1", "train.val_windows=4") == 2
    assert capsys.readouterr().err.strip() == (
        f"polcache train: error: cannot resume {run / 'last'}: train.seed is 1, the run's is 0 (it chooses the "
        "validation episodes); train.val_windows is 4, the run's is 2 (it chooses the validation windows); pass "
        "--fresh to start over (the previous run is moved aside) or use another out directory")
    assert train_cli(data, run, "train.steps=4", "train.val_fraction=0.5") == 2
    assert "train.val_fraction is 0.5, the run's is 0.3 (it chooses the validation episodes)" in \
        capsys.readouterr().err
    assert load_policy(run / "last")[2]["step"] == 2  # untouched


def test_resuming_with_another_policy_config_names_the_fields(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.steps=2") == 0
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4", "policy.n_heads=4") == 2
    assert "a different policy config (policy.n_heads is 4, the run's is 2); pass --fresh" in capsys.readouterr().err


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    capsys.readouterr()
    assert train_cli(data, run) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"resuming from {run / 'last'} at step 2; the plan is 2 steps, so there is nothing left to train (give a "
        "larger train.steps or train.epochs to train on, or --fresh to start over)")
    assert load_policy(run / "last")[2]["step"] == 2


@pytest.mark.parametrize("name", ["normalizer.safetensors", "model.safetensors"])
def test_resuming_from_a_damaged_weights_file_names_it(tmp_path, capsys, name):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    (run / "last" / name).write_bytes(b"")
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4") == 2
    assert capsys.readouterr().err.strip() == (
        f"polcache train: error: {run / 'last' / name}: cannot read it, truncated or damaged? (SafetensorError: Error "
        "while deserializing: header too small); pass --fresh to start over")


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_resuming_from_flipped_bits_in_the_training_state_names_the_file(tmp_path, capsys, name):
    """Only the inference files had digests: damaged resume weights were trained on, then saved with a
    valid digest."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    file = run / "last" / "train" / name
    content = bytearray(file.read_bytes())
    content[-10] ^= 0x01
    file.write_bytes(bytes(content))
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"polcache train: error: {file}: ") and len(err.splitlines()) == 1, err
    assert "pass --fresh to start over" in err


def test_a_damaged_checkpoint_is_called_so_and_fresh_moves_it_aside(tmp_path, capsys):
    """A truncated last/meta.json was "not a polcache checkpoint", and --fresh, which the message for
    damaged weights suggests, was refused the same way: no way to start over in that run directory."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    (run / "last" / "meta.json").write_text('{"format": "polcache-checkpoint", "vers')
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4") == 2
    err = capsys.readouterr().err
    assert f"{run / 'last'} is a damaged checkpoint (" in err and "; pass --fresh to start over" in err, err
    assert train_cli(data, run, "train.steps=4", "--fresh") == 0
    (aside,) = run.glob("previous-*")
    assert (aside / "last" / "meta.json").read_text().endswith('"vers')  # moved, not deleted
    read_meta(run / "last")


@pytest.mark.parametrize("sub", ["last", "best"])
def test_a_folder_of_the_users_where_training_writes_a_checkpoint_is_refused(tmp_path, capsys, sub):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    (run / sub).mkdir(parents=True)
    (run / sub / "notes.txt").write_text("precious")
    assert train_cli(data, run, "train.steps=2") == 2
    assert f"{run / sub} is not a polcache checkpoint, and training replaces it" in capsys.readouterr().err
    assert (run / sub / "notes.txt").read_text() == "precious"



def test_an_out_folder_of_other_files_is_refused(tmp_path, capsys):
    data, out = demo_dataset(tmp_path / "d.zarr"), tmp_path / "configs"
    out.mkdir()
    (out / "sim.yaml").write_text("keep: me")
    assert train_cli(data, out) == 2
    assert f"out={out} holds other files and no training run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sim.yaml"]


def test_fresh_moves_the_previous_run_aside_and_starts_clean(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.steps=4") == 0
    old_log = (run / "train_log.jsonl").read_text()
    capsys.readouterr()
    assert train_cli(data, run, "--fresh") == 0
    out = capsys.readouterr().out
    (aside,) = run.glob("previous-*")
    assert f"--fresh: moved the previous run's last/, best/, train_log.jsonl to {aside}" in out
    assert (aside / "train_log.jsonl").read_text() == old_log  # nothing lost
    assert load_policy(aside / "last")[2]["step"] == 4 and (aside / "best" / "meta.json").is_file()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["steps"] == 2 and max(r.get("step", 0) for r in log) == 2  # only the new run's lines
    assert load_policy(run / "best")[2]["step"] == 2  # judged on its own, not against the old best


def test_a_fresh_killed_between_its_moves_is_finished_by_the_next_run(tmp_path, capsys, monkeypatch):
    """--fresh moves last/, best/ and the log one by one: killed after the first, the next run (even
    without --fresh) used to resume nothing and append to the old log, judged against the old best."""
    import polcache.train.loop as loop

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.steps=4") == 0
    old_log = (run / "train_log.jsonl").read_text()
    rename = os.rename

    def killed_after_one(src, dst):
        rename(src, dst)
        raise KeyboardInterrupt  # as a SIGINT between the two renames

    monkeypatch.setattr(loop.os, "rename", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        loop._set_aside_previous_run(run, "--fresh")
    monkeypatch.setattr(loop.os, "rename", rename)
    (aside,) = run.glob("previous-*")
    assert (aside / "last").is_dir() and (run / "best").is_dir()  # split between the two folders
    capsys.readouterr()
    assert train_cli(data, run) == 0
    assert f"moving the previous run aside was interrupted before: finished moving it to {aside}" in \
        capsys.readouterr().out
    assert (aside / "train_log.jsonl").read_text() == old_log and (aside / "best" / "meta.json").is_file()
    assert not (run / loop.FRESH_MARK).exists()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 2  # a new run of its own, not the old log continued


@pytest.mark.parametrize("left", [("train_log.jsonl",), ("best", "train_log.jsonl")])
def test_a_new_run_moves_aside_what_an_earlier_run_without_last_left(tmp_path, capsys, left):
    """Killed before its first checkpoint (only the log left), or with last/ deleted, an earlier run
    left files that the next run, starting at step 0, appended to (two plans, steps twice) and judged
    its best/ against."""
    import shutil

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.steps=4") == 0
    for name in {"last", "best"} - set(left):
        shutil.rmtree(run / name)
    old_log = (run / "train_log.jsonl").read_text()
    capsys.readouterr()
    assert train_cli(data, run) == 0
    (aside,) = run.glob("previous-*")
    names = ", ".join(name + ("/" if name == "best" else "") for name in left)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"no {run / 'last'} to resume from (the run stopped before its first checkpoint?), so a new run starts: moved "
        f"the previous run's {names} to {aside} (delete it if not needed)")
    assert sorted(p.name for p in aside.iterdir()) == sorted(left)
    assert (aside / "train_log.jsonl").read_text() == old_log  # nothing lost
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in log if "plan" in r] == [2] and max(r.get("step", 0) for r in log) == 2
    assert load_policy(run / "best")[2]["step"] == 2  # judged on its own, not against the old best
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4") == 0  # with last/, a run resumes as before: nothing moved
    assert capsys.readouterr().out.startswith(f"resuming from {run / 'last'} at step 2\n")
    assert len(list(run.glob("previous-*"))) == 1


def test_a_loss_that_becomes_nan_stops_before_the_weights_take_the_step(tmp_path, capsys, monkeypatch):
    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward, calls = DiffusionPolicy.forward, []

    def nan_at_step_3(self, batch, state_noise=0.0):
        calls.append(1)
        loss = forward(self, batch, state_noise)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DiffusionPolicy, "forward", nan_at_step_3)
    assert train_cli(data, run, "train.steps=4", "train.log_every=1", "train.lr=2e-3") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"polcache train: error: step 3: the training loss is nan, so training stopped ({run / 'last'} "
                   "keeps step 2); the learning rate train.lr=0.002 is the likely cause: lower it (or lengthen "
                   "train.warmup_steps) and run again")
    assert load_policy(run / "last")[2]["step"] == 2  # loads: its weights are finite
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail).get("step") for line in lines] == [None, 1, 2, 2]


def test_a_resumed_run_takes_the_commands_learning_rate(tmp_path, capsys):
    """The divergence message says to lower train.lr and run again: the restored optimizer state kept the old one."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.lr=1e-3") == 0
    assert train_cli(data, run, "train.lr=1e-5", "train.steps=4", "train.log_every=1") == 0
    assert "note: learning rate train.lr=1e-05 (the run had 0.001)" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "lr" in r}
    assert 0 < lrs[3] <= 1e-5


def test_the_log_records_the_rate_each_step_used_and_the_time_since_the_run_began(tmp_path, monkeypatch):
    """The log read the scheduler after it stepped: each line held the next step's rate (the last one 0.0);
    and elapsed_s started again from 0 on every resume."""
    import time

    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward = DiffusionPolicy.forward

    def slow(self, batch, state_noise=0.0):
        time.sleep(0.2)
        return forward(self, batch, state_noise)

    monkeypatch.setattr(DiffusionPolicy, "forward", slow)
    assert train_cli(data, run, "train.lr=1e-3", "train.log_every=1") == 0
    monkeypatch.setattr(DiffusionPolicy, "forward", forward)
    assert train_cli(data, run, "train.lr=1e-3", "train.log_every=1", "train.steps=4") == 0
    log = {r["step"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "lr" in r}
    assert log[1]["lr"] == pytest.approx(1e-3)  # no warm-up: the first step takes train.lr
    assert log[2]["lr"] == pytest.approx(5e-4)  # halfway down the 2-step cosine
    assert log[4]["lr"] > 0  # the last step's rate, not the 0.0 after it
    assert log[2]["elapsed_s"] >= 0.4 and log[3]["elapsed_s"] >= log[2]["elapsed_s"]


def test_a_resumed_run_takes_the_commands_betas_and_weight_decay_and_keeps_the_moments(tmp_path, capsys):
    from polcache.policy.checkpoint import load_train_state

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.betas=[0.9, 0.95]", "train.weight_decay=0.001") == 0
    assert train_cli(data, run, "train.betas=[0.5, 0.6]", "train.weight_decay=0.1", "train.steps=4") == 0
    optimizer = load_train_state(run / "last").optimizer
    assert all(g["betas"] == (0.5, 0.6) and g["weight_decay"] == 0.1 for g in optimizer["param_groups"])
    assert all(s["step"] == 4 for s in optimizer["state"].values())  # the moments of steps 1-2 carried on
    out = capsys.readouterr().out
    assert "note: train.betas=[0.5, 0.6] (the run had [0.9, 0.95])" in out
    assert "note: train.weight_decay=0.1 (the run had 0.001)" in out


def test_a_batch_smaller_than_the_world_size_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node 4 sets it
    run, missing = tmp_path / "run", tmp_path / "not-recorded-yet.zarr"  # refused before the dataset is opened
    assert train_cli(missing, run, "train.batch_size=2") == 2
    assert capsys.readouterr().err.strip() == (
        "polcache train: error: train.batch_size=2 is smaller than the world size 4 (processes sharing the batch, "
        "each taking batch_size // 4 windows); set train.batch_size >= 4")
    assert not run.exists()


@pytest.mark.parametrize("sig, status, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_stopped_run_saves_and_exits_with_the_signals_status(tmp_path, capsys, monkeypatch, sig, status, said):
    """Ctrl-C exits 130; a process manager's SIGTERM 143 (128 + 15), the status it expects. Both save OUT/last."""
    import signal

    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward, calls = DiffusionPolicy.forward, []

    def stop_at_step_2(self, batch, state_noise=0.0):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(getattr(signal, sig))
        return forward(self, batch, state_noise)

    monkeypatch.setattr(DiffusionPolicy, "forward", stop_at_step_2)
    assert train_cli(data, run, "train.steps=4") == status
    captured = capsys.readouterr()
    assert f"interrupted: saved {run / 'last'} at step 2" in captured.out  # the step under way is finished first
    assert captured.err.strip().splitlines()[-1] == f"polcache train: {said}"
    assert load_policy(run / "last")[2]["step"] == 2


def test_a_second_ctrl_c_during_the_interrupted_runs_save_is_ignored(tmp_path, capsys, monkeypatch):
    """Pressed again while OUT/last is being saved, Ctrl-C used to cut the save short (the steps since
    the last checkpoint lost) or end in a traceback; it is ignored until the save is done."""
    import signal

    import polcache.train.loop as loop
    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward, save, calls = DiffusionPolicy.forward, loop._save, []

    def stop_at_step_2(self, batch, state_noise=0.0):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return forward(self, batch, state_noise)

    def pressed_again(*args):
        signal.raise_signal(signal.SIGINT)
        return save(*args)

    monkeypatch.setattr(DiffusionPolicy, "forward", stop_at_step_2)
    monkeypatch.setattr(loop, "_save", pressed_again)
    assert train_cli(data, run, "train.steps=4") == 130
    captured = capsys.readouterr()
    assert f"interrupted: saved {run / 'last'} at step 2" in captured.out
    assert captured.err.strip().splitlines()[-1] == "polcache train: interrupted"
    assert load_policy(run / "last")[2]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # held only for the save


def test_a_resumed_run_forgets_the_logged_steps_its_checkpoint_does_not_hold(tmp_path, capsys):
    """Killed between checkpoints, a run trains those steps again: its log holds each step once."""
    import json

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.log_every=1") == 0  # saved at step 2
    log = run / "train_log.jsonl"
    with open(log, "a") as f:  # what a kill at step 3 leaves: step 3 logged, not saved, a torn last line
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    assert train_cli(data, run, "train.log_every=1", "train.steps=4") == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4] and 9.0 not in [r["loss"] for r in records if "loss" in r]
    assert "unreadable" not in capsys.readouterr().err  # a kill's torn last line is no damage to speak of


def test_a_resumed_run_says_which_damaged_log_lines_it_dropped(tmp_path, capsys):
    """A damaged line inside the log vanished without a word as the run resumed (only a torn last line is a kill's)."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.log_every=1") == 0
    log = run / "train_log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    log.write_text("".join(lines))
    capsys.readouterr()
    assert train_cli(data, run, "train.log_every=1", "train.steps=3") == 0
    assert f"warning: {log}: line 2 unreadable (damaged), dropped as it resumes" in capsys.readouterr().err


def test_a_resumed_run_given_another_length_prints_and_logs_its_new_plan(tmp_path, capsys, monkeypatch):
    """The plan line said when the run would end: resumed with a larger train.steps, the log still
    said the first command's length."""
    import signal

    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward, calls = DiffusionPolicy.forward, []

    def stop_at_step_3(self, batch, state_noise=0.0):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return forward(self, batch, state_noise)

    monkeypatch.setattr(DiffusionPolicy, "forward", stop_at_step_3)
    assert train_cli(data, run, "train.steps=4", "train.log_every=1") == 130  # saved at step 3, once it ends
    monkeypatch.setattr(DiffusionPolicy, "forward", forward)
    log = run / "train_log.jsonl"
    plan = json.loads(log.read_text().splitlines()[0])
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4", "train.log_every=1") == 0  # the same plan: nothing new to say
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == [f"resuming from {run / 'last'} at step 3", f"checkpoint: {run / 'last'}"]
    assert said[2].startswith(f"next: polcache eval --checkpoint {run / 'last'} (in simulation)")  # what takes it
    assert train_cli(data, run, "train.steps=6", "train.log_every=1") == 0
    new_plan = "6 steps at batch 8, 48 training windows"
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"resuming from {run / 'last'} at step 4", f"training {new_plan} (the run's plan was {plan['plan']})"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("step", r.get("plan")) for r in records if "loss" in r or "plan" in r] == \
        [plan["plan"], 1, 2, 3, 4, new_plan, 5, 6]
    assert records[-4] == {**plan, "steps": 6, "plan": new_plan}  # the first plan line's format


def test_a_batch_larger_than_the_data_is_planned_and_logged_as_the_batch_used(tmp_path, capsys):
    """The plan said "at batch 1000" while every step took all 233 windows there were."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.batch_size=100") == 0
    plan = ("2 steps at batch 48 (all training windows; train.batch_size=100 is more than there are), 48 training "
            "windows")
    assert f"training {plan}" in capsys.readouterr().out.splitlines()
    record = json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
    assert record["plan"] == plan and record["batch"] == 48
    assert train_cli(data, tmp_path / "b", "train.batch_size=8") == 0
    assert json.loads((tmp_path / "b" / "train_log.jsonl").read_text().splitlines()[0])["batch"] == 8


def test_a_validation_cut_short_by_ctrl_c_runs_when_the_run_resumes(tmp_path, capsys, monkeypatch):
    """OUT/last is saved before its validation: Ctrl-C during the final step's validation left a run
    with nothing left to train, and best/ never saw its final weights."""
    import signal

    import polcache.train.loop as loop

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    validate = loop.validate

    def pressed_during(*args):
        signal.raise_signal(signal.SIGINT)
        return validate(*args)

    monkeypatch.setattr(loop, "validate", pressed_during)
    assert train_cli(data, run) == 130
    monkeypatch.setattr(loop, "validate", validate)
    assert load_policy(run / "last")[2]["step"] == 2 and not (run / "best").exists()
    capsys.readouterr()
    assert train_cli(data, run) == 0
    assert capsys.readouterr().out.splitlines()[1] == "validating step 2, whose validation was interrupted"
    assert load_policy(run / "best")[2]["step"] == 2
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "checkpoint" in r] == [2]
    assert train_cli(data, run) == 0  # validated now: not again
    assert "validating" not in capsys.readouterr().out


def test_weights_that_are_no_longer_finite_are_never_saved(tmp_path, capsys, monkeypatch):
    import torch

    from polcache.policy.policy import DiffusionPolicy

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    forward = DiffusionPolicy.forward

    def poison_a_weight(self, batch, state_noise=0.0):  # after a finite loss, as an overflowing update would
        loss = forward(self, batch, state_noise)
        with torch.no_grad():
            self.denoiser.head.bias.fill_(float("inf"))  # (the backward pass does not read a bias)
        return loss

    monkeypatch.setattr(DiffusionPolicy, "forward", poison_a_weight)
    assert train_cli(data, run, "train.checkpoint_every=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polcache train: error: step 1: the weights hold NaN or infinite values (denoiser.head.")
    assert "so training stopped (nothing was saved); the learning rate train.lr=0.003 is the likely cause" in err
    assert not (run / "last").exists()


def test_the_train_log_writes_non_finite_numbers_as_null(tmp_path):
    from polcache.train.loop import _log

    _log(tmp_path / "log.jsonl", {"step": 1, "loss": float("nan"), "lr": float("inf")})
    assert json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=pytest.fail) == \
        {"step": 1, "loss": None, "lr": None}


@pytest.mark.parametrize("episodes, override, warning, best", [
    (1, "train.val_fraction=0.3", "no validation: the dataset has 1 episode, none left to hold out at "
     "train.val_fraction=0.3 (record more episodes); best/ is not written, so evaluate last/", None),
    (3, "train.val_fraction=0", "no validation: train.val_fraction=0 holds out no episode; best/ is not written, "
     "so evaluate last/", None),
    (3, "train.val_windows=0", "train.val_windows=0: validation samples no actions, so best/ keeps the lowest "
     "val_loss (the denoising loss), not the lowest val_action_mse", "val_loss"),
], ids=["one-episode", "no-val-fraction", "no-val-windows"])
def test_a_run_that_cannot_judge_best_by_sampled_actions_says_so(tmp_path, capsys, episodes, override, warning, best):
    """A 1-episode dataset trained without validation or best/, and nothing said so."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr", n=episodes)
    assert train_cli(data, run, override) == 0
    assert capsys.readouterr().err.splitlines() == [f"warning: {warning}"]
    if best:
        assert list(json.loads((run / "best" / "meta.json").read_text())["validation"]) == [best]
    else:
        assert not (run / "best").exists()


def test_a_run_shorter_than_its_warm_up_says_so(tmp_path, capsys):
    """80 steps against warmup_steps 300 ended at a fraction of train.lr, and nothing said so."""
    data = demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, tmp_path / "a", "train.warmup_steps=4", "train.lr=1e-3") == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: the run ends inside its learning-rate warm-up (train.warmup_steps=4, 2 steps): the rate reaches "
        "0.0005, not train.lr=0.001; lower train.warmup_steps or train longer"]
    assert train_cli(data, tmp_path / "b", "train.warmup_steps=1") == 0
    assert "warm-up" not in capsys.readouterr().err
    assert train_cli(data, tmp_path / "c", "train.warmup_steps=2") == 0  # its last step runs at train.lr itself
    assert "warm-up" not in capsys.readouterr().err



def test_a_run_resumed_with_another_batch_size_validates_as_before(tmp_path, monkeypatch):
    """validate() took max(val_windows, train.batch_size) windows and drew each batch's noise in
    turn: a run resumed with another train.batch_size (which resuming allows) judged best/ on other
    windows and other noise than its stored score's. The same step-2 weights, validated once in an
    uninterrupted run and once after a resume with another batch size, score the same."""
    import signal

    import polcache.train.loop as loop

    data = demo_dataset(tmp_path / "d.zarr", n=6)
    options = ["train.val_windows=7", "train.val_fraction=0.5", "train.batch_size=2"]
    assert train_cli(data, tmp_path / "whole", *options) == 0
    validate = loop.validate

    def pressed_during(*args):
        signal.raise_signal(signal.SIGINT)
        return validate(*args)

    monkeypatch.setattr(loop, "validate", pressed_during)
    assert train_cli(data, tmp_path / "resumed", *options) == 130
    monkeypatch.setattr(loop, "validate", validate)
    assert train_cli(data, tmp_path / "resumed", *options[:-1], "train.batch_size=5") == 0

    def scores(run):
        [record] = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "val_loss" in r]
        return record["val_loss"], record["val_action_mse"]

    assert scores(tmp_path / "resumed") == pytest.approx(scores(tmp_path / "whole"), rel=1e-6)


def test_a_seed_beyond_what_generators_take_is_refused_naming_its_range():
    """train.seed was checked for >= 0 only: 2^63 and up ended in torch's OverflowError traceback."""
    cfg = load_config("configs/recommended_cpu.yaml", [f"train.seed={2**63 - 1}"])
    assert cfg.train.seed == 2**63 - 1
    with pytest.raises(ConfigError, match=r"^train.seed must be an integer in \[0, 9223372036854775807\], got "
                                          r"9223372036854775808$"):
        load_config("configs/recommended_cpu.yaml", [f"train.seed={2**63}"])


def test_resuming_an_epoch_run_with_another_batch_size_is_refused(tmp_path, capsys):
    """Its saved step counts batches of the run's size: at twice the size, a run stopped halfway would
    read as done. A run measured in steps resumes at another batch size."""
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run, "train.epochs=1") == 0
    capsys.readouterr()
    assert train_cli(data, run, "train.epochs=2", "train.batch_size=16") == 2
    assert capsys.readouterr().err.strip() == (
        f"polcache train: error: cannot resume {run / 'last'}: train.batch_size is 16, the run's is 8 (a run "
        "measured in train.epochs counts its steps and learning-rate schedule in batches of the size it was saved "
        "at: resume with train.batch_size=8); pass --fresh to start over (the previous run is moved aside) or use "
        "another out directory")
    step = load_policy(run / "last")[2]["step"]
    assert train_cli(data, run, "train.epochs=2") == 0  # the run's batch size: it trains on
    assert load_policy(run / "last")[2]["step"] == 2 * step
    steps_run = tmp_path / "steps"
    assert train_cli(data, steps_run) == 0
    assert train_cli(data, steps_run, "train.steps=4", "train.batch_size=16") == 0
    assert load_policy(steps_run / "last")[2]["step"] == 4


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(tmp_path, monkeypatch, sig):
    """Resumed after Ctrl-C or SIGTERM, a run trained on other batches (each epoch's order drawn from
    the global random state) with other noise (the random state not saved), from a state saved
    mid-step: its weights differed from the uninterrupted run's. Now the step under way ends first,
    the random state is saved with it and the batch order follows from the step."""
    import signal

    from safetensors.numpy import load_file

    from polcache.policy.policy import DiffusionPolicy

    data = demo_dataset(tmp_path / "d.zarr")
    extra = ("train.steps=9", "train.checkpoint_every=4", "train.batch_size=4", "policy.p_drop_attn=0.1")
    assert train_cli(data, tmp_path / "whole", *extra) == 0
    forward, calls = DiffusionPolicy.forward, []

    def stop_in_step_6(self, batch, state_noise=0.0):  # mid-epoch (7 batches of 4 windows each), after a checkpoint
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(getattr(signal, sig))
        return forward(self, batch, state_noise)

    monkeypatch.setattr(DiffusionPolicy, "forward", stop_in_step_6)
    assert train_cli(data, tmp_path / "cut", *extra) != 0
    monkeypatch.setattr(DiffusionPolicy, "forward", forward)
    assert load_policy(tmp_path / "cut" / "last")[2]["step"] == 6
    assert train_cli(data, tmp_path / "cut", *extra) == 0
    for name in ("model.safetensors", "train/model.safetensors"):  # the EMA weights, the raw ones
        whole, cut = (load_file(str(tmp_path / run / "last" / name)) for run in ("whole", "cut"))
        assert whole.keys() == cut.keys()
        for key in whole:
            np.testing.assert_array_equal(whole[key], cut[key], err_msg=f"{name}: {key}")


def test_the_batches_from_any_step_are_those_an_uninterrupted_run_takes_there():
    from itertools import islice

    from polcache.train.batches import EpochBatches

    whole = list(islice(EpochBatches(23, 4, seed=3), 20))  # 5 batches an epoch, the last 3 windows sit out
    assert all(len(b) == 4 for b in whole) and len(set(sum(whole[:5], []))) == 20
    assert list(islice(EpochBatches(23, 4, seed=3, start=7), 13)) == whole[7:]
    assert whole[:5] != whole[5:10]  # each epoch its own order
    assert list(islice(EpochBatches(23, 4, seed=4), 5)) != whole[:5]  # each seed its own
    ranks = [list(islice(EpochBatches(23, 2, seed=3, rank=r, world=2), 5)) for r in (0, 1)]  # one epoch each
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # the processes share each epoch's windows
    assert [len(b) for b in islice(EpochBatches(3, 8, seed=0), 2)] == [3, 3]  # fewer than a batch: all of them


def test_a_horizon_too_short_for_the_chunk_is_named_with_the_setting_that_was_changed(tmp_path):
    """policy.horizon=3 read "policy.n_action_steps must be in 1..2, got 8", naming a value not changed."""
    with pytest.raises(ConfigError, match=r"policy.n_action_steps must be in 1\.\.2 \(policy.horizon 3 - "
                                          r"policy.n_obs_steps 2 \+ 1\), got 8"):
        load_config("configs/recommended_cpu.yaml", ["policy.horizon=3"])


def test_an_embedding_store_given_to_train_says_what_it_is_for(tmp_path):
    """dataset= an embedding store said only that obs_keys ['state'] are missing (it has ['embedding'])."""
    from polcache.data import Episode, EpisodeStore, write_dataset
    from polcache.train.loop import build_policy

    store = tmp_path / "emb.zarr"
    episode = Episode(obs={"embedding": np.zeros((5, 8), np.float32)}, action=np.zeros((5, 4), np.float32))
    write_dataset(store, [episode], {"embedding": {"encoder": "x"}})
    cfg = load_config("configs/recommended_cpu.yaml", [f"dataset={store}"])
    with pytest.raises(ConfigError, match="an embedding store from `polcache ptp embed`, which `polcache ptp finetune` "
                                          "trains on"):
        build_policy(cfg, EpisodeStore.open(store))
