"""`polcache calibrate` end to end on a tiny checkpoint, and the schedule used through load_backend."""

import json
import re
from pathlib import Path
from dataclasses import replace

import numpy as np
import torch
import pytest
from helpers import tiny_policy

from polcache.cache import CacheError, plan_summary
from polcache.cli import main
from polcache.config import ExperimentConfig
from polcache.data import Episode, EpisodeStore, write_dataset
from polcache.policy import load_backend, save_checkpoint
from polcache.train.loop import fit_normalizer


def demo_data(path, episodes=3, seed=0, state_dim=5, task=None):
    rng = np.random.default_rng(seed)
    write_dataset(path, [Episode(obs={"state": rng.normal(size=(20, state_dim)).astype(np.float32)},
                                 action=rng.uniform(-1, 1, (20, 3)).astype(np.float32)) for _ in range(episodes)],
                  {"task": task} if task else None)
    return path


def trained_on(dataset, out, n_layers=2, task=""):
    """A tiny checkpoint whose normaliser is the one training on `dataset` fits."""
    cfg = ExperimentConfig(task=task, dataset=str(dataset), policy=tiny_policy().cfg)
    policy = tiny_policy(n_layers=n_layers, width=32, normalizer=fit_normalizer(EpisodeStore.open(dataset), cfg, ""))
    return save_checkpoint(out, replace(cfg, policy=policy.cfg), policy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache_cli")
    return trained_on(demo_data(tmp / "demo.zarr"), tmp / "ckpt")


def test_calibrate_writes_schedule_and_heatmap(checkpoint, tmp_path, capsys):
    out = tmp_path / "sched.json"
    argv = ["calibrate", "--checkpoint", str(checkpoint), "--budget", "3", "--bu-blocks", "2", "--steps", "8",
            "--sampler", "ddim", "--samples", "6", "--out", str(out), "--no-progress", "--check", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layers.1.ffn" in printed and "compute limit" in printed
    # the worst action and the roughness, which the mean error hides, on observations it was not calibrated on
    assert re.search(r"checked on 3 held-out observations against uncached sampling \(same noise\): NMSE \S+, worst "
                     r"action off by \S+ \(normalised units\), chunks \d+\.\d\dx as jerky", printed), printed
    doc = json.loads(out.read_text())
    assert doc["method"] == "bac" and doc["sampler"] == {"kind": "ddim", "steps": 8} and doc["budget"] == 3
    assert doc["objective"] == "error-bound" and len(doc["calibration"]["sensitivity"]) == 6  # 6 blocks
    assert doc["calibration"]["samples"] == 6 and "demo.zarr" in doc["calibration"]["source"]
    assert out.with_suffix(".png").stat().st_size > 1000

    backend = load_backend(str(checkpoint), cache=str(out), sampler="ddim", steps=8)
    summary = plan_summary(backend.plan)
    assert summary["method"] == "bac" and summary["block_evals"] == doc["block_evaluations"]
    obs = {"state": np.zeros((2, 2, 5), np.float32)}
    assert backend.predict(obs, seed=0).shape == (2, 8, 3)

    with pytest.raises(CacheError, match="K=8"):
        load_backend(str(checkpoint), cache=str(out), sampler="ddim", steps=10)
    with pytest.raises(CacheError, match=rf"^cache 'bac:9:2@{out}': budget must be an integer number of update "
                                         r"steps in 1\.\.8, got 9$"):  # the spec named, not only its budget
        load_backend(str(checkpoint), cache=f"bac:9:2@{out}", sampler="ddim", steps=8)


def test_calibrate_without_matplotlib_writes_the_schedule_and_says_why_no_heatmap(checkpoint, tmp_path, capsys,
                                                                                   monkeypatch):
    """On an install without the report/sim extras, calibrate wrote the schedule and then ended in a
    ModuleNotFoundError traceback (status 1) drawing its heatmap."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    out = tmp_path / "sched.json"
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--budget", "3", "--steps", "8", "--sampler", "ddim",
                 "--samples", "4", "--out", str(out), "--no-progress"]) == 0
    assert "no heatmap: matplotlib is not installed; pip install -e '.[report]'" in capsys.readouterr().out
    assert json.loads(out.read_text())["budget"] == 3 and not out.with_suffix(".png").exists()


def test_a_command_needing_a_missing_extra_says_which_in_one_line(monkeypatch, capsys):
    """eval or record without MuJoCo, report without matplotlib: a traceback, status 1."""
    import polcache.cache.calibrate as calibrate

    def needs(module):
        def calibrate_checkpoint(*args, **kwargs):
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)
        return calibrate_checkpoint

    argv = ["calibrate", "--checkpoint", "x", "--budget", "3", "--out", "s.json"]
    monkeypatch.setattr(calibrate, "calibrate_checkpoint", needs("mujoco"))
    assert main(argv) == 2
    assert capsys.readouterr().err == ("polcache calibrate: error: this command needs mujoco, which is not installed: "
                                       "pip install -e '.[sim]'\n")
    monkeypatch.setattr(calibrate, "calibrate_checkpoint", needs("polcache.nonexistent"))
    with pytest.raises(ModuleNotFoundError):  # polcache's own module missing is a bug: shown as one
        main(argv)


def test_calibrate_errors_are_one_line(checkpoint, tmp_path, capsys):
    argv = ["calibrate", "--checkpoint", str(checkpoint), "--budget", "9", "--steps", "8", "--sampler", "ddim",
            "--out", str(tmp_path / "s.json"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--budget must be in 1..8" in err
    argv[argv.index("9")] = "3"
    assert main([*argv, "--samples", "100000000"]) == 2  # where no dataset is found: that many simulator resets
    assert "--samples (calibration observations) must be in 1..4096, got 100000000" in capsys.readouterr().err
    assert main([*argv, "--method", "unified", "--bu-blocks", "2"]) == 2  # was ignored without a word
    assert "--bu-blocks applies to --method bac (Bubbling Union) only, not unified" in capsys.readouterr().err
    assert main([*argv, "--samples", "4000"]) == 0  # the dataset's windows, and the schedule says so
    source = json.loads((tmp_path / "s.json").read_text())["calibration"]["source"]
    assert source.endswith("random windows (seed 0, all it has of the 4000 asked)"), source


def test_the_default_bubbling_union_fits_a_model_with_fewer_blocks(tmp_path, capsys):
    """`--bu-blocks` defaults to 5; a 1-layer model (3 blocks) refused the command's own default."""
    ckpt = trained_on(demo_data(tmp_path / "demo.zarr", episodes=1), tmp_path / "ckpt", n_layers=1)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--budget", "3", "--steps", "8", "--sampler", "ddim",
                 "--samples", "4", "--out", str(tmp_path / "s.json"), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "s.json").read_text())["bu_blocks"] == 3


