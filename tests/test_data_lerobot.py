"""LeRobotDataset v3.0 import/export: a hand-written v3.0 fixture (pyarrow + PyAV, not our exporter),
round trips, refusals, training straight from a LeRobot root, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tqdm import tqdm

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from polcache.cli import main  # noqa: E402
from polcache.data import Episode, EpisodeStore, SequenceDataset, open_dataset, write_dataset  # noqa: E402
from polcache.data import lerobot as lr  # noqa: E402
from polcache.data import lerobot_export as lr_export  # noqa: E402
from polcache.errors import DatasetError  # noqa: E402
from polcache.policy.language import decode_instruction, encode_instruction  # noqa: E402

FPS, H, W = 15, 32, 32
LENGTHS = [6, 4, 5]
TASKS = ["pick the cube", "open the drawer"]
EPISODE_TASK = [0, 1, 0]
FILE_OF = [0, 0, 1]  # episodes 0 and 1 share data/video file 0, episode 2 is in file 1 (as aggregate writes)


def frame_image(g: int) -> np.ndarray:
    """Smooth image whose colour identifies global frame g (neighbours differ by ~5 levels per channel)."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([20 + 6 * g + 2 * x, 40 + 3 * y + 4 * g, 200 - 5 * g - x], -1).clip(0, 255).astype(np.uint8)


def state_of(g: int) -> list[float]:
    return [g + 0.25, -g * 0.5, 1.0 / (g + 1)]


def action_of(g: int) -> list[float]:
    return [g * 0.1, 2.0 - g]


def encode_video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Like lerobot's streaming encoder: time base 1/fps, frame k at pts k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "5", "g": "2"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for k, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = k
            c.mux(s.encode(f))
        c.mux(s.encode())


def write_fixture(root: Path) -> Path:
    """A LeRobotDataset v3.0 root following lerobot's layout, written by hand."""
    cam = "observation.images.top"
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": {"motors": ["x", "y", "z"]}},
        "action": {"dtype": "float32", "shape": [2], "names": ["vx", "vy"]},
        cam: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
              "info": {"video.height": H, "video.width": W, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                       "video.fps": FPS, "video.channels": 3, "has_audio": False}},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v3.0", "robot_type": "toy", "total_episodes": 3, "total_frames": sum(LENGTHS),
            "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": FPS, "splits": {"train": "0:3"}, "data_path": lr.DATA_PATH, "video_path": lr.VIDEO_PATH,
            "features": features}
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": [0, 1], "task": TASKS}), root / "meta/tasks.parquet")

    g, data_rows, video_frames, ep_rows = 0, {0: [], 1: []}, {0: [], 1: []}, []
    for e, n in enumerate(LENGTHS):
        f = FILE_OF[e]
        from_ts = len(video_frames[f]) / FPS
        for k in range(n):
            data_rows[f].append({"observation.state": state_of(g + k), "action": action_of(g + k), "next.reward": 0.0,
                                 "timestamp": k / FPS, "frame_index": k, "episode_index": e, "index": g + k,
                                 "task_index": EPISODE_TASK[e]})
            video_frames[f].append(frame_image(g + k))
        ep_rows.append({"episode_index": e, "tasks": [TASKS[EPISODE_TASK[e]]], "length": n,
                        "data/chunk_index": 0, "data/file_index": f, "dataset_from_index": g,
                        "dataset_to_index": g + n, f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": f,
                        f"videos/{cam}/from_timestamp": from_ts, f"videos/{cam}/to_timestamp": from_ts + n / FPS,
                        "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        g += n
    schema = pa.schema([("observation.state", pa.list_(pa.float32())), ("action", pa.list_(pa.float32(), 2)),
                        ("next.reward", pa.float32()), ("timestamp", pa.float32()), ("frame_index", pa.int64()),
                        ("episode_index", pa.int64()), ("index", pa.int64()), ("task_index", pa.int64())])
    for f in (0, 1):
        path = root / lr.DATA_PATH.format(chunk_index=0, file_index=f)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data_rows[f], schema), path)
        encode_video(root / lr.VIDEO_PATH.format(video_key=cam, chunk_index=0, file_index=f), video_frames[f])
    ep_path = root / lr.EPISODES_PATH.format(chunk_index=0, file_index=0)
    ep_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), ep_path)
    return root


@pytest.fixture
def lerobot_root(tmp_path) -> Path:
    return write_fixture(tmp_path / "lerobot")


def smooth_episode(n: int, seed: int, task: str) -> Episode:
    rng = np.random.default_rng(seed)
    images = np.stack([frame_image(seed * 7 + k) for k in range(n)])
    return Episode(obs={"state": rng.normal(size=(n, 4)).astype(np.float32), "image_front": images},
                   action=rng.normal(size=(n, 3)).astype(np.float32), task=task)


@pytest.fixture
def polcache_ds(tmp_path) -> Path:
    path = tmp_path / "demo.zarr"
    write_dataset(path, [smooth_episode(5, 0, "a"), smooth_episode(7, 1, "b"), smooth_episode(4, 2, "a")],
                  attrs={"fps": 20, "state_names": ["p0", "p1", "p2", "p3"]})
    return path


def assert_images_close(got: np.ndarray, want: np.ndarray) -> None:
    err = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == want.shape and err.mean() < 3.0 and err.max() < 40, (err.mean(), err.max())


# ---- import -----------------------------------------------------------------


def test_import_hand_written_root(lerobot_root, tmp_path):
    report = lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False)
    assert (report.episodes, report.frames, report.fps) == (3, 15, FPS)
    assert report.skipped == ["next.reward (no polcache counterpart)"]
    s = EpisodeStore.open(tmp_path / "out.zarr")
    assert s.obs_keys == ["image_top", "state"] and s.action_dim == 2
    assert s.episode_ends.tolist() == [6, 10, 15]
    assert s.tasks == [TASKS[t] for t in EPISODE_TASK]
    assert s.attrs["fps"] == FPS and s.attrs["robot_type"] == "toy"
    assert s.attrs["state_names"] == ["x", "y", "z"] and s.attrs["action_names"] == ["vx", "vy"]
    np.testing.assert_array_equal(s.array("state"), np.array([state_of(g) for g in range(15)], np.float32))
    np.testing.assert_array_equal(s.array("action"), np.array([action_of(g) for g in range(15)], np.float32))
    want = np.stack([frame_image(g) for g in range(15)])
    got = s.array("image_top")
    assert_images_close(got, want)
    # every frame is nearest to its own source frame: no off-by-one at episode or file borders
    dist = np.abs(got[:, None].astype(int) - want[None].astype(int)).mean(axis=(2, 3, 4))
    assert dist.argmin(axis=1).tolist() == list(range(15))


