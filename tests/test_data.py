import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from polcache.data import Episode, EpisodeStore, Normalizer, SequenceDataset, episode_split, write_dataset
from polcache.data import store as store_mod
from polcache.errors import DatasetError
from polcache.policy.spec import ArraySpec


def make_episode(T: int, base: float, task: str = "push", image: bool = True) -> Episode:
    """state[t] = base + t in both dims, action[t] = [base + t, -(base + t)]: values identify steps."""
    t = base + np.arange(T, dtype=np.float32)
    obs = {"state": np.stack([t, t + 0.5], axis=1)}
    if image:
        obs["image_front"] = (np.arange(T, dtype=np.uint8)[:, None, None, None] + np.zeros((T, 4, 5, 3), np.uint8) + int(base))
    return Episode(obs=obs, action=np.stack([t, -t], axis=1), task=task)


@pytest.fixture
def episodes():
    return [make_episode(5, 0.0, "a"), make_episode(3, 100.0, "b"), make_episode(70, 200.0, "c")]


@pytest.fixture
def ds_path(tmp_path, episodes):
    path = tmp_path / "demo.zarr"
    write_dataset(path, episodes, attrs={"source": "test"})
    return path


# ---- store ------------------------------------------------------------------


def test_round_trip(ds_path, episodes):
    s = EpisodeStore.open(ds_path)
    assert s.num_episodes == 3 and s.num_steps == 78
    assert s.episode_ends.tolist() == [5, 8, 78] and s.episode_ends.dtype == np.int64
    assert s.obs_keys == ["image_front", "state"]
    assert s.action_dim == 2 and s.tasks == ["a", "b", "c"] and s.attrs == {"source": "test"}
    assert s.obs_spec() == {"state": ArraySpec((2,), "float32"), "image_front": ArraySpec((4, 5, 3), "uint8")}
    for i, ep in enumerate(episodes):
        got = s.episode(i)
        assert got.task == ep.task
        np.testing.assert_array_equal(got.action, ep.action)
        for k in ep.obs:
            np.testing.assert_array_equal(got.obs[k], ep.obs[k])
            assert got.obs[k].dtype == ep.obs[k].dtype
    np.testing.assert_array_equal(s.array("action"), np.concatenate([e.action for e in episodes]))
    assert s.array("image_front").shape == (78, 4, 5, 3)
    np.testing.assert_array_equal(s.episode(-1).action, episodes[-1].action)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda eps: eps.clear(), "no episodes"),
        (lambda eps: eps[1].obs.pop("image_front"), "episode 1: obs keys"),
        (lambda eps: eps[2].obs.__setitem__("state", np.zeros((70, 3), np.float32)), r"episode 2: obs\['state'\] step shape"),
        (lambda eps: eps[1].obs.__setitem__("state", np.zeros((4, 2), np.float32)), r"episode 1: obs\['state'\] has 4 steps"),
        (lambda eps: eps[2].action.__setitem__((3, 1), np.nan), "episode 2: action contains NaN"),
        (lambda eps: eps[0].obs.__setitem__("image_front", np.zeros((5, 4, 5, 3), np.float32)), r"episode 0: obs\['image_front'\] must be uint8"),
    ],
)
def test_write_rejects_bad_episodes(tmp_path, episodes, mutate, match):
    mutate(episodes)
    with pytest.raises(DatasetError, match=match):
        write_dataset(tmp_path / "x.zarr", episodes)
    assert list(tmp_path.iterdir()) == []


