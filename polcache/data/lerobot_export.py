"""LeRobotDataset v3.0 out: a polcache dataset written as a LeRobot root (polcache.data.lerobot
describes the layout and reads it back). Videos are written with libx264 (H.264), yuv420p, crf 10,
a keyframe every 2 frames (lerobot's GOP, for cheap random access): near-lossless at the sizes
policies use, decodable by every lerobot video backend, and fast on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from polcache.atomic import atomic_directory
from polcache.config import EMBEDDING_KEY, INSTRUCTION_KEY
from polcache.data.lerobot import (ACTION, CODEBASE_VERSION, DATA_PATH, EPISODES_PATH, IMAGES_PREFIX, INDEX_FEATURES,
                                   INFO_PATH, STATE, STATS_PATH, TASKS_PATH, VIDEO_PATH, is_lerobot_root, require_av,
                                   require_pyarrow)
from polcache.data.store import EpisodeStore, first_non_finite
from polcache.errors import DatasetError
from polcache.outputs import check_output
from polcache.policy.language import InstructionError, decode_instruction, encode_instruction

CHUNKS_SIZE = 1000  # lerobot's defaults: files per chunk directory, MB per data / video file
DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200
CODEC, CODEC_NAME, PIX_FMT, GOP = "libx264", "h264", "yuv420p", 2
DEFAULT_CRF = 10
DEFAULT_FPS = 10


@dataclass(frozen=True)
class ExportReport:
    path: Path
    episodes: int
    frames: int
    fps: int
    video_keys: list[str]
    codec: str


def check_lerobot_output(out: str | Path, flag: str | None = None) -> Path:
    """Refuse, before any work, an export root that is not a LeRobot dataset (see check_output)."""
    return check_output(out, "a LeRobot dataset", folder=True, ours=is_lerobot_root, flag=flag, error=DatasetError,
                        whole=True)


class _VideoWriter:
    """One camera's mp4: frames get consecutive pts at 1/fps, so frame g sits at g / fps seconds."""

    def __init__(self, path: Path, fps: int, crf: int, width: int, height: int):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self._frame = av.VideoFrame
        self._container = av.open(str(path), "w")
        self._stream = self._container.add_stream(CODEC, rate=fps, options={"crf": str(crf), "g": str(GOP)})
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, PIX_FMT
        self._pts = 0

    def write(self, images: np.ndarray) -> None:
        for img in images:
            frame = self._frame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self._pts
            self._pts += 1
            self._container.mux(self._stream.encode(frame))

    def finish(self) -> None:
        """Flush the encoder; the file is complete once close() follows."""
        self._container.mux(self._stream.encode())

    def close(self) -> None:
        self._container.close()


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """min/max/mean/std/count over frames of a (T, D) array, in float64."""
    x = x.astype(np.float64)
    return {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}


def _image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 (T, H, W, 3) images scaled to [0, 1], shaped (3, 1, 1) as lerobot keeps them.
    Exact, from a 256-bin histogram per channel, so no float copy of the frames is made."""
    flat = images.reshape(-1, 3)
    hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    levels = np.arange(256) / 255.0
    n = hist.sum(1)
    mean = hist @ levels / n
    std = np.sqrt(np.maximum(hist @ levels**2 / n - mean**2, 0.0))
    lo = np.array([levels[np.flatnonzero(h)[0]] for h in hist])
    hi = np.array([levels[np.flatnonzero(h)[-1]] for h in hist])
    stats = {k: v.reshape(3, 1, 1) for k, v in (("min", lo), ("max", hi), ("mean", mean), ("std", std))}
    return {**stats, "count": np.array([len(images)])}


def _aggregate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Dataset stats from per-episode stats (count-weighted mean and pooled variance, as lerobot does)."""
    n = np.array([p["count"][0] for p in parts], np.float64)
    shape = (-1,) + (1,) * parts[0]["mean"].ndim
    w = (n / n.sum()).reshape(shape)
    means = np.stack([p["mean"] for p in parts])
    mean = (w * means).sum(0)
    var = (w * (np.stack([p["std"] for p in parts]) ** 2 + means**2)).sum(0) - mean**2
    return {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
            "mean": mean, "std": np.sqrt(np.maximum(var, 0.0)), "count": np.array([int(n.sum())])}