def test_a_dataset_found_that_is_other_data_gives_way_to_environment_resets_said(tmp_path, monkeypatch, capsys):
    """A shipped checkpoint's relative dataset path found someone else's recording in a folder above
    it: calibrate refused, though --help promises environment resets where no training data is."""
    from polcache.cache.calibrate import calibration_observations

    monkeypatch.chdir(tmp_path)
    demo_data(tmp_path / "data" / "d.zarr", state_dim=8)  # a recording of the same shape, not its training data
    policy = tiny_policy(n_layers=1, width=32, obs_dim=8)
    obs, source = calibration_observations(policy, ExperimentConfig(task="cue-reach", dataset="data/d.zarr"), 3,
                                           checkpoint=tmp_path / "runs" / "x" / "last")
    assert source == "cue-reach environment resets: seeds 0..2" and obs["state"].shape == (3, 2, 8)
    assert capsys.readouterr().err.strip() == (
        "warning: data/d.zarr (the normaliser statistics of action, state differ): found from the checkpoint's "
        "dataset data/d.zarr, not the data it was trained on: calibrating on cue-reach environment resets (pass "
        "--dataset PATH for a dataset)")


def test_environment_resets_when_the_dataset_is_missing():
    from polcache.cache.calibrate import calibration_observations

    policy = tiny_policy(n_layers=1, width=32, obs_dim=8)
    obs, source = calibration_observations(policy, ExperimentConfig(task="cue-reach", dataset="nowhere.zarr"), 3)
    assert obs["state"].shape == (3, 2, 8) and "resets" in source
    assert np.array_equal(obs["state"][:, 0], obs["state"][:, 1])  # history = the reset observation repeated
    assert not np.array_equal(obs["state"][0], obs["state"][1])
    policy.spec = replace(policy.spec, task="")
    with pytest.raises(CacheError, match="names no task"):
        calibration_observations(policy, ExperimentConfig(), 3)


