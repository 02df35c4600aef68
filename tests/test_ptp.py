"""Multistage PTP training: embed every frame once with a frozen encoder, fine-tune a long-context
head on the stored embeddings, get an ordinary checkpoint; stores from other encoders refused."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_cli_errors import _err

from polcache.cli import main
from polcache.data import Episode, SequenceDataset, open_dataset, write_dataset
from polcache.policy import load_policy
from polcache.ptp.embeddings import encoder_hash


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A tiny short-context policy trained for a few steps on a toy dataset."""
    root = tmp_path_factory.mktemp("ptp")
    rng = np.random.default_rng(0)
    eps = [Episode(obs={"state": rng.normal(size=(30, 5)).astype(np.float32)},
                   action=rng.normal(size=(30, 2)).astype(np.float32), task="toy") for _ in range(4)]
    write_dataset(root / "toy.zarr", eps, {"fps": 10})
    args = ["train", "--config", "configs/recommended_cpu.yaml", f"dataset={root / 'toy.zarr'}", f"out={root / 'short'}",
            "policy.n_layers=1", "policy.width=32", "policy.state_hidden=32", "policy.sampler.inference_steps=2",
            "train.batch_size=8", "train.warmup_steps=1", "train.ema_warmup=0", "train.epochs=1", "train.val_windows=4",
            "--no-progress"]
    assert main(args) == 0
    return root


def test_embed_then_finetune_gives_an_ordinary_long_context_checkpoint(short_run, capsys, monkeypatch):
    root = short_run
    repo = Path.cwd()
    monkeypatch.chdir(root)  # relative paths, as typed in a shell: the store records them absolute
    assert main(["ptp", "embed", "--checkpoint", "short/last", "--out", "emb.zarr", "--no-progress"]) == 0
    monkeypatch.chdir(repo)  # fine-tuning from another directory still finds the checkpoint and its dataset
    base, _, _ = load_policy(root / "short" / "last")
    store = open_dataset(root / "emb.zarr")
    assert store.attrs["embedding"]["encoder_hash"] == encoder_hash(base)
    # the stored embedding of every frame is what the encoder makes of that frame
    raw = open_dataset(root / "toy.zarr").array("state")
    with torch.no_grad():
        want = base.encode({"state": torch.as_tensor(np.array(raw))[:, None]})[:, 0].numpy()
    np.testing.assert_allclose(store.array("embedding"), want, atol=1e-6)

    args = ["ptp", "finetune", "--embeddings", str(root / "emb.zarr"), "--config", "configs/ptp_cue_reach.yaml",
            "task=toy", f"out={root / 'long'}", "policy.n_obs_steps=4", "policy.obs_stride=2", "policy.horizon=8",
            "policy.n_action_steps=4", "policy.n_layers=1", "policy.width=32", "policy.sampler.inference_steps=2",
            "train.batch_size=8", "train.warmup_steps=1", "train.ema_warmup=0", "train.epochs=1", "train.val_windows=4",
            "--no-progress"]
    assert main(args) == 0
    # the config file's encoder setting gives way to the store's encoder's, said, and config.yaml records it
    assert "note: the embeddings' encoder fixes policy.state_hidden 128 -> 32" in capsys.readouterr().out
    long, cfg, meta = load_policy(root / "long" / "last")
    assert cfg.policy.state_hidden == 32
    # what made its inputs: the store, and the checkpoint whose encoder it froze (which may train on since)
    assert meta["embeddings"] == {"store": str(root / "emb.zarr"), "encoder_checkpoint": str(root / "short" / "last"),
                                  "encoder_hash": encoder_hash(base)}
    assert long.spec.obs_stride == 2 and long.spec.n_obs_steps == 4 and cfg.dataset == str(root / "toy.zarr")
    assert long.spec.control_hz == base.spec.control_hz == 10.0  # the source's fps, copied into the store
    assert encoder_hash(long) == encoder_hash(base)  # the encoder was frozen
    # raw observations through the checkpoint = stored embeddings through the head
    ds_raw = SequenceDataset(open_dataset(root / "toy.zarr"), 8, 4, ["state"], obs_stride=2)
    ds_emb = SequenceDataset(store, 8, 4, ["embedding"], obs_stride=2)
    with torch.no_grad():
        a = long.encode({"state": ds_raw[17]["obs"]["state"][None]})
        b = long.encode({"embedding": ds_emb[17]["obs"]["embedding"][None]})
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # calibration reads the source dataset, recognised as the training data (the head's normaliser
    # also holds the embeddings' statistics, which raw data has not: that refused it)
    from polcache.cache.calibrate import calibration_observations

    _, source = calibration_observations(long, cfg, 4, checkpoint=root / "long" / "last")
    assert source.startswith(f"dataset {root / 'toy.zarr'}: 4 random windows")