def test_import_takes_the_nearest_video_frame(lerobot_root, tmp_path):
    """A video with three frames per data frame (all inside the lookup window): the frame at the
    wanted time is taken, not the last one in the window."""
    n = LENGTHS[0] + LENGTHS[1]
    encode_video(lerobot_root / lr.VIDEO_PATH.format(video_key="observation.images.top", chunk_index=0, file_index=0),
                 [frame_image(j) for j in range(3 * n)], fps=3 * FPS)
    lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False)
    store = EpisodeStore.open(tmp_path / "out.zarr")
    got = np.concatenate([store.episode(e).obs["image_top"] for e in (0, 1)]).astype(int)
    candidates = np.stack([frame_image(j) for j in range(3 * n)]).astype(int)
    best = [int(np.argmin(np.abs(candidates - img).mean(axis=(1, 2, 3)))) for img in got]
    assert best == [3 * g for g in range(n)]


def box_mean(images: np.ndarray, f: int) -> np.ndarray:
    """(T, H, W, 3) images shrunk f times by averaging f x f blocks: what an area resize gives."""
    t, h, w, c = images.shape
    return images.reshape(t, h // f, f, w // f, f, c).astype(float).mean(axis=(2, 4)).round().astype(np.uint8)


def test_import_resizes_every_camera(lerobot_root, tmp_path):
    """image_size resizes videos and embedded images at decode (area averaging), to exactly HxW
    whatever the aspect ratio, and the attrs say from what."""
    add_png_camera(lerobot_root)
    want = box_mean(np.stack([frame_image(g) for g in range(15)]), 2)
    report = lr.import_lerobot(lerobot_root, tmp_path / "half.zarr", progress=False, image_size=(H // 2, W // 2))
    s = EpisodeStore.open(tmp_path / "half.zarr")
    assert report.obs_keys == ["image_main", "image_top", "state"]
    assert_images_close(s.array("image_top"), want)
    np.testing.assert_allclose(s.array("image_main"), want, atol=1)  # lossless source: only rounding differs
    assert s.attrs["image_resize"] == {"size": [16, 16], "interpolation": "area",
                                       "source_sizes": {"image_main": [H, W], "image_top": [H, W]}}
    np.testing.assert_array_equal(s.array("state"), np.array([state_of(g) for g in range(15)], np.float32))

    lr.import_lerobot(lerobot_root, tmp_path / "wide.zarr", progress=False, image_size=(8, 24))
    assert EpisodeStore.open(tmp_path / "wide.zarr").obs_spec()["image_top"].shape == (8, 24, 3)
    lr.import_lerobot(lerobot_root, tmp_path / "full.zarr", progress=False)
    assert "image_resize" not in EpisodeStore.open(tmp_path / "full.zarr").attrs  # full size: as before
    with pytest.raises(DatasetError, match=r"image_size must be \(height, width\), each 1..4096 pixels, got \(0, 8\)"):
        lr.import_lerobot(lerobot_root, tmp_path / "bad.zarr", progress=False, image_size=(0, 8))
    states = tmp_path / "states.zarr"  # a root without cameras: refused, not silently "resized"
    write_dataset(states, [Episode(obs={"state": np.zeros((4, 2), np.float32)}, action=np.zeros((4, 2), np.float32))])
    lr_export.export_lerobot(states, tmp_path / "states-root", progress=False)
    with pytest.raises(DatasetError, match=r"states-root: --image-size: the dataset has no camera features to resize$"):
        lr.import_lerobot(tmp_path / "states-root", tmp_path / "bad.zarr", progress=False, image_size=(8, 8))


def test_video_cursor_reads_on_and_back(lerobot_root, monkeypatch):
    """Episodes are read from a file in order, each frame decoded once; a read may share a frame with the
    one before (kept), and a read before what was let go (episodes stored out of order) reopens the file."""
    path = lerobot_root / lr.VIDEO_PATH.format(video_key="observation.images.top", chunk_index=0, file_index=0)
    opens, real_open = [], lr._VideoCursor._open
    monkeypatch.setattr(lr._VideoCursor, "_open", lambda self: opens.append(1) or real_open(self))
    cursor = lr._VideoCursor(lerobot_root, path, (H, W), None, 0.4 / FPS)
    with tqdm(disable=True) as bar:
        for frames in ([0, 1, 2, 3], [3, 4], [7, 8, 9], [1, 2]):
            images, found = cursor.read(np.array(frames) / FPS, bar)
            assert found.all()
            assert_images_close(images, np.stack([frame_image(g) for g in frames]))
        assert len(opens) == 2  # once, and again for the read back
        assert not cursor.read(np.array([10, 11]) / FPS, bar)[1].any()  # past the end: nothing found
    cursor.close()


def add_png_camera(lerobot_root: Path) -> None:
    """A dtype "image" feature, observation.image: PNG bytes in the data parquet as {bytes, path} structs."""
    info = json.loads((lerobot_root / "meta/info.json").read_text())
    info["features"]["observation.image"] = {"dtype": "image", "shape": [H, W, 3],
                                             "names": ["height", "width", "channels"]}
    (lerobot_root / "meta/info.json").write_text(json.dumps(info))
    png = av.CodecContext.create("png", "w")
    png.width, png.height, png.pix_fmt = W, H, "rgb24"
    for f in (0, 1):
        path = lerobot_root / lr.DATA_PATH.format(chunk_index=0, file_index=f)
        table = pq.read_table(path)
        blobs = [{"bytes": b"".join(bytes(p) for p in png.encode(av.VideoFrame.from_ndarray(frame_image(int(g)),
                                                                                               format="rgb24"))),
                  "path": None} for g in table.column("index").to_pylist()]
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        pq.write_table(table.append_column("observation.image", pa.array(blobs, struct)), path)


def test_import_embedded_png_images(lerobot_root, tmp_path):
    add_png_camera(lerobot_root)
    lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False)
    s = EpisodeStore.open(tmp_path / "out.zarr")
    assert s.obs_keys == ["image_main", "image_top", "state"]
    np.testing.assert_array_equal(s.array("image_main"), np.stack([frame_image(g) for g in range(15)]))


def exported_root(tmp_path: Path, name: str, episodes: int, length: int = 16, hw: tuple[int, int] = (64, 96)) -> Path:
    """A LeRobot root of `episodes` episodes of `length` frames, one camera of `hw` images (noise, so
    compression does not hide their size), all in one mp4 as lerobot writes them."""
    rng = np.random.default_rng(0)
    eps = [Episode(obs={"state": rng.normal(size=(length, 2)).astype(np.float32),
                        "image_front": rng.integers(0, 256, (length, *hw, 3), np.uint8)},
                   action=rng.normal(size=(length, 2)).astype(np.float32)) for _ in range(episodes)]
    write_dataset(tmp_path / f"{name}.zarr", eps)
    lr_export.export_lerobot(tmp_path / f"{name}.zarr", tmp_path / name, fps=10, crf=30, progress=False)
    return tmp_path / name


def import_peak(root: Path, out: Path, **kwargs) -> int:
    """Peak bytes allocated through Python and numpy (numpy reports to tracemalloc) during an import."""
    tracemalloc.start()
    try:
        lr.import_lerobot(root, out, progress=False, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_import_memory_does_not_grow_with_episodes(tmp_path):
    """Episodes are decoded and written one at a time: three times the episodes, same peak, where holding
    the dataset would add at least the extra episodes' images. (Both hold whole 64-frame zarr chunks, so
    the partial last chunk, held until the end, is the same size.)"""
    small, large = exported_root(tmp_path, "small", 8), exported_root(tmp_path, "large", 24)
    lr.import_lerobot(small, tmp_path / "warm.zarr", progress=False)  # module imports are not what is measured
    extra_images = 16 * 16 * 64 * 96 * 3
    peak_small, peak_large = import_peak(small, tmp_path / "s.zarr"), import_peak(large, tmp_path / "l.zarr")
    assert peak_large < peak_small + extra_images / 8, (peak_small, peak_large, extra_images)
    peak_resized = import_peak(large, tmp_path / "r.zarr", image_size=(16, 24))  # full-size frames never held
    assert peak_resized < peak_large / 4, (peak_resized, peak_large)


# ---- export and round trip ----------------------------------------------------


def test_round_trip(polcache_ds, tmp_path):
    out = tmp_path / "exported"
    report = lr_export.export_lerobot(polcache_ds, out, progress=False)
    assert (report.fps, report.codec, report.video_keys) == (20, "h264", ["observation.images.front"])
    lr.import_lerobot(out, tmp_path / "back.zarr", progress=False)
    src, back = EpisodeStore.open(polcache_ds), EpisodeStore.open(tmp_path / "back.zarr")
    assert back.tasks == src.tasks and back.episode_ends.tolist() == src.episode_ends.tolist()
    np.testing.assert_array_equal(back.array("state"), src.array("state"))
    np.testing.assert_array_equal(back.array("action"), src.array("action"))
    assert_images_close(back.array("image_front"), src.array("image_front"))
    assert back.attrs["fps"] == 20 and back.attrs["state_names"] == ["p0", "p1", "p2", "p3"]
    assert "task" not in back.attrs  # several tasks: no single dataset task


def test_single_task_becomes_the_dataset_task(tmp_path):
    src = tmp_path / "one.zarr"
    write_dataset(src, [smooth_episode(4, 0, "push-v3"), smooth_episode(4, 1, "push-v3")])
    lr_export.export_lerobot(src, tmp_path / "exported", progress=False)
    lr.import_lerobot(tmp_path / "exported", tmp_path / "back.zarr", progress=False)
    assert EpisodeStore.open(tmp_path / "back.zarr").attrs["task"] == "push-v3"  # train/eval find the env by it


def test_exported_meta_structure(polcache_ds, tmp_path):
    out = tmp_path / "exported"
    lr_export.export_lerobot(polcache_ds, out, fps=20, progress=False)  # the dataset's own: accepted
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 16, 2)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["splits"] == {"train": "0:3"} and info["chunks_size"] == 1000
    feats = info["features"]
    assert list(feats) == ["observation.state", "action", "observation.images.front", "timestamp", "frame_index",
                           "episode_index", "index", "task_index"]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [4], "names": ["p0", "p1", "p2", "p3"]}
    assert feats["action"]["shape"] == [3]
    cam = feats["observation.images.front"]
    assert cam["dtype"] == "video" and cam["shape"] == [H, W, 3]
    assert cam["info"]["video.codec"] == "h264" and cam["info"]["video.pix_fmt"] == "yuv420p"

    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    for col in ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                "dataset_to_index", "videos/observation.images.front/chunk_index",
                "videos/observation.images.front/file_index", "videos/observation.images.front/from_timestamp",
                "videos/observation.images.front/to_timestamp", "meta/episodes/chunk_index",
                "meta/episodes/file_index", "stats/action/mean"]:
        assert col in eps, col
    assert eps["length"] == [5, 7, 4] and eps["tasks"] == [["a"], ["b"], ["a"]]
    assert eps["dataset_from_index"] == [0, 5, 12] and eps["dataset_to_index"] == [5, 12, 16]
    assert eps["videos/observation.images.front/from_timestamp"] == pytest.approx([0, 5 / 20, 12 / 20])

    tasks = pq.read_table(out / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["a", "b"] and tasks.column("task_index").to_pylist() == [0, 1]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # pandas reads task as index

    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert data.num_rows == 16 and data.column("index").to_pylist() == list(range(16))
    assert data.column("timestamp").to_pylist()[5:7] == pytest.approx([0, 1 / 20])

    stats = json.loads((out / "meta/stats.json").read_text())
    src = EpisodeStore.open(polcache_ds)
    np.testing.assert_allclose(stats["action"]["mean"], src.array("action").mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], src.array("action").std(0), rtol=1e-5)
    img = stats["observation.images.front"]
    assert np.array(img["mean"]).shape == (3, 1, 1) and img["count"] == [16]
    np.testing.assert_allclose(np.array(img["mean"])[:, 0, 0], src.array("image_front").mean((0, 1, 2)) / 255)
    assert set(stats) == set(feats)


