"""The policy's training control rate (its dataset's fps): carried by the spec and the checkpoint,
held against the rate eval's task steps at (refused) and a robot's handshake (warned)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest

from fakes import STATE_DIM, FakeBackend, StepRobot, fake_spec, wait_for
from helpers import tiny_policy
from polcache.cli import main
from polcache.config import ExperimentConfig
from polcache.errors import CheckpointError, DatasetError, PolcacheError
from polcache.policy import load_policy, save_checkpoint
from polcache.policy.spec import PolicySpec
from polcache.serve.server import PolicyServer
from polcache.sim.evaluate import check_rate
from polcache_client import PolicyClient
from test_train_recipe import train_cli

SHIPPED = "polcache/assets/checkpoints/cue-reach-ptp"  # cue-reach steps at 20 Hz; saved before control_hz


def test_the_spec_carries_the_rate_and_reads_dicts_without_it():
    spec = replace(fake_spec(), control_hz=30.0)
    assert spec.to_dict()["control_hz"] == 30.0
    assert PolicySpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "control_hz"}  # a checkpoint or server from before it
    assert PolicySpec.from_dict(old).control_hz is None
    assert PolicySpec.from_dict({**spec.to_dict(), "a_later_key": [1]}) == spec  # keys of later releases ignored
    for bad in ("30", True, 0, -5.0, float("nan")):
        with pytest.raises(ValueError, match=r"control_hz: expected a positive number of Hz .* got "):
            PolicySpec.from_dict({**spec.to_dict(), "control_hz": bad})


def _checkpoint(tmp_path, control_hz):
    policy = tiny_policy(n_layers=1, width=32)
    policy.spec = replace(policy.spec, control_hz=control_hz)
    return save_checkpoint(tmp_path / "ck", ExperimentConfig(task="", dataset="d.zarr", policy=policy.cfg), policy)


def test_a_checkpoint_keeps_the_rate_and_one_saved_before_it_loads_without(tmp_path):
    ck = _checkpoint(tmp_path, 12.5)
    assert json.loads((ck / "meta.json").read_text())["control_hz"] == 12.5
    assert load_policy(ck)[0].spec.control_hz == 12.5
    meta = json.loads((ck / "meta.json").read_text())
    del meta["control_hz"]
    (ck / "meta.json").write_text(json.dumps(meta))
    assert load_policy(ck)[0].spec.control_hz is None
    (ck / "meta.json").write_text(json.dumps({**meta, "control_hz": "fast"}))
    with pytest.raises(CheckpointError, match=r"meta.json: malformed \(ValueError: control_hz: expected a positive"):
        load_policy(ck)
    assert load_policy(_checkpoint(tmp_path / "unknown", None))[0].spec.control_hz is None


def _dataset(path, **attrs):
    from polcache.data import Episode, write_dataset

    t = np.linspace(0, 1, 24, dtype=np.float32)[:, None]
    episodes = [Episode(obs={"state": np.hstack([t, t * i, -t])}, action=np.hstack([t, -t]) * (i + 1), task="demo")
                for i in range(3)]
    write_dataset(path, episodes, {"task": "demo", **attrs})
    return path


def test_training_takes_the_rate_from_the_datasets_fps_and_says_it(tmp_path, capsys):
    assert train_cli(_dataset(tmp_path / "d.zarr", fps=30), tmp_path / "run") == 0
    assert "dataset rate: 30 fps, so the policy acts at 30 Hz" in capsys.readouterr().out
    assert load_policy(tmp_path / "run" / "last")[0].spec.control_hz == 30.0
    assert train_cli(_dataset(tmp_path / "none.zarr"), tmp_path / "none") == 0
    assert "dataset rate" not in capsys.readouterr().out
    assert load_policy(tmp_path / "none" / "last")[0].spec.control_hz is None


def test_a_dataset_with_a_bad_fps_is_named(tmp_path):
    from polcache.config import load_config
    from polcache.data import EpisodeStore
    from polcache.train.loop import build_policy

    path = _dataset(tmp_path / "d.zarr", fps="thirty")
    cfg = load_config("configs/recommended_cpu.yaml", [f"dataset={path}"])
    with pytest.raises(DatasetError, match=f"dataset {path}: attrs fps: expected a positive number of Hz"):
        build_policy(cfg, EpisodeStore.open(path))


def test_a_rate_within_one_percent_is_the_same_rate():
    assert check_rate(20.0, 20.15, "t") is None and check_rate(fake_spec().control_hz, 80.0, "t") is None
    with pytest.raises(PolcacheError, match="trained at 20 Hz .* but t steps at 20.3 Hz"):
        check_rate(20.0, 20.3, "t")


def _shipped_at(tmp_path, control_hz):
    ck = tmp_path / "ck"
    shutil.copytree(SHIPPED, ck)
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps({**meta, "control_hz": control_hz}))
    return ck


def test_eval_refuses_a_task_at_another_rate_unless_told(tmp_path, capsys):
    ck = _shipped_at(tmp_path, 30.0)
    argv = ["eval", "--checkpoint", str(ck), "--episodes", "1", "--max-steps", "4", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "polcache eval: error: the policy was trained at 30 Hz (its dataset's fps) but cue-reach steps at 20 Hz: its "
        "actions are per control step, so a success rate measured here is not the policy's; pass "
        "--allow-rate-mismatch to evaluate anyway")
    out = tmp_path / "e.json"
    assert main([*argv, "--allow-rate-mismatch", "--json", str(out)]) == 0
    assert "warning: the policy was trained at 30 Hz" in capsys.readouterr().err
    assert json.loads(out.read_text())["extra"]["rate_mismatch"] == {"policy_hz": 30.0, "task_hz": 20.0}
    assert main(["eval", "--checkpoint", str(_shipped_at(tmp_path / "same", 20.0)), "--episodes", "1",
                 "--max-steps", "4", "--no-progress"]) == 0
    capsys.readouterr()
    # a task of other shapes is refused for them first: --allow-rate-mismatch would not have run it
    assert main([*argv, "--task", "reach-v3"]) == 2
    assert "polcache eval: error: observation 'state': checkpoint expects shape" in capsys.readouterr().err


def test_a_robot_at_another_rate_is_warned_once_and_served(caplog):
    backend = FakeBackend(replace(fake_spec(), control_hz=30.0))
    robot = StepRobot(50)
    with caplog.at_level(logging.WARNING, logger="polcache.serve"), \
            PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        for name, hz in (("fast arm", 50), ("true arm", 30.2)):
            with PolicyClient(server.endpoint, robot.obs_spec, robot.action_dim, hz=hz, name=name,
                              version=1) as client:  # the oldest protocol reads the welcome with the new key
                assert client.connect(timeout_s=5)["control_hz"] == 30.0
                assert client.send_observation({"state": np.zeros(STATE_DIM, np.float32)}, 0.0)
                assert wait_for(lambda: client.poll())  # served all the same
    said = [r.getMessage() for r in caplog.records if "Hz but the policy was trained at" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(
        r"robot fast arm \(session [0-9a-f]+\) ticks at 50 Hz but the policy was trained at 30 Hz: its actions are "
        r"per control step at 30 Hz, so this robot plays them at 1\.7x the trained speed \(served all the same\)",
        said[0]), said