def _export_fps(fps: float | None, attrs: dict[str, Any]) -> int:
    if fps is not None and "fps" in attrs and fps != attrs["fps"]:  # timestamps would claim another control rate
        raise DatasetError(f"--fps {fps:g}: the dataset's frames are {attrs['fps']!r} per second (its fps attr); "
                           f"leave --fps out (it is for datasets that do not record their rate)")
    value = fps if fps is not None else attrs.get("fps", DEFAULT_FPS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
        raise DatasetError(f"fps must be a positive integer for LeRobot (info.json stores an int), got {value!r}")
    return int(value)


def _vector_feature(dim: int, names: Any, prefix: str) -> dict[str, Any]:
    ok = isinstance(names, list) and len(names) == dim
    return {"dtype": "float32", "shape": [dim], "names": list(names) if ok else [f"{prefix}_{i}" for i in range(dim)]}


def _features(store: EpisodeStore, video_keys: dict[str, str], fps: int, crf: int) -> dict[str, dict[str, Any]]:
    """info.json's feature table for an exported store (polcache key -> LeRobot key in video_keys)."""
    spec, attrs = store.obs_spec(), store.attrs
    features: dict[str, dict[str, Any]] = {}
    if "state" in spec:
        features[STATE] = _vector_feature(spec["state"].shape[0], attrs.get("state_names"), "state")
    features[ACTION] = _vector_feature(store.action_dim, attrs.get("action_names"), "action")
    for k, vk in video_keys.items():
        h, w, c = spec[k].shape
        features[vk] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"], "info": {
            "video.height": h, "video.width": w, "video.codec": CODEC_NAME, "video.pix_fmt": PIX_FMT,
            "video.fps": fps, "video.channels": c, "video.g": GOP, "video.crf": crf, "is_depth_map": False,
            "has_audio": False}}
    for name, dtype in INDEX_FEATURES.items():
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def _fixed_list(x: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).ravel()), x.shape[1])


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """Write the task table the way pandas does (task strings as the index), so lerobot's
    pd.read_parquet(...).loc[task] works."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), path)


def _instruction_texts(dataset: str | Path, e: int, instruction: np.ndarray) -> list[str]:
    """Each frame's instruction as text, for its LeRobot task string. Checked as encode_instruction
    checks what it encodes (UTF-8, no NUL inside, not empty), so import can encode it back; each
    distinct row is decoded once (record repeats one instruction through an episode)."""
    rows, first, inverse = np.unique(instruction, axis=0, return_index=True, return_inverse=True)
    texts = []
    for row, k in zip(rows, first):
        try:
            texts.append(decode_instruction(encode_instruction(row.tobytes().rstrip(b"\0"), len(row))))
        except InstructionError as exc:
            raise DatasetError(f"{dataset}: episode {e} frame {k}: {exc}") from None
    return [texts[i] for i in inverse.reshape(-1)]


def _lists(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: v.tolist() for k, v in stats.items()}


def _check_exportable(dataset: str | Path, obs_keys: list[str], spec: dict[str, Any], cams: list[str]) -> None:
    """Refuse what a LeRobot root cannot hold here: dropped in silence, the root would hold less than
    the dataset (an embedding store: nothing); odd image sides, which the video codec cannot encode."""
    unwritten = [k for k in obs_keys if k not in ("state", INSTRUCTION_KEY) and k not in cams]
    if unwritten:
        raise DatasetError(f"{dataset}: observation {', '.join(map(repr, unwritten))} has no LeRobot feature here "
                           f"(exported: state, image_* cameras, instruction)"
                           + ("; an embedding store (`ptp embed`) is derived: export the dataset it was made from"
                              if EMBEDDING_KEY in unwritten else ""))
    for k in cams:
        h, w = spec[k].shape[:2]
        if h % 2 or w % 2:
            raise DatasetError(f"{dataset}: {k} is {h}x{w}; {CODEC} with {PIX_FMT} needs even image sizes "
                               f"(polcache does not resize)")


def _check_finite(dataset: str | Path, store: EpisodeStore) -> None:
    """Refuse a NaN or inf in the state or action, naming the episode and frame: exported, it made a
    root whose stats.json is not JSON and which import (and training) refuse."""
    exported = {ACTION: "action"} | ({STATE: "state"} if "state" in store.obs_keys else {})
    for key, name in exported.items():
        if (at := first_non_finite(store.array(name), store.episode_starts)) is not None:
            raise DatasetError(f"{dataset}: {key} holds NaN or inf at episode {at[0]} frame {at[1]}; nothing was "
                               f"written")


def _write_meta(tmp: Path, store: EpisodeStore, rows: list[dict[str, Any]], tasks: list[str],
                ep_stats: list[dict[str, dict[str, np.ndarray]]], fps: float, crf: int, video_keys: dict[str, str]
                ) -> None:
    """The root's meta/ files once its frames and videos are written: episodes, tasks, stats, info."""
    pa, pq = require_pyarrow()
    episodes_path = tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path, compression="snappy")
    _write_tasks(tmp / TASKS_PATH, tasks)
    stats_json = {name: _lists(_aggregate([s[name] for s in ep_stats])) for name in ep_stats[0]}
    (tmp / STATS_PATH).write_text(json.dumps(stats_json, indent=2))
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": store.attrs.get("robot_type"),
        "total_episodes": store.num_episodes, "total_frames": store.num_steps, "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILES_SIZE_IN_MB,
        "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB, "fps": fps,
        "splits": {"train": f"0:{store.num_episodes}"}, "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video_keys else None, "features": _features(store, video_keys, fps, crf)}
    (tmp / INFO_PATH).write_text(json.dumps(info, indent=4))