def test_export_refuses_foreign_directory(polcache_ds, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a LeRobot dataset; refusing"):
        lr_export.export_lerobot(polcache_ds, out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_export_replaces_lerobot_root(polcache_ds, lerobot_root):
    lr_export.export_lerobot(polcache_ds, lerobot_root, progress=False)
    assert json.loads((lerobot_root / "meta/info.json").read_text())["total_frames"] == 16
    assert not (lerobot_root / "data/chunk-000/file-001.parquet").exists()


def test_interrupted_export_leaves_nothing(polcache_ds, tmp_path, monkeypatch):
    def boom(self, images):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(lr_export._VideoWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lr_export.export_lerobot(polcache_ds, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.zarr"]


def test_export_refuses_another_rate_than_the_datasets_and_takes_one_where_it_has_none(polcache_ds, tmp_path):
    with pytest.raises(DatasetError, match="--fps 30: the dataset's frames are 20 per second"):
        lr_export.export_lerobot(polcache_ds, tmp_path / "out", fps=30, progress=False)  # timestamps would lie
    assert not (tmp_path / "out").exists()
    write_dataset(tmp_path / "norate.zarr", [smooth_episode(4, 0, "a")])
    assert lr_export.export_lerobot(tmp_path / "norate.zarr", tmp_path / "out", fps=30, progress=False).fps == 30


def test_export_refuses_an_observation_it_would_drop(tmp_path):
    ep = Episode(obs={"state": np.zeros((3, 2), np.float32), "embedding": np.zeros((3, 8), np.float32)},
                 action=np.zeros((3, 2), np.float32))
    write_dataset(tmp_path / "emb.zarr", [ep])
    with pytest.raises(DatasetError, match="'embedding' has no LeRobot feature.*export the dataset it was made from"):
        lr_export.export_lerobot(tmp_path / "emb.zarr", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_recording_or_import_does_not_replace_an_embedding_store(lerobot_root, tmp_path, capsys):
    store = tmp_path / "emb.zarr"
    write_dataset(store, [Episode(obs={"embedding": np.zeros((3, 8), np.float32)}, action=np.zeros((3, 2), np.float32))])
    assert main(["data", "import-lerobot", str(lerobot_root), "--out", str(store), "--no-progress"]) == 2
    assert "an embedding store from `ptp embed` is not replaced" in capsys.readouterr().err
    assert main(["record", "--task", "cue-reach", "--episodes", "1", "--out", str(store), "--no-progress"]) == 2
    assert "is not replaced" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="not replaced"):
        lr.import_lerobot(lerobot_root, store, progress=False)
    assert EpisodeStore.open(store).obs_keys == ["embedding"]
    lr.import_lerobot(lerobot_root, tmp_path / "demo.zarr", progress=False)
    lr.import_lerobot(lerobot_root, tmp_path / "demo.zarr", progress=False)  # demonstrations are replaced


def test_export_refuses_odd_image_size(tmp_path):
    ep = Episode(obs={"image_cam": np.zeros((3, 5, 6, 3), np.uint8)}, action=np.zeros((3, 2), np.float32))
    write_dataset(tmp_path / "odd.zarr", [ep])
    with pytest.raises(DatasetError, match="even image sizes"):
        lr_export.export_lerobot(tmp_path / "odd.zarr", tmp_path / "out", progress=False)


# ---- instructions (language) <-> task strings ---------------------------------------


def instructed_episode(texts: list[str], seed: int, width: int = 64) -> Episode:
    """An episode as `polcache record --instructions` writes it: frame k carries texts[k]'s bytes."""
    rng = np.random.default_rng(seed)
    n = len(texts)
    return Episode(obs={"state": rng.normal(size=(n, 4)).astype(np.float32),
                        "instruction": np.stack([encode_instruction(t, width) for t in texts])},
                   action=rng.normal(size=(n, 3)).astype(np.float32), task="reach-v3")


def frame_texts(store: EpisodeStore, e: int) -> list[str]:
    return [decode_instruction(row) for row in store.episode(e).obs["instruction"]]


def instructed_dataset(path: Path, width: int = 64) -> list[Episode]:
    """Four record-like episodes, one of whose instruction changes midway (as subtasks would)."""
    episodes = [instructed_episode(["reach the goal"] * 5, 0, width),
                instructed_episode(["go to the target"] * 3 + ["reach the goal"] * 2 + ["go to the target"], 1, width),
                instructed_episode(["reach the goal"] * 3, 2, width),
                instructed_episode(["touche la cible, s'il te plaît"] * 2, 3, width)]
    write_dataset(path, episodes, attrs={"fps": 20, "task": "reach-v3"})
    return episodes


def test_export_writes_instructions_as_tasks(tmp_path):
    """The `instruction` observation is lerobot's task string, frame by frame; numbered in order of first use."""
    instructed_dataset(tmp_path / "instructed.zarr")
    out = tmp_path / "exported"
    lr_export.export_lerobot(tmp_path / "instructed.zarr", out, progress=False)
    tasks = pq.read_table(out / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["reach the goal", "go to the target", "touche la cible, s'il te plaît"]
    assert tasks.column("task_index").to_pylist() == [0, 1, 2]
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert eps["tasks"] == [["reach the goal"], ["go to the target", "reach the goal"], ["reach the goal"],
                            ["touche la cible, s'il te plaît"]]
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert data.column("task_index").to_pylist() == [0] * 5 + [1, 1, 1, 0, 0, 1] + [0] * 3 + [2] * 2
    info = json.loads((out / "meta/info.json").read_text())
    assert info["total_tasks"] == 3 and "instruction" not in info["features"]  # the task string is its home


def test_export_refuses_undecodable_instruction(tmp_path):
    ep = instructed_episode(["reach the goal"] * 3, 0, 16)
    ep.obs["instruction"][2, :2] = [0xC3, 0x28]  # not UTF-8
    write_dataset(tmp_path / "bad.zarr", [instructed_episode(["reach"] * 2, 1, 16), ep])
    with pytest.raises(DatasetError, match=r"bad.zarr: episode 1 frame 2: instruction: not valid UTF-8 \(byte 0\)"):
        lr_export.export_lerobot(tmp_path / "bad.zarr", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_instructions_round_trip(tmp_path):
    """record --instructions -> export-lerobot -> import-lerobot --instructions: every frame's bytes come back."""
    src = tmp_path / "instructed.zarr"
    episodes = instructed_dataset(src)
    lr_export.export_lerobot(src, tmp_path / "exported", progress=False)
    report = lr.import_lerobot(tmp_path / "exported", tmp_path / "back.zarr", progress=False, instruction_bytes=64)
    assert report.obs_keys == ["instruction", "state"]
    back = EpisodeStore.open(tmp_path / "back.zarr")
    assert back.obs_spec()["instruction"] == EpisodeStore.open(src).obs_spec()["instruction"]
    for e, ep in enumerate(episodes):
        np.testing.assert_array_equal(back.episode(e).obs["instruction"], ep.obs["instruction"])
    assert frame_texts(back, 1) == ["go to the target"] * 3 + ["reach the goal"] * 2 + ["go to the target"]
    one = tmp_path / "one.zarr"  # one instruction throughout: language, not the environment's task name
    write_dataset(one, [instructed_episode(["reach the goal"] * 4, 0)])
    lr_export.export_lerobot(one, tmp_path / "one", progress=False)
    lr.import_lerobot(tmp_path / "one", tmp_path / "one_back.zarr", progress=False, instruction_bytes=64)
    assert "task" not in EpisodeStore.open(tmp_path / "one_back.zarr").attrs  # eval had looked for "reach the goal"
    np.testing.assert_array_equal(back.array("state"), EpisodeStore.open(src).array("state"))

    lr.import_lerobot(tmp_path / "exported", tmp_path / "plain.zarr", progress=False)  # opt-in, as record's flag is
    assert EpisodeStore.open(tmp_path / "plain.zarr").obs_keys == ["state"]


def test_a_run_on_instructions_as_task_strings_records_no_tasks(tmp_path):
    """A LeRobot root's task strings are language: a checkpoint trained on one listed its paraphrases
    as the tasks it was trained on, and eval then offered them as --task names."""
    from polcache.train.loop import _task_names

    src = tmp_path / "instructed.zarr"
    write_dataset(src, [instructed_episode(["reach the goal"] * 3, 0) for _ in range(2)]
                  + [Episode(obs=ep.obs, action=ep.action, task="push-v3")
                     for ep in [instructed_episode(["push it"] * 3, 1)]])
    assert _task_names(EpisodeStore.open(src)) == ["push-v3", "reach-v3"]  # recorded: environment tasks
    lr_export.export_lerobot(src, tmp_path / "exported", progress=False)
    lr.import_lerobot(tmp_path / "exported", tmp_path / "back.zarr", progress=False, instruction_bytes=64)
    back = EpisodeStore.open(tmp_path / "back.zarr")
    assert back.tasks == ["reach the goal", "reach the goal", "push it"] and _task_names(back) == []


def test_import_several_tasks_per_episode_keeps_per_frame_strings(lerobot_root, tmp_path):
    """A LeRobot episode whose frames name different tasks (subtasks): every frame's instruction is its own."""
    _edit_data(lerobot_root, 0, "task_index", lambda t: np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 0]))
    lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False, instruction_bytes=16)
    s = EpisodeStore.open(tmp_path / "out.zarr")
    assert s.obs_keys == ["image_top", "instruction", "state"] and s.obs_spec()["instruction"].shape == (16,)
    pick, drawer = TASKS
    assert frame_texts(s, 0) == [pick, pick, pick, drawer, drawer, pick]
    assert frame_texts(s, 1) == [drawer, drawer, pick, pick]
    assert frame_texts(s, 2) == [pick] * 5
    assert s.tasks == [pick, drawer, pick]  # an episode's task stays its first frame's


def test_import_instructions_refusals(lerobot_root, tmp_path):
    with pytest.raises(DatasetError, match=r"lerobot: --instructions 12: episode 1's task 'open the drawer' takes 15 "
                                           r"UTF-8 bytes \(the longest\); give --instructions 15 or more"):
        lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False, instruction_bytes=12)
    pq.write_table(pa.table({"task_index": [0, 1], "task": [TASKS[0], "  "]}), lerobot_root / "meta/tasks.parquet")
    with pytest.raises(DatasetError, match=r"lerobot: --instructions 64: episode 1's task '  ': empty instruction"):
        lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False, instruction_bytes=64)
    info = _info(lerobot_root)
    del info["features"]["task_index"]
    (lerobot_root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="lerobot: --instructions 64: the dataset has no task_index feature"):
        lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False, instruction_bytes=64)
    assert not (tmp_path / "out.zarr").exists()