def test_a_store_from_another_encoder_or_obs_keys_is_refused(short_run, capsys):
    root = short_run
    assert main(["ptp", "embed", "--checkpoint", str(root / "short" / "last"), "--out", str(root / "emb2.zarr"),
                 "--no-progress"]) == 0
    # a fine-tuned run of this test's own (not the other test's), on the store of the encoder as it was
    assert main(["ptp", "finetune", "--embeddings", str(root / "emb2.zarr"), "--config", "configs/ptp_cue_reach.yaml",
                 "task=toy", f"out={root / 'long2'}", "policy.n_obs_steps=4", "policy.obs_stride=2",
                 "policy.horizon=8", "policy.n_action_steps=4", "policy.n_layers=1", "policy.width=32",
                 "policy.sampler.inference_steps=2", "train.batch_size=8", "train.warmup_steps=1",
                 "train.ema_warmup=0", "train.epochs=1", "train.val_windows=4", "--no-progress"]) == 0
    # retrain the short policy in place: its encoder changes, the store does not
    assert main(["train", "--config", "configs/recommended_cpu.yaml", f"dataset={root / 'toy.zarr'}",
                 f"out={root / 'short'}", "policy.n_layers=1", "policy.width=32", "policy.state_hidden=32",
                 "policy.sampler.inference_steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.epochs=2",
                 "train.val_windows=4", "--no-progress"]) == 0
    base = ["ptp", "finetune", "--embeddings", str(root / "emb2.zarr"), "--config", "configs/ptp_cue_reach.yaml",
            "task=toy", f"out={root / 'x'}", "policy.n_obs_steps=4", "policy.horizon=8", "policy.n_action_steps=4"]
    assert "embedded by another encoder" in _err(capsys, base)
    # a store of the retrained encoder is a valid one, but not the data the first fine-tune ran on
    assert main(["ptp", "embed", "--checkpoint", str(root / "short" / "last"), "--out", str(root / "emb3.zarr"),
                 "--no-progress"]) == 0
    resume = [*base[:3], str(root / "emb3.zarr"), *base[4:6], f"out={root / 'long2'}", "policy.n_obs_steps=4",
              "policy.obs_stride=2", "policy.horizon=8", "policy.n_action_steps=4", "policy.n_layers=1",
              "policy.width=32", "policy.sampler.inference_steps=2", "train.batch_size=8", "train.epochs=2"]
    assert "the embeddings are not the run's (another embedding store, or another encoder)" in _err(capsys, resume)
    # `train` (raw observations, end to end) into the fine-tuned run's folder: the other command's run
    retrain = ["train", "--config", "configs/ptp_cue_reach.yaml", f"dataset={root / 'toy.zarr'}", *resume[6:],
               "task=toy", "--no-progress"]
    assert ("the run's head was fine-tuned on stored embeddings: resume it with `polcache ptp finetune --embeddings "
            "STORE`") in _err(capsys, retrain)
    # into the folder of the checkpoint whose encoder made the store: it moved that checkpoint aside
    assert (f"out={root / 'short'} holds {root / 'short' / 'last'}, the checkpoint whose encoder made "
            f"{root / 'emb3.zarr'}: fine-tuning there would replace it") in _err(capsys,
                                                                              [*resume[:6], f"out={root / 'short'}"])
    shutil.copytree(root / "short", root / "short-copy")
    assert "the run was trained end to end by `polcache train`" in _err(capsys, [*resume[:6],
                                                                              f"out={root / 'short-copy'}"])
    for override in ("train.state_norm=gaussian", "policy.image.channels=8", "policy.state_hidden=64"):
        # replaced by the encoder's in silence, while config.yaml recorded them
        assert (f"{override.partition('=')[0].rsplit('.channels')[0]}: ptp finetune takes it from the checkpoint "
                f"that made the embeddings" in _err(capsys, [*resume, override]))
    # a store embedded before paths were recorded absolute: its relative checkpoint path, read from elsewhere
    group = zarr.open_group(str(root / "emb3.zarr"), mode="r+")
    group.attrs["embedding"] = {**group.attrs["embedding"], "checkpoint": "short/last"}
    assert ("was embedded from checkpoint short/last, which is not there (a relative path is read from the directory "
            "`ptp embed` ran in)") in _err(capsys, resume)
    assert "not an embedding store" in _err(capsys, ["ptp", "finetune", "--embeddings", str(root / "toy.zarr"),
                                                     "--config", "configs/ptp_cue_reach.yaml"])