def test_a_relative_dataset_is_found_from_another_directory(tmp_path, monkeypatch):
    from polcache.data.training_set import dataset_candidates

    (tmp_path / "data" / "d.zarr").mkdir(parents=True)
    ckpt = tmp_path / "runs" / "x" / "last"
    ckpt.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert dataset_candidates("data/d.zarr", ckpt) == [tmp_path / "data" / "d.zarr"]
    assert dataset_candidates("data/d.zarr") == [] and dataset_candidates("data/missing.zarr", ckpt) == []
    assert dataset_candidates("", ckpt) == []
    (elsewhere / "data" / "d.zarr").mkdir(parents=True)  # nearest first: where training ran, then above the checkpoint
    assert dataset_candidates("data/d.zarr", ckpt) == [Path("data/d.zarr"), tmp_path / "data" / "d.zarr"]


def test_eval_with_cache_reports_plan_and_side_by_side_speedup(tmp_path, capsys):
    import json

    from polcache.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1", "--max-steps", "8",
                 "--cache", "uniform:4", "--json", str(out), "--no-progress"]) == 0
    extra = json.loads(out.read_text())["extra"]
    assert extra["cache"]["method"] == "uniform" and extra["cache"]["compute_limit"] == 4.0
    assert extra["speedup"]["uncached_ms"] > 0 and extra["speedup"]["cached_ms"] > 0
    assert (extra["device"], extra["sampler"], extra["steps"], extra["max_steps"]) == ("cpu", "ddim", 16, 8)
    said = capsys.readouterr().out  # the jerk the JSON holds is printed too, as sim-robot prints it
    assert extra["jerk"] is not None and f"{extra['jerk']:.4g} elsewhere (mean norm" in said
    # --cache none skips nothing: no side-by-side of the policy against itself
    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1", "--max-steps", "4",
                 "--cache", "none", "--json", str(out), "--no-progress"]) == 0
    assert "speedup" not in json.loads(out.read_text())["extra"] and "per chunk (" not in capsys.readouterr().out


