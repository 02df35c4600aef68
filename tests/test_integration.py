"""Record -> train -> save -> reload -> evaluate, through the same functions the CLI calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polcache.cli import main
from polcache.policy import load_backend, load_policy

pytestmark = pytest.mark.slow

TINY = ["policy.n_layers=2", "policy.width=32", "policy.state_hidden=32", "policy.sampler.inference_steps=4",
        "train.batch_size=16", "train.warmup_steps=5", "train.log_every=10", "train.threads=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "reach.zarr"
    assert main(["record", "--task", "reach-v3", "--episodes", "2", "--out", str(out), "--seed", "3"]) == 0
    return out


def _train(dataset: Path, out: Path, steps: int, extra=()) -> int:
    return main(["train", "--config", "configs/metaworld_small.yaml", f"dataset={dataset}", f"out={out}",
                 f"train.steps={steps}", "train.checkpoint_every=20", *TINY, *extra, "--no-progress"])


def test_record_train_reload_eval(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, 40) == 0
    ckpt = run / "last"
    policy, cfg, meta = load_policy(ckpt)
    assert meta["step"] == 40 and cfg.policy.width == 32 and meta["task"] == "reach-v3"
    losses = [json.loads(l)["loss"] for l in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--episodes", "2", "--seed", "5", "--json", str(out_json),
                 "--no-progress"]) == 0
    result = json.loads(out_json.read_text())
    assert result["episodes"] == 2 and result["task"] == "reach-v3"
    assert {e["seed"] for e in result["per_episode"]} == {5, 6}
    assert result["latency_ms"]["n"] > 0 and result["latency_ms"]["p50"] > 0
    assert "success" in capsys.readouterr().out


def test_resume_continues_from_last_checkpoint(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, 20) == 0
    assert _train(dataset, run, 40) == 0
    assert "resuming from" in capsys.readouterr().out
    _, _, meta = load_policy(run / "last")
    assert meta["step"] == 40


def test_a_damaged_run_is_named_in_one_line_not_resumed_or_served(dataset, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    assert _train(dataset, run, 20) == 0
    capsys.readouterr()
    state = run / "last" / "train" / "state.pt"
    intact = state.read_bytes()
    state.write_bytes(intact[:200])  # killed mid-write by something outside polcache
    assert _train(dataset, run, 40) == 2
    err = capsys.readouterr().err.strip()
    assert "train/state.pt: its content does not match the sha256 in meta.json" in err
    assert err.endswith("pass --fresh to start over")
    nan = tmp_path / "nan"
    shutil.copytree(run / "last", nan)
    weights = load_file(str(nan / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] * float("nan")
    save_file(weights, str(nan / "model.safetensors"))
    assert main(["eval", "--checkpoint", str(nan), "--episodes", "1", "--no-progress"]) == 2
    assert "model.safetensors: its content does not match the sha256 in meta.json" in capsys.readouterr().err
    meta = json.loads((nan / "meta.json").read_text())
    del meta["sha256"]  # as a checkpoint saved before the digests: its NaN weights are still caught
    (nan / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "--checkpoint", str(nan), "--episodes", "1", "--no-progress"]) == 2
    assert f"model.safetensors: NaN or infinite values in {name}" in capsys.readouterr().err
    # a run saved before digests: torch's error, without its advice to load the damaged pickle unsafely
    meta = json.loads((run / "last" / "meta.json").read_text())
    del meta["sha256"]
    (run / "last" / "meta.json").write_text(json.dumps(meta))
    state.write_bytes(intact[:2000] + bytes(64) + intact[2064:])
    assert _train(dataset, run, 40) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read the training state to resume from" in err and err.endswith("pass --fresh to start over")
    assert "weights_only" not in err, err


def test_backend_predicts_unnormalised_chunks(dataset, tmp_path):
    run = tmp_path / "run"
    assert _train(dataset, run, 20) == 0
    backend = load_backend(str(run / "last"), sampler="ddpm", steps=5)
    import numpy as np

    acts = backend.predict({"state": np.zeros((3, 2, 39), np.float32)}, seed=0)
    assert acts.shape == (3, 8, 4) and acts.dtype == np.float32 and np.isfinite(acts).all()


def test_ddp_two_cpu_processes_on_gloo(dataset, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "polcache.cli", "train", "--config", "configs/metaworld_small.yaml", f"dataset={dataset}",
           f"out={run}", "train.steps=10", "train.checkpoint_every=10", *TINY, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, _, meta = load_policy(run / "last")
    assert meta["step"] == 10


def test_image_policy_trains_and_evaluates_on_cue_reach(tmp_path):
    data = tmp_path / "cue.zarr"
    assert main(["record", "--task", "cue-reach", "--episodes", "2", "--out", str(data), "--image",
                 "--image-size", "32"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/metaworld_small.yaml", "task=cue-reach", f"dataset={data}",
                 f"out={run}", "obs_keys=[state, image_top]", "train.steps=4", "train.checkpoint_every=4",
                 *TINY, "--no-progress"]) == 0
    backend = load_backend(str(run / "last"))
    assert backend.spec.obs["image_top"].shape == (32, 32, 3)
    assert main(["eval", "--checkpoint", str(run / "last"), "--episodes", "1", "--no-progress"]) == 0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # SIGTERM: a process manager stopping the run
def test_interrupted_training_saves_and_resumes(dataset, tmp_path, sig):
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "polcache.cli", "train", "--config", "configs/metaworld_small.yaml",
           f"dataset={dataset}", f"out={run}", "train.steps=100000", "train.checkpoint_every=100000", *TINY,
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"loss"' in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err[-1000:]
    assert "interrupted: saved" in out
    _, _, meta = load_policy(run / "last")
    assert meta["step"] >= 10
    assert _train(dataset, run, meta["step"] + 10) == 0
    _, _, meta2 = load_policy(run / "last")
    assert meta2["step"] == meta["step"] + 10