def test_image_policy_embeds_and_finetunes_to_the_same_actions_as_raw_frames(tmp_path):
    """With a camera: the stored embedding of a frame is the frozen image encoder's output at
    inference (centre crop, no random crop), so the fine-tuned checkpoint given raw images encodes
    exactly what the head was trained on."""
    rng = np.random.default_rng(1)
    eps = [Episode(obs={"state": rng.normal(size=(24, 3)).astype(np.float32),
                        "image_top": rng.integers(0, 255, size=(24, 16, 16, 3), dtype=np.uint8)},
                   action=rng.normal(size=(24, 2)).astype(np.float32), task="toy") for _ in range(3)]
    write_dataset(tmp_path / "img.zarr", eps)
    tiny = ["policy.n_layers=1", "policy.width=32", "policy.state_hidden=16", "policy.image.keypoints=4",
            "policy.image.feature_dim=8", "policy.sampler.inference_steps=2", "train.batch_size=8",
            "train.warmup_steps=1", "train.epochs=1", "train.val_windows=4", "--no-progress"]
    assert main(["train", "--config", "configs/recommended_cpu.yaml", f"dataset={tmp_path / 'img.zarr'}",
                 f"out={tmp_path / 'short'}", "obs_keys=[state,image_top]", *tiny]) == 0
    assert main(["ptp", "embed", "--checkpoint", str(tmp_path / "short" / "last"), "--out", str(tmp_path / "emb.zarr"),
                 "--no-progress"]) == 0
    assert main(["ptp", "finetune", "--embeddings", str(tmp_path / "emb.zarr"),
                 "--config", "configs/ptp_cue_reach_image.yaml", "task=toy", f"out={tmp_path / 'long'}",
                 "policy.n_obs_steps=4", "policy.obs_stride=2", "policy.horizon=8", "policy.n_action_steps=4", *tiny]) == 0
    long, _, _ = load_policy(tmp_path / "long" / "last")
    ds_raw = SequenceDataset(open_dataset(tmp_path / "img.zarr"), 8, 4, ["state", "image_top"], obs_stride=2)
    ds_emb = SequenceDataset(open_dataset(tmp_path / "emb.zarr"), 8, 4, ["embedding"], obs_stride=2)
    for i in (0, 11, 30):  # an episode's padded start, its middle, another episode
        raw = {k: v[None] for k, v in ds_raw[i]["obs"].items()}
        with torch.no_grad():
            a = long.encode(raw)
            b = long.encode({"embedding": ds_emb[i]["obs"]["embedding"][None]})
        # standardised features: batch-of-256 vs per-window rounding, scaled by 1/std, stays ~1e-5
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert "embedding" in long.normalizer.keys  # the head reads the stored embeddings standardised
    feats = long.encode({"embedding": torch.as_tensor(np.array(open_dataset(tmp_path / "emb.zarr").array("embedding")))[None]})
    torch.testing.assert_close(feats.mean(1)[0], torch.zeros(feats.shape[-1]), atol=1e-3, rtol=0)


def test_embed_finds_the_training_data_as_calibrate_does_and_only_that_data(tmp_path, monkeypatch, capsys):
    """A run trained on `data/toy.zarr` (relative, as typed in the project folder), embedded from
    another folder: the dataset is found above the checkpoint, as calibrate finds it; another
    recording at that path is not the frames the policy learnt from, and is refused."""
    project = tmp_path / "project"
    rng = np.random.default_rng(1)

    def record(seed_shift: float) -> None:
        eps = [Episode(obs={"state": (rng.normal(size=(30, 5)) + seed_shift).astype(np.float32)},
                       action=rng.normal(size=(30, 2)).astype(np.float32), task="toy") for _ in range(3)]
        write_dataset(project / "data" / "toy.zarr", eps, {"fps": 10})

    record(0.0)
    repo = Path.cwd()
    monkeypatch.chdir(project)
    assert main(["train", "--config", str(repo / "configs/recommended_cpu.yaml"), "dataset=data/toy.zarr",
                 "out=runs/short", "policy.n_layers=1", "policy.width=32", "policy.state_hidden=32",
                 "policy.sampler.inference_steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.steps=2",
                 "train.val_windows=4", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["ptp", "embed", "--checkpoint", "project/runs/short/last", "--out", "emb.zarr", "--no-progress"]) == 0
    assert open_dataset(tmp_path / "emb.zarr").attrs["embedding"]["source"] == str(project / "data" / "toy.zarr")
    record(3.0)  # recorded again at the same path: other frames
    assert (f"trained on data/toy.zarr; found from that path, not that data: {project / 'data' / 'toy.zarr'} (the "
            f"normaliser statistics of action, state differ): pass --dataset PATH") in _err(
        capsys, ["ptp", "embed", "--checkpoint", "project/runs/short/last", "--out", "emb2.zarr", "--no-progress"])