def test_a_dataset_found_at_the_checkpoints_path_must_be_its_training_data(checkpoint, tmp_path, monkeypatch, capsys):
    """The training dataset is found by its relative path; another recording there (another project's,
    or recorded again) was calibrated on without a word, and one of other shapes ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    other = demo_data(tmp_path / "other.zarr", seed=1)
    demo_data(tmp_path / "data" / "demo.zarr")
    ckpt = trained_on("data/demo.zarr", tmp_path / "ckpt")
    argv = ["calibrate", "--checkpoint", str(ckpt), "--budget", "3", "--steps", "8", "--sampler", "ddim", "--samples",
            "4", "--out", str(tmp_path / "s.json"), "--no-progress"]
    source = lambda: json.loads((tmp_path / "s.json").read_text())["calibration"]["source"]  # noqa: E731
    assert main(argv) == 0
    assert source().startswith("dataset data/demo.zarr: 4 random windows")
    demo_data(tmp_path / "data" / "demo.zarr", seed=2)  # recorded again at the same path
    assert main(argv) == 2  # the checkpoint names no task: no environment resets either
    assert capsys.readouterr().err.strip() == (
        "polcache calibrate: error: no calibration observations: data/demo.zarr (the normaliser statistics of action, "
        "state differ): found from the checkpoint's dataset data/demo.zarr, not the data it was trained on, and the "
        "checkpoint names no task: pass --dataset PATH")
    assert main([*argv, "--dataset", str(other)]) == 0  # the user's choice
    assert source().startswith(f"dataset {other}: 4 random windows")
    assert "warning" not in capsys.readouterr().err  # neither names a task
    pushed = demo_data(tmp_path / "push.zarr", seed=3, task="push-v3")  # another task's: said, as eval says it
    reach = trained_on("data/demo.zarr", tmp_path / "reach", task="reach-v3")
    assert main([*[str(reach) if a == str(ckpt) else a for a in argv], "--dataset", str(pushed)]) == 0
    assert (f"warning: the checkpoint's policy was trained on reach-v3, --dataset {pushed} was recorded on push-v3"
            in capsys.readouterr().err)
    wide = demo_data(tmp_path / "wide.zarr", state_dim=7)
    assert main([*argv, "--dataset", str(wide)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"polcache calibrate: error: {wide}: observation 'state' is float32[7] per frame but the checkpoint takes "
        "float32[5]")
    assert main([*argv, "--dataset", str(tmp_path / "nope.zarr")]) == 2
    assert f"--dataset {tmp_path / 'nope.zarr'}: not found" in capsys.readouterr().err


def test_a_plan_is_checked_against_uncached_sampling_with_the_same_noise(checkpoint):
    """Uncached against itself deviates by nothing; a plan that reuses every block's first delta does,
    and a rough check suggests a larger budget."""
    from polcache.cache.check import plan_deviation
    from polcache.cache.cli import _checked_line
    from polcache.policy import load_policy
    from polcache.policy.executor import COMPUTE, REUSE

    policy, _, _ = load_policy(checkpoint)
    sampler = policy.sampler("ddim", 8)
    feats = [policy.encode({"state": torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(i))})
             for i in range(3)]
    same = plan_deviation(policy, feats, sampler, None)
    assert (same["nmse"], same["max_dev"], same["jerk_ratio"]) == (0.0, 0.0, 1.0)
    n = len(policy.cache_blocks)
    frozen = plan_deviation(policy, feats, sampler, [[COMPUTE] * n] + [[REUSE] * n] * 7)
    assert frozen["nmse"] > 0 and frozen["max_dev"] > 0 and frozen["evals"] == n
    assert "a larger --budget smooths them" in _checked_line({**frozen, "jerk_ratio": 1.48, "observations": 3})
    assert "--budget" not in _checked_line({**frozen, "jerk_ratio": 1.02, "observations": 3})


def test_held_out_windows_are_not_the_calibrations_and_the_check_is_refused_beyond_its_range(checkpoint, tmp_path,
                                                                                             capsys):
    """The check's windows were a second random draw, repeating calibration windows (on a 168-window
    dataset, "300 held-out observations" were the calibration's own); --check 5000 failed after the
    whole calibration, naming --samples."""
    from polcache.cache.calibrate import calibration_observations
    from polcache.policy import load_policy

    policy, cfg, _ = load_policy(checkpoint)
    every, _ = calibration_observations(policy, cfg, 4096, 0, checkpoint)
    total = len(every["state"])
    calib, _ = calibration_observations(policy, cfg, total - 3, 7, checkpoint)
    held, _ = calibration_observations(policy, cfg, 50, 10_007, checkpoint, held_out_of=(total - 3, 7))
    assert len(held["state"]) == 3  # all that is left, none of the calibration's
    assert not any(torch.equal(h, c) for h in held["state"] for c in calib["state"])
    none_left, _ = calibration_observations(policy, cfg, 50, 10_000, checkpoint, held_out_of=(total, 0))
    assert len(none_left["state"]) == 0
    with pytest.raises(SystemExit):
        main(["calibrate", "--checkpoint", str(checkpoint), "--budget", "3", "--steps", "8", "--sampler", "ddim",
              "--check", "5000", "--out", str(tmp_path / "s.json"), "--no-progress"])
    assert "--check: expected 0..4096 held-out observations, got 5000" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_chunks_too_short_for_a_jerk_are_said_so_not_nan(checkpoint):
    from polcache.cache.check import chunk_jerk
    from polcache.cache.cli import _checked_line

    assert np.isnan(chunk_jerk(torch.zeros(1, 3, 2))) and chunk_jerk(torch.zeros(1, 5, 2)) == 0.0
    line = _checked_line({"observations": 4, "nmse": 0.01, "max_dev": 0.19, "jerk_ratio": None})
    assert line.endswith("chunks too short to measure their jerk") and "nan" not in line
    assert _checked_line({"observations": 0}).startswith("not checked: the calibration used every window")