def export_lerobot(dataset: str | Path, out: str | Path, fps: float | None = None, crf: int = DEFAULT_CRF,
                   progress: bool = True) -> ExportReport:
    """Write a polcache dataset as a LeRobotDataset v3.0 root at `out`, atomically: a sibling temp
    directory is filled and renamed, so a failed export leaves nothing. fps: the dataset's `fps`
    attr unless given, else DEFAULT_FPS. An existing `out` is replaced only if it is a LeRobot root.
    Each frame's task string is its `instruction` observation's text where the dataset has one
    (lerobot's language field), else its episode's task."""
    pa, pq = require_pyarrow()
    store = EpisodeStore.open(dataset)
    out = Path(out)
    fps = _export_fps(fps, store.attrs)
    check_lerobot_output(out)
    spec = store.obs_spec()
    cams = [k for k in store.obs_keys if k.startswith("image_")]
    _check_exportable(dataset, store.obs_keys, spec, cams)
    _check_finite(dataset, store)
    if cams:
        require_av()
    video_keys = {k: IMAGES_PREFIX + k[len("image_"):] for k in cams}
    has_state, has_instruction = "state" in store.obs_keys, INSTRUCTION_KEY in store.obs_keys
    task_index: dict[str, int] = {}  # task string -> task_index, numbered in order of first use

    rows: list[dict[str, Any]] = []
    ep_stats: list[dict[str, dict[str, np.ndarray]]] = []
    with atomic_directory(out) as tmp:
        writers: dict[str, _VideoWriter] = {}
        data_path = tmp / DATA_PATH.format(chunk_index=0, file_index=0)
        data_path.parent.mkdir(parents=True)
        data_writer = None
        try:
            for k in cams:
                h, w = spec[k].shape[:2]
                writers[k] = _VideoWriter(tmp / VIDEO_PATH.format(video_key=video_keys[k], chunk_index=0,
                                                                      file_index=0), fps, crf, w, h)
            start = 0
            bar = tqdm(total=store.num_steps, desc="encode video" if cams else "write frames", unit="frame",
                       disable=not progress)
            with bar:
                for e in range(store.num_episodes):
                    ep = store.episode(e)
                    n = len(ep.action)
                    frame_index = np.arange(n, dtype=np.int64)
                    frame_tasks = (_instruction_texts(dataset, e, ep.obs[INSTRUCTION_KEY]) if has_instruction
                                   else [ep.task] * n)
                    cols = {
                        **({STATE: ep.obs["state"]} if has_state else {}), ACTION: ep.action,
                        "timestamp": (frame_index / fps).astype(np.float32), "frame_index": frame_index,
                        "episode_index": np.full(n, e, np.int64), "index": start + frame_index,
                        "task_index": np.array([task_index.setdefault(t, len(task_index)) for t in frame_tasks],
                                               np.int64)}
                    table = pa.table({name: _fixed_list(x) if x.ndim == 2 else pa.array(x)
                                      for name, x in cols.items()})
                    if data_writer is None:
                        data_writer = pq.ParquetWriter(str(data_path), table.schema, compression="snappy")
                    data_writer.write_table(table)  # one row group per episode, as lerobot writes
                    stats = {name: _stats(x if x.ndim == 2 else x[:, None]) for name, x in cols.items()}
                    row: dict[str, Any] = {
                        "episode_index": e, "tasks": list(dict.fromkeys(frame_tasks)), "length": n,
                        "data/chunk_index": 0,
                        "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + n}
                    for k, vk in video_keys.items():
                        writers[k].write(ep.obs[k])
                        stats[vk] = _image_stats(ep.obs[k])
                        row |= {f"videos/{vk}/chunk_index": 0, f"videos/{vk}/file_index": 0,
                                f"videos/{vk}/from_timestamp": start / fps,
                                f"videos/{vk}/to_timestamp": (start + n) / fps}
                    row |= {f"stats/{name}/{s}": v.tolist() for name, st in stats.items() for s, v in st.items()}
                    row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
                    rows.append(row)
                    ep_stats.append(stats)
                    start += n
                    bar.update(n)
            for writer in writers.values():
                writer.finish()
        finally:
            for writer in writers.values():
                writer.close()
            if data_writer is not None:
                data_writer.close()

        _write_meta(tmp, store, rows, list(task_index), ep_stats, fps, crf, video_keys)
    return ExportReport(out, store.num_episodes, store.num_steps, fps, list(video_keys.values()), CODEC_NAME)