def test_atomic_replace_keeps_old_dataset_on_failure(ds_path, episodes, monkeypatch):
    bad = [make_episode(4, 0.0), make_episode(4, 0.0)]
    bad[1].action[0, 0] = np.inf
    with pytest.raises(DatasetError, match="episode 1: action"):
        write_dataset(ds_path, bad)

    # A failure in the middle of writing arrays (disk full, crash...) must not touch the old one.
    calls = {"n": 0}
    real_put = store_mod._put

    def failing_put(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_put(*a, **kw)

    monkeypatch.setattr(store_mod, "_put", failing_put)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(ds_path, [make_episode(4, 0.0)])
    monkeypatch.undo()

    assert sorted(p.name for p in ds_path.parent.iterdir()) == ["demo.zarr"]  # no temp dirs left
    s = EpisodeStore.open(ds_path)
    assert s.num_steps == 78 and s.tasks == ["a", "b", "c"]

    write_dataset(ds_path, [make_episode(4, 0.0, "new")])  # a good write replaces it
    assert EpisodeStore.open(ds_path).tasks == ["new"]
    assert sorted(p.name for p in ds_path.parent.iterdir()) == ["demo.zarr"]


def test_writer_appends_episodes_as_write_dataset_writes_them(tmp_path, episodes):
    """dataset_writer takes one episode at a time (memory: an episode, not the dataset) and writes the
    same dataset, chunks included; an error inside the block leaves nothing."""
    write_dataset(tmp_path / "whole.zarr", episodes, attrs={"source": "test"})
    with store_mod.dataset_writer(tmp_path / "appended.zarr", attrs={"source": "test"}) as writer:
        for ep in episodes:
            writer.append(ep)
        assert writer.num_episodes == 3 and not (tmp_path / "appended.zarr").exists()
    whole, appended = (zarr.open_group(tmp_path / name, mode="r") for name in ("whole.zarr", "appended.zarr"))
    assert dict(appended.attrs) == dict(whole.attrs) and dict(appended["meta"].attrs) == dict(whole["meta"].attrs)
    for name in ("data/obs/image_front", "data/obs/state", "data/action", "meta/episode_ends"):
        assert appended[name].chunks == whole[name].chunks and appended[name].shape == whole[name].shape
        np.testing.assert_array_equal(appended[name][:], whole[name][:])
    assert whole["data/obs/image_front"].chunks[0] == 64  # 78 frames: one whole chunk, then a partial one

    with pytest.raises(DatasetError, match="episode 1: obs keys"):
        with store_mod.dataset_writer(tmp_path / "bad.zarr") as writer:
            writer.append(episodes[0])
            writer.append(make_episode(3, 0.0, image=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appended.zarr", "whole.zarr"]


def test_refuses_to_overwrite_foreign_directory(tmp_path, episodes):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a polcache dataset; refusing"):
        write_dataset(tmp_path / "mine", episodes)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_truncated_shorter_array(ds_path):
    arr = zarr.open_array(str(ds_path / "data" / "obs" / "state"), mode="r+")
    arr.resize((50, 2))
    with pytest.raises(DatasetError, match=r"truncated dataset: data/obs/state has 50 rows, expected 78"):
        EpisodeStore.open(ds_path)


def test_truncated_missing_array(ds_path):
    shutil.rmtree(ds_path / "data" / "action")
    with pytest.raises(DatasetError, match="missing array data/action"):
        EpisodeStore.open(ds_path)


def test_truncated_missing_chunk(ds_path):
    chunks = sorted(p for p in (ds_path / "data" / "obs" / "image_front" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 2  # 78 frames in chunks of 64
    chunks[-1].unlink()
    with pytest.raises(DatasetError, match="image_front has 1 of 2 chunks missing"):
        EpisodeStore.open(ds_path)


def test_broken_episode_ends(ds_path):
    ends = zarr.open_array(str(ds_path / "meta" / "episode_ends"), mode="r+")
    ends[:] = np.array([5, 8, 90])
    with pytest.raises(DatasetError, match="has 78 rows, expected 90"):
        EpisodeStore.open(ds_path)
    ends[:] = np.array([5, 3, 78])
    with pytest.raises(DatasetError, match="not strictly increasing"):
        EpisodeStore.open(ds_path)


def test_incomplete_flag(ds_path):
    zarr.open_group(str(ds_path), mode="r+").attrs["complete"] = False
    with pytest.raises(DatasetError, match="incomplete"):
        EpisodeStore.open(ds_path)


def test_foreign_datasets(tmp_path):
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("x", data=np.zeros(3))
    with pytest.raises(DatasetError, match="plain.zarr: not a polcache dataset"):
        EpisodeStore.open(tmp_path / "plain.zarr")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "a.txt").write_text("hi")
    with pytest.raises(DatasetError, match="random: not a polcache dataset"):
        EpisodeStore.open(tmp_path / "random")
    with pytest.raises(DatasetError, match="does not exist"):
        EpisodeStore.open(tmp_path / "nope")


def test_a_chunk_that_fails_to_decode_is_named_where_it_is_read(ds_path):
    (ds_path / "data/obs/image_front/c/1/0/0/0").write_bytes(b"damaged!" * 8)  # rows 64..77, in episode 2
    store = EpisodeStore.open(ds_path)  # open reads no image chunk
    where = r"demo.zarr: data/obs/image_front chunk 1 \(rows 64..77, episode 2\) cannot be read \(RuntimeError: Zstd"
    with pytest.raises(DatasetError, match=where):
        store.array("image_front")
    with pytest.raises(DatasetError, match=where):
        store.episode(2)
    with pytest.raises(DatasetError, match=where):
        SequenceDataset(store, horizon=4, n_obs_steps=2)  # what training and calibration load
    assert store.episode(0).obs["image_front"].shape == (5, 4, 5, 3)  # the good chunk still reads
    (ds_path / "meta/episode_ends/c/0").write_bytes(b"damaged!")
    with pytest.raises(DatasetError, match=r"meta/episode_ends chunk 0 \(rows 0..2\) cannot be read"):
        EpisodeStore.open(ds_path)


def test_bit_rot_that_still_decodes_is_caught_by_the_zstd_checksum(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)  # incompressible: stored raw
    path = tmp_path / "rot.zarr"
    write_dataset(path, [Episode(obs={"image_front": pixels}, action=np.zeros((40, 2), np.float32))])
    chunk = path / "data/obs/image_front/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # without a checksum this decodes, one pixel off
    chunk.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"rot.zarr: data/obs/image_front chunk 0 \(rows 0..39, episode 0\) cannot "
                                           r"be read \(RuntimeError: .*checksum"):
        EpisodeStore.open(path).array("image_front")


def test_datasets_written_without_checksums_still_open(tmp_path, episodes, monkeypatch):
    monkeypatch.setattr(store_mod, "_COMPRESSOR", "auto")  # zarr's default zstd, as datasets were written before
    write_dataset(tmp_path / "old.zarr", episodes)
    monkeypatch.undo()
    codecs = json.loads((tmp_path / "old.zarr/data/action/zarr.json").read_text())["codecs"]
    assert {"name": "zstd", "configuration": {"level": 0, "checksum": False}} in codecs
    np.testing.assert_array_equal(EpisodeStore.open(tmp_path / "old.zarr").array("action"),
                                  np.concatenate([e.action for e in episodes]))


RECORDED_ATTRS = {"obs_spec": {"state": {"shape": [2], "dtype": "float32"},
                               "image_front": {"shape": [4, 5, 3], "dtype": "uint8"}}, "action_dim": 2}


def _edit_array_meta(path, name: str, **changes) -> None:
    """Hand-edit an array's zarr.json; a new shape changes the chunk shape alike, so the chunk files still fit."""
    meta = path / name / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.update(changes)
    if "shape" in changes:
        doc["chunk_grid"]["configuration"]["chunk_shape"][1:] = changes["shape"][1:]
    meta.write_text(json.dumps(doc))


def _set_attr(path, group: str, **attrs) -> None:
    zarr.open_group(str(path / group), mode="r+").attrs.update(attrs)


@pytest.mark.parametrize("damage, match", [
    (lambda p: _edit_array_meta(p, "data/obs/state", data_type="int32"),
     r"data/obs/state holds int32 steps of shape \(2,\), expected float32 steps of shape \(\*,\) \(as polcache writes"),
    (lambda p: _edit_array_meta(p, "data/obs/image_front", data_type="int8"),
     r"data/obs/image_front holds int8 steps of shape \(4, 5, 3\), expected uint8"),
    (lambda p: _edit_array_meta(p, "data/obs/state", shape=[78, 3]),
     r"data/obs/state holds float32 steps of shape \(3,\), expected float32 steps of shape \(2,\) \(as attrs "
     r"obs_spec declares\)"),
    (lambda p: _edit_array_meta(p, "data/action", shape=[78, 3]),
     r"data/action holds float32 steps of shape \(3,\), expected float32 steps of shape \(2,\) \(attrs action_dim is 2\)"),
    (lambda p: shutil.rmtree(p / "data/obs/image_front"), "truncated dataset: missing array data/obs/image_front .attrs obs_spec declares it"),
    (lambda p: _set_attr(p, "", obs_spec={"state": {"shape": [2], "dtype": "float32"}}),
     r"data/obs/image_front is not declared in attrs obs_spec \(which declares state\)"),
    (lambda p: _set_attr(p, "meta", tasks="abc"), 'meta attrs tasks must be a list of strings, one per episode, got "abc"'),
    (lambda p: _set_attr(p, "meta", tasks=[1, 2, 3]), "meta attrs tasks must be a list of strings"),
    (lambda p: _set_attr(p, "", obs_spec={"state": {"shape": "2", "dtype": "float32"}}),
     "attrs obs_spec must map each obs key to"),
    (lambda p: _set_attr(p, "", action_dim="2"), "attrs action_dim must be a positive integer, got '2'"),
    (lambda p: _set_attr(p, "", version=True), "dataset version True is not supported"),
], ids=["state-int32", "image-int8", "state-shape", "action-shape", "declared-array-gone", "undeclared-array",
        "tasks-string", "tasks-ints", "obs-spec-shape-text", "action-dim-text", "version-bool"])
def test_hand_edited_layout_is_refused_at_open(tmp_path, episodes, damage, match):
    path = tmp_path / "rec.zarr"
    write_dataset(path, episodes, attrs=RECORDED_ATTRS)  # the attrs `polcache record` writes
    EpisodeStore.open(path)
    damage(path)
    with pytest.raises(DatasetError, match=f"rec.zarr: {match}"):
        EpisodeStore.open(path)


# ---- sequence ---------------------------------------------------------------


def test_padding_at_both_borders(ds_path):
    ds = SequenceDataset(EpisodeStore.open(ds_path), horizon=16, n_obs_steps=2)
    assert len(ds) == 78
    # Episode 0 (T=5, values 0..4), current step t=0: obs steps -1, 0 -> [0, 0];
    # actions steps -1 .. 14 -> [0, 0, 1, 2, 3, 4, 4, 4, ...] (first repeated before, last after).
    s = ds[0]
    assert ds.sample_info(0) == (0, 0)
    np.testing.assert_array_equal(s["obs"]["state"][:, 0].numpy(), [0, 0])
    want = [0, 0, 1, 2, 3] + [4] * 11
    np.testing.assert_array_equal(s["action"][:, 0].numpy(), want)
    np.testing.assert_array_equal(s["action"][:, 1].numpy(), [-v for v in want])
    np.testing.assert_array_equal(s["obs"]["image_front"][:, 0, 0, 0].numpy(), [0, 0])
    # Episode 0, t=4 (its last step): obs steps 3, 4; actions steps 3 .. 18 -> [3, 4, 4, ...].
    s = ds[4]
    np.testing.assert_array_equal(s["obs"]["state"][:, 1].numpy(), [3.5, 4.5])
    np.testing.assert_array_equal(s["action"][:, 0].numpy(), [3] + [4] * 15)
    # Episode 1 (T=3, values 100..102), t=1: obs steps 0, 1; actions steps 0 .. 15.
    s = ds[6]
    assert ds.sample_info(6) == (1, 1)
    np.testing.assert_array_equal(s["obs"]["state"][:, 0].numpy(), [100, 101])
    np.testing.assert_array_equal(s["action"][:, 0].numpy(), [100, 101] + [102] * 14)
    # Episode 2, t=30: no padding, steps 29 .. 44.
    s = ds[8 + 30]
    np.testing.assert_array_equal(s["action"][:, 0].numpy(), 200 + np.arange(29, 45))
    assert s["obs"]["state"].dtype == torch.float32 and s["action"].dtype == torch.float32
    assert s["obs"]["image_front"].dtype == torch.uint8 and s["obs"]["image_front"].shape == (2, 4, 5, 3)
    assert s["action"].shape == (16, 2)


def test_windows_never_cross_episodes(ds_path):
    ds = SequenceDataset(EpisodeStore.open(ds_path), horizon=8, n_obs_steps=3, keys=["state"])
    bases = [0, 100, 200]
    for i in range(len(ds)):
        e, t = ds.sample_info(i)
        s = ds[i]
        assert list(s["obs"]) == ["state"]
        lo, hi = bases[e], bases[e] + [5, 3, 70][e] - 1
        for x in (s["obs"]["state"][:, 0], s["action"][:, 0]):
            assert lo <= x.min().item() and x.max().item() <= hi
        assert s["obs"]["state"][-1, 0].item() == bases[e] + t  # newest obs is the current step
        assert s["action"][2, 0].item() == bases[e] + t  # action[To-1] is due at the current step


def test_episode_subset_and_split(ds_path):
    train, val = episode_split(10, 0.2, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(10)) and not set(train) & set(val)
    assert episode_split(10, 0.2, seed=1) == (train, val)
    assert episode_split(2, 0.01, seed=0)[1] != [] and episode_split(1, 0.5)[1] == []
    assert episode_split(1, 0.6) == ([0], [])  # held out its only episode: training failed on no windows
    assert episode_split(3, 0.9, seed=0)[0] != []
    ds = SequenceDataset(EpisodeStore.open(ds_path), horizon=4, n_obs_steps=2, episode_ids=[1])
    assert len(ds) == 3 and {ds.sample_info(i)[0] for i in range(3)} == {1}
    with pytest.raises(KeyError):
        SequenceDataset(EpisodeStore.open(ds_path), horizon=4, n_obs_steps=2, keys=["image_side"])


# ---- normalize --------------------------------------------------------------


def test_normalizer_round_trip_and_constant_dims():
    rng = np.random.default_rng(0)
    action = rng.uniform(-3, 5, size=(200, 3)).astype(np.float32)
    action[:, 1] = 0.25  # constant dim
    state = rng.normal(size=(200, 4)) * 10
    n = Normalizer.fit({"action": action, "state": state})
    assert sorted(n.keys) == ["action", "state"]
    y = n.normalize("action", action)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y[:, [0, 2]].min() >= -1 - 1e-6 and y[:, [0, 2]].max() <= 1 + 1e-6
    np.testing.assert_allclose(y[:, [0, 2]].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(y[:, [0, 2]].max(0), 1, atol=1e-6)
    np.testing.assert_allclose(y[:, 1], 0, atol=1e-7)  # constant dim: shifted to 0, not divided
    np.testing.assert_allclose(n.unnormalize("action", y), action, atol=1e-6)
    # torch, extra leading dims, float64 keeps its dtype
    t = torch.from_numpy(state).reshape(10, 20, 4)
    yt = n.normalize("state", t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64 and yt.shape == (10, 20, 4)
    torch.testing.assert_close(n.unnormalize("state", yt), t, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last dim must be 4"):
        n.normalize("state", np.zeros((2, 3)))


def test_normalizer_state_dict_safetensors(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 2, size=(50, 2)).astype(np.float32)
    n = Normalizer.fit({"action": a, "state": np.ones((50, 3), np.float32)})
    sd = n.state_dict()
    assert {"action.min", "action.max", "action.mean", "action.std", "state.scale"} <= set(sd)
    save_file(sd, str(tmp_path / "norm.safetensors"))
    m = Normalizer.from_state_dict(load_file(str(tmp_path / "norm.safetensors")))
    x = torch.from_numpy(a)
    torch.testing.assert_close(m.normalize("action", x), n.normalize("action", x))
    torch.testing.assert_close(m.unnormalize("action", m.normalize("action", x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.stats("action")["min"], torch.from_numpy(a.min(0)))


def test_training_names_a_dataset_whose_values_were_damaged_to_nan(tmp_path, episodes):
    from polcache.config import load_config
    from polcache.train.loop import build_policy

    path = tmp_path / "demo.zarr"
    write_dataset(path, [make_episode(5, 0.0, image=False), make_episode(70, 200.0, image=False)])
    zarr.open_group(str(path), mode="r+")["data/action"][3, 1] = np.nan  # damaged on disk after it was written
    cfg = load_config("configs/metaworld_small.yaml", [f"dataset={path}", "obs_keys=[state]"])
    with pytest.raises(DatasetError, match=f"dataset {path}: action holds NaN or inf at episode 0 frame 3$"):
        build_policy(cfg, EpisodeStore.open(path))
    zarr.open_group(str(path), mode="r+")["data/action"][3, 1] = 0.0
    zarr.open_group(str(path), mode="r+")["data/obs/state"][9, 0] = np.inf  # the second episode's frame 4
    with pytest.raises(DatasetError, match=f"dataset {path}: state holds NaN or inf at episode 1 frame 4$"):
        build_policy(cfg, EpisodeStore.open(path))


def test_a_dataset_whose_group_metadata_is_cut_short_is_called_damaged(ds_path):
    """A truncated zarr.json read as "not a polcache dataset (not a zarr group)", as if it were another program's."""
    meta = next(ds_path / name for name in ("zarr.json", ".zgroup") if (ds_path / name).is_file())
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(DatasetError, match="a zarr store whose group metadata cannot be read \\(damaged or truncated"):
        EpisodeStore.open(ds_path)
    with pytest.raises(DatasetError, match="not a zarr group"):
        EpisodeStore.open(ds_path.parent)  # a plain folder is still not a dataset at all