# ---- refusals -------------------------------------------------------------------


def _info(root: Path) -> dict:
    return json.loads((root / "meta/info.json").read_text())


def _edit_info(root: Path, **changes) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    info.update(changes)
    (root / "meta/info.json").write_text(json.dumps(info))


def _drop_rows(root: Path) -> None:
    path = root / lr.DATA_PATH.format(chunk_index=0, file_index=0)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 2), path)


def _cut_parquet(root: Path) -> None:
    path = root / lr.DATA_PATH.format(chunk_index=0, file_index=1)
    path.write_bytes(path.read_bytes()[:200])


def _drop_action(root: Path) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    del info["features"]["action"]
    (root / "meta/info.json").write_text(json.dumps(info))


def _declare_shape(root: Path, key: str, shape: list[int]) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][key]["shape"] = shape
    (root / "meta/info.json").write_text(json.dumps(info))


def _short_video(root: Path) -> None:
    path = root / lr.VIDEO_PATH.format(video_key="observation.images.top", chunk_index=0, file_index=1)
    encode_video(path, [frame_image(10 + k) for k in range(3)])


def _edit_data(root: Path, file_index: int, column: str, edit) -> None:
    """Rewrite one column of a data file: edit(values) -> new values (same length)."""
    path = root / lr.DATA_PATH.format(chunk_index=0, file_index=file_index)
    table = pq.read_table(path)
    i = table.column_names.index(column)
    values = np.array(table.column(column).to_pylist())
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(edit(values).tolist(), table.schema.field(i).type)),
                   path)


def _swap(x: np.ndarray, i: int, j: int) -> np.ndarray:
    x = x.copy()
    x[[i, j]] = x[[j, i]]
    return x


def _empty_episode(root: Path, e: int) -> None:
    """Episode e keeps its metadata row with length 0 and loses its frames; total_frames follows."""
    path = root / lr.DATA_PATH.format(chunk_index=0, file_index=FILE_OF[e])
    table = pq.read_table(path)
    pq.write_table(table.filter(pa.array(np.array(table.column("episode_index").to_pylist()) != e)), path)
    ep_path = root / lr.EPISODES_PATH.format(chunk_index=0, file_index=0)
    eps = pq.read_table(ep_path)
    i = eps.column_names.index("length")
    lengths = eps.column("length").to_pylist()
    lengths[e] = 0
    pq.write_table(eps.set_column(i, eps.schema.field(i), pa.array(lengths, eps.schema.field(i).type)), ep_path)
    _edit_info(root, total_frames=sum(lengths))


@pytest.mark.parametrize("mutate, match", [
    (lambda r: (r / "meta/info.json").unlink(), "not a LeRobot dataset root"),
    (lambda r: _edit_info(r, codebase_version="v2.1"), "older format.*convert_dataset_v21_to_v30"),
    (lambda r: _edit_info(r, codebase_version="v4.0"), "newer than supported"),
    (lambda r: _edit_info(r, codebase_version="v3.1"), "newer than supported"),
    (lambda r: _edit_info(r, total_frames=14), "total_frames=14: truncated"),
    (_drop_rows, "data files hold 13 frames.*truncated"),
    (lambda r: (r / lr.DATA_PATH.format(chunk_index=0, file_index=1)).unlink(), "missing data file"),
    (_cut_parquet, "unreadable"),
    (lambda r: (r / lr.VIDEO_PATH.format(video_key="observation.images.top", chunk_index=0, file_index=0)).unlink(),
     "missing video file"),
    (_short_video, "no video frame for episode 2 frame 3"),
    (_drop_action, "missing required feature.*action"),
    (lambda r: shutil.rmtree(r / "meta/episodes"), "missing episode metadata"),
    (lambda r: _edit_info(r, fps=0), "fps must be a positive number of frames per second, got 0"),
    (lambda r: _edit_info(r, fps="fast"), "fps must be a positive number of frames per second, got 'fast'"),
    (lambda r: _declare_shape(r, "action", [3]),
     r"feature action declares shape \[3\] in meta/info.json but its parquet column holds shape \[2\]"),
    (lambda r: _declare_shape(r, "observation.state", [2]),
     r"feature observation.state declares shape \[2\] in meta/info.json but its parquet column holds shape \[3\]"),
    (lambda r: _edit_data(r, 0, "timestamp", np.zeros_like), "episode 0 frame 1 has timestamp 0 s"),
    (lambda r: _edit_data(r, 0, "timestamp", lambda t: _swap(t, 1, 3)), "episode 0 frame 1 has timestamp 0.2 s"),
    (lambda r: _edit_info(r, fps=30), "episode 0 frame 1 has timestamp 0.0666.* s but frame_index / fps = 0.0333"),
    (lambda r: _empty_episode(r, 2), "lerobot: episode 2 has length 0"),
    (lambda r: _empty_episode(r, 1), "lerobot: episode 1 has length 0"),
    (lambda r: _edit_info(r, features={**_info(r)["features"], "action": "float32"}),
     r"features\['action'\] must be an object with dtype and shape, got \"float32\""),
    (lambda r: _edit_info(r, data_path=None), "data_path must be a path template string, got null"),
    (lambda r: _edit_info(r, video_path=5), "video_path must be a path template string or null, got 5"),
    (lambda r: _edit_info(r, data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
     r"data_path .* only the placeholders \{chunk_index\}, \{file_index\} \(KeyError: 'episode_chunk'\)"),
    (lambda r: _edit_info(r, total_frames="15"), "total_frames must be a non-negative integer, got \"15\""),
    (lambda r: _declare_shape(r, "action", "2"), r"features\['action'\].shape must be a list of non-negative"),
    (lambda r: _edit_data(r, 0, "action", lambda a: np.where(np.arange(len(a))[:, None] == 7, np.nan, a)),
     r"lerobot: feature action holds NaN or inf at episode 1 frame 1"),
    (lambda r: _edit_data(r, 1, "observation.state", lambda x: np.where(np.arange(len(x))[:, None] == 2, np.inf, x)),
     r"lerobot: feature observation.state holds NaN or inf at episode 2 frame 2"),
], ids=["no-info", "v2.1", "v4.0", "v3.1", "total-frames", "dropped-rows", "missing-data-file", "cut-parquet",
        "missing-video", "short-video", "no-action", "no-episodes-meta", "fps-zero", "fps-text", "action-shape",
        "state-shape", "timestamps-zero", "timestamps-swapped", "wrong-fps", "empty-last-episode",
        "empty-middle-episode",
        "feature-not-object", "data-path-null", "video-path-int", "data-path-placeholders", "total-frames-text",
        "shape-text", "nan-action",
        "inf-state"])
def test_import_refusals(lerobot_root, tmp_path, mutate, match):
    mutate(lerobot_root)
    with pytest.raises(DatasetError, match=match):
        lr.import_lerobot(lerobot_root, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


# ---- training straight from a LeRobot root ----------------------------------------


def test_open_dataset_imports_once(lerobot_root, monkeypatch, capsys):
    store = open_dataset(lerobot_root)
    caches = list((lerobot_root / ".polcache").glob("episodes-*.zarr"))
    assert len(caches) == 1 and store.path == caches[0]
    assert f"imported LeRobot root {lerobot_root} into {caches[0]}: used again while the root is unchanged (delete " \
           f"it to free the space)" in capsys.readouterr().out  # where the space went: said once, at the import
    ds = SequenceDataset(store, horizon=4, n_obs_steps=2, keys=["state", "image_top"])
    item = ds[len(ds) - 1]
    assert len(ds) == 15 and item["obs"]["image_top"].shape == (2, H, W, 3) and item["action"].shape == (4, 2)

    def no_import(*a, **k):
        raise AssertionError("imported again")

    monkeypatch.setattr(lr, "import_lerobot", no_import)
    assert open_dataset(lerobot_root).path == caches[0] and "imported" not in capsys.readouterr().out
    # an import killed between its two renames (no atomic exchange) left the cache aside: put back, not redone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    caches[0].rename(caches[0].with_name(f".{caches[0].name}.old-{dead}-0a1b2c3d"))
    assert open_dataset(lerobot_root).path == caches[0] and caches[0].is_dir()

    monkeypatch.undo()  # a changed dataset is imported again and the stale copy removed
    data = lerobot_root / lr.DATA_PATH.format(chunk_index=0, file_index=0)
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    fresh = open_dataset(lerobot_root)
    assert fresh.path != caches[0] and list((lerobot_root / ".polcache").glob("episodes-*.zarr")) == [fresh.path]


def test_failed_import_lock_does_not_block_and_is_swept(lerobot_root):
    """A failed import leaves only its lock file (flock is released, so nothing waits on it); the next
    successful import removes it with the stale caches."""
    good = lerobot_root / lr.DATA_PATH.format(chunk_index=0, file_index=0)
    saved = good.read_bytes()
    _edit_data(lerobot_root, 0, "action", lambda a: np.where(np.arange(len(a))[:, None] == 7, np.nan, a))
    with pytest.raises(DatasetError, match="NaN or inf"):
        open_dataset(lerobot_root)
    assert [p.name for p in (lerobot_root / ".polcache").iterdir()][0].endswith(".zarr.lock")
    good.write_bytes(saved)
    store = open_dataset(lerobot_root)
    assert sorted(p.name for p in (lerobot_root / ".polcache").iterdir()) == [f".{store.path.name}.lock",
                                                                            store.path.name]


def test_open_dataset_read_only_root_uses_user_cache(lerobot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (lerobot_root / ".polcache").write_text("")  # the cache directory cannot be created here
    store = open_dataset(lerobot_root)
    assert store.path.parent == tmp_path / "xdg/polcache/lerobot" and store.num_episodes == 3
    # another root's copy stays; this root's copy of its dataset as it was before goes (it piled up, images and all)
    other = store.path.parent / "0123456789ab-0123456789abcdef.zarr"
    other.mkdir()
    info = lerobot_root / lr.INFO_PATH
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))  # the dataset changed
    again = open_dataset(lerobot_root)
    assert again.path != store.path and sorted(p.name for p in store.path.parent.glob("*.zarr")) == sorted(
        [other.name, again.path.name])


def test_a_language_policy_trains_from_a_root_on_its_task_strings(lerobot_root):
    """dataset=ROOT for a VLA: the root's task strings become its instructions, in a copy of their own
    beside the one without (a DP-T on the same root keeps it), both kept when either is opened."""
    from polcache.config import load_config
    from polcache.train.loop import dataset_source

    plain = open_dataset(lerobot_root)
    cfg = load_config("configs/vla_mt10.yaml", [f"dataset={lerobot_root}", "obs_keys=[state,instruction]",
                                                "policy.vla.instruction_bytes=32"])
    store = dataset_source(cfg).store
    assert store.obs_spec()["instruction"].shape == (32,) and "instruction" not in plain.obs_keys
    assert open_dataset(lerobot_root).path == plain.path and open_dataset(lerobot_root, instruction_bytes=32).path \
        == store.path
    assert sorted(p.name for p in (lerobot_root / ".polcache").glob("episodes-*.zarr")) == sorted(
        [plain.path.name, store.path.name])
    cfg.policy.vla.instruction_bytes = 2  # too narrow for the root's tasks: named as training sets it
    with pytest.raises(DatasetError, match=r": policy\.vla\.instruction_bytes=2: episode \d+'s task .* give "
                                           r"policy\.vla\.instruction_bytes=\d+ or more$"):
        dataset_source(cfg)


def test_open_dataset_zarr_and_bad_paths(polcache_ds, tmp_path):
    assert open_dataset(polcache_ds).num_steps == 16
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")


# ---- CLI ------------------------------------------------------------------------------


def test_cli_round_trip(polcache_ds, tmp_path, capsys):
    out, back = tmp_path / "lerobot", tmp_path / "back.zarr"
    assert main(["data", "export-lerobot", str(polcache_ds), "--out", str(out), "--no-progress"]) == 0
    assert main(["data", "import-lerobot", str(out), "--out", str(back), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "LeRobotDataset v3.0, 3 episodes, 16 frames at 20 fps" in text and "3 episodes, 16 frames" in text
    assert EpisodeStore.open(back).attrs["fps"] == 20
    assert main(["data", "import-lerobot", str(out), "--out", str(back), "--instructions", "--no-progress"]) == 0
    assert EpisodeStore.open(back).obs_spec()["instruction"].shape == (64,)  # record's default width
    assert main(["data", "import-lerobot", str(out), "--out", str(back), "--image-size", "8x12", "--no-progress"]) == 0
    assert EpisodeStore.open(back).obs_spec()["image_front"].shape == (8, 12, 3)
    assert main(["data", "import-lerobot", str(out), "--out", str(back), "--image-size", "8", "--no-progress"]) == 0
    assert EpisodeStore.open(back).obs_spec()["image_front"].shape == (8, 8, 3)  # N: a square, as record's flag


@pytest.mark.parametrize("value", ["96x", "0x96", "0", "96x96x3", "4x-8", "5000x96", "axb"])
def test_cli_image_size_is_checked(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import-lerobot", str(tmp_path), "--out", str(tmp_path / "x.zarr"), "--image-size", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polcache data import-lerobot: error: argument --image-size: expected HxW") and \
        len(err.splitlines()) == 1, err


def test_cli_bad_root(tmp_path, capsys):
    (tmp_path / "old/meta").mkdir(parents=True)
    (tmp_path / "old/meta/info.json").write_text(json.dumps({"codebase_version": "v2.1"}))
    assert main(["data", "import-lerobot", str(tmp_path / "old"), "--out", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polcache data import-lerobot: error:") and "v2.1" in err and len(err.splitlines()) == 1


def test_cli_hub_id_says_only_local_roots_are_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no lerobot/pusht folder is
    assert main(["data", "import-lerobot", "lerobot/pusht", "--out", "x.zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("polcache data import-lerobot: error: lerobot/pusht: no such folder; a Hugging Face Hub id is not "
                   "downloaded, only a local dataset root is read: download it first (`huggingface-cli download "
                   "lerobot/pusht --repo-type dataset --local-dir DIR`, or huggingface_hub.snapshot_download("
                   "'lerobot/pusht', repo_type='dataset', local_dir=DIR)) and pass DIR")
    (tmp_path / "lerobot/pusht").mkdir(parents=True)  # a folder of that name: it is what was meant
    assert main(["data", "import-lerobot", "lerobot/pusht", "--out", "x.zarr"]) == 2
    assert capsys.readouterr().err.strip().endswith("lerobot/pusht: not a LeRobot dataset root (no meta/info.json)")


def test_train_names_a_hub_id_as_one(tmp_path, capsys, monkeypatch):
    """`train dataset=lerobot/pusht` said only that the dataset does not exist."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs/recommended_cpu.yaml"), "dataset=lerobot/pusht",
                 "out=run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polcache train: error: lerobot/pusht: no such folder; a Hugging Face Hub id is not "
                          "downloaded") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "data").mkdir()  # a mistyped local path is not sent to the Hub
    for typo in ("data/nope.zarr", "dta/nope.zarr", "data/nope"):
        assert main(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs/recommended_cpu.yaml"),
                     f"dataset={typo}", "out=run"]) == 2
        assert capsys.readouterr().err.strip() == f"polcache train: error: {typo}: dataset does not exist"


def test_training_on_a_root_with_large_cameras_says_how_to_import_them_smaller(tmp_path, capsys):
    """dataset=ROOT trained on ALOHA's 480x640 images as imported, slowly, without a word of --image-size."""
    from polcache.config import ExperimentConfig
    from polcache.train.loop import dataset_source

    cfg = ExperimentConfig(dataset=str(exported_root(tmp_path, "big", episodes=1, length=4, hw=(144, 160))),
                           obs_keys=["state", "image_front"])
    dataset_source(cfg)
    assert capsys.readouterr().err.strip() == (
        f"note: {cfg.dataset} is imported with its cameras at their own size (image_front 144x160), and the policy "
        f"trains on those; for smaller images, `polcache data import-lerobot {cfg.dataset} --image-size 96x96 --out "
        "DATA.zarr` and dataset=DATA.zarr")
    dataset_source(ExperimentConfig(dataset=str(exported_root(tmp_path, "small", episodes=1, length=4)),
                                    obs_keys=["state", "image_front"]))
    assert capsys.readouterr().err == ""


# ---- lerobot itself ----------------------------------------------------------------------


def test_lerobot_loads_our_export(polcache_ds, tmp_path):
    lerobot = pytest.importorskip("lerobot.datasets.lerobot_dataset",
                                  reason="lerobot is not installable next to this torch build (it pins its own torch)")
    out = tmp_path / "exported"
    lr_export.export_lerobot(polcache_ds, out, progress=False)
    ds = lerobot.LeRobotDataset("local/polcache-export", root=out, video_backend="pyav")
    assert ds.num_episodes == 3 and ds.num_frames == 16 and ds.fps == 20
    item = ds[6]
    src = EpisodeStore.open(polcache_ds)
    np.testing.assert_allclose(item["observation.state"].numpy(), src.array("state")[6])
    assert item["task"] == "b" and tuple(item["observation.images.front"].shape) == (3, H, W)
    got = (item["observation.images.front"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert_images_close(got, src.array("image_front")[6])


def test_an_output_inside_a_lerobot_root_is_refused_as_an_export_would_wipe_it(tmp_path):
    """export-lerobot replaces its root whole: a dataset imported into it, a training run or an eval
    result put there vanished at the next export without a word. Its own import cache is exempt."""
    from polcache.errors import PolcacheError
    from polcache.outputs import LEROBOT_CACHE, check_output, enclosing_output

    root = tmp_path / "lr"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text("{}")
    with pytest.raises(PolcacheError, match=r"is inside .*lr, a LeRobot dataset, which is replaced whole"):
        check_output(root / "x.zarr", "a polcache dataset", folder=True, whole=True)
    with pytest.raises(PolcacheError, match="a LeRobot dataset, which is replaced whole"):
        check_output(root / "eval.json", "an eval result (JSON)", folder=False)
    assert enclosing_output(root / "run") == (root.resolve(), "a LeRobot dataset")  # training's out=
    assert enclosing_output(root / LEROBOT_CACHE / "episodes-abc.zarr") is None


@pytest.mark.parametrize("array, row, said", [("data/action", 6, "action holds NaN or inf at episode 1 frame 1"),
                                              ("data/obs/state", 13, "observation.state holds NaN or inf at episode 2 "
                                                                 "frame 1")])
def test_export_refuses_nan_naming_episode_and_frame(polcache_ds, tmp_path, array, row, said):
    """A NaN written into a dataset after recording was exported: the root's stats.json held bare
    NaN (not JSON), and import and training refused the root."""
    import zarr

    column = zarr.open_group(str(polcache_ds), mode="r+")[array]
    values = column[:]
    values[row, 0] = np.nan
    column[:] = values
    with pytest.raises(DatasetError, match=f"{said}; nothing was written"):
        lr_export.export_lerobot(polcache_ds, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
