"""LeRobotDataset v3.0 in (its export, out: polcache.data.lerobot_export), and training straight from
a LeRobot root.

A v3.0 root, as lerobot writes it (many episodes per file; episodes located through metadata):

    meta/info.json                  codebase_version "v3.0", fps, features, totals, path templates
    meta/stats.json                 per feature min/max/mean/std/count (images: per channel, in [0, 1])
    meta/tasks.parquet              task string (the pandas index) -> task_index
    meta/episodes/chunk-*/file-*.parquet
                                    one row per episode: length, tasks, dataset_from/to_index, the data
                                    file holding it, and per camera the video file and its
                                    [from_timestamp, to_timestamp) span in it; per-episode stats/...
    data/chunk-*/file-*.parquet     one row per frame: observation.state, action, timestamp,
                                    frame_index, episode_index, index, task_index
    videos/<key>/chunk-*/file-*.mp4 one stream per camera, episodes back to back

Mapping to polcache's episode store: observation.state <-> "state", action <-> action,
observation.images.<cam> (or observation.image, as camera "main") <-> "image_<cam>", and the
per-frame task_index (through tasks.parquet) <-> Episode.task. An "instruction" observation is
language, and LeRobot's place for language is the task string: export writes each frame's
instruction as its task (instead of Episode.task), and import with instruction_bytes turns each
frame's task back into that observation. Images keep their size unless import is given
image_size: then every camera is resized to it as frames are decoded (swscale, area averaging).
Import decodes and writes one episode at a time, so its memory is about one episode's images.

Export's videos are yuv420p, which halves chroma resolution, so image round trips are close, not
exact; state and action round-trip exactly.

pyarrow and PyAV are an optional extra, imported only when a LeRobot dataset is touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from polcache.atomic import restore
from polcache.config import INSTRUCTION_KEY
from polcache.data.store import Episode, EpisodeStore, check_dataset_output, dataset_writer, first_non_finite
from polcache.errors import DatasetError, cut_short
from polcache.extras import install_hint
from polcache.outputs import LEROBOT_CACHE, LEROBOT_INFO
from polcache.policy.language import InstructionError, encode_instruction

CODEBASE_VERSION = "v3.0"
INSTRUCTIONS_FLAG = "--instructions {}"  # import-lerobot's, which gives an import its instruction width
INFO_PATH = LEROBOT_INFO  # what marks a root
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"

HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name, as the Hugging Face Hub names a dataset

STATE, ACTION = "observation.state", "action"
IMAGES_PREFIX = "observation.images."
SINGLE_IMAGE, SINGLE_IMAGE_CAMERA = "observation.image", "main"
# Per-frame bookkeeping columns every v3.0 dataset has (lerobot's DEFAULT_FEATURES).
INDEX_FEATURES: dict[str, str] = {
    "timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64",
}
REQUIRED_INDEX_FEATURES = ("timestamp", "frame_index", "episode_index")

# Import's resize (swscale): area averaging, where every source pixel counts when shrinking (no aliasing
# from skipped pixels, unlike point or plain bilinear sampling); it is bilinear when enlarging.
RESIZE_INTERPOLATION = "AREA"
MAX_IMAGE_SIDE = 4096  # as a rendered image's side (cli_types.image_size): a typo would ask for a huge frame
_CACHE_VERSION = 1  # bump when import output changes, so stale caches are rebuilt
_INSTALL_HINT = install_hint("pyarrow")


@dataclass(frozen=True)
class ImportReport:
    path: Path
    episodes: int
    frames: int
    obs_keys: list[str]
    fps: int
    skipped: list[str]  # LeRobot features polcache has no place for, with the reason


def require_pyarrow() -> tuple[Any, Any]:
    """pyarrow and its parquet module (an optional extra), or one line saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"LeRobot datasets need pyarrow: {_INSTALL_HINT}") from None
    return pa, pq


def require_av() -> Any:
    """PyAV, for the datasets' videos (an optional extra), or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise DatasetError(f"LeRobot datasets need PyAV (av) for their videos: {_INSTALL_HINT}") from None
    return av


def is_lerobot_root(path: str | Path) -> bool:
    """A LeRobot dataset root is a directory with meta/info.json (of any version)."""
    return (Path(path) / INFO_PATH).is_file()


# ---- import -----------------------------------------------------------------


def _check_version(root: Path, version: Any) -> None:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", str(version))
    if m is None:
        raise DatasetError(f"{root}: {INFO_PATH} has no valid codebase_version (got {version!r}); "
                           f"expected {CODEBASE_VERSION}")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < (3, 0):
        how = ("convert it with lerobot's converter: python -m lerobot.scripts.convert_dataset_v21_to_v30 "
               f"--repo-id=<user/name> --root={root} --push-to-hub=false")
        if (major, minor) < (2, 1):
            how = "convert it to v2.1 with an older lerobot release, then " + how
        raise DatasetError(f"{root}: LeRobotDataset {version} is an older format; only {CODEBASE_VERSION} is "
                           f"supported; {how}")
    if (major, minor) > (3, 0):
        raise DatasetError(f"{root}: LeRobotDataset {version} is newer than supported ({CODEBASE_VERSION})")


def refuse_hub_id(path: Path) -> None:
    """A missing folder named like a Hub id (owner/name) was most likely meant as one: say that
    nothing is downloaded and how to get it, rather than only that the folder does not exist. Not a
    path whose folder is here or that names a zarr store (`data/nope.zarr`: a mistyped local path)."""
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)) and not path.parent.exists() and path.suffix != ".zarr":
        raise DatasetError(f"{path}: no such folder; a Hugging Face Hub id is not downloaded, only a local dataset "
                           f"root is read: download it first (`huggingface-cli download {path} --repo-type dataset "
                           f"--local-dir DIR`, or huggingface_hub.snapshot_download('{path}', repo_type='dataset', "
                           f"local_dir=DIR)) and pass DIR")


def read_info(root: str | Path) -> dict[str, Any]:
    """meta/info.json of a v3.0 root, refusing anything else with the reason."""
    root = Path(root)
    path = root / INFO_PATH
    if not path.is_file():
        refuse_hub_id(root)
        raise DatasetError(f"{root}: not a LeRobot dataset root (no {INFO_PATH})")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: not a JSON object")
    _check_version(root, info.get("codebase_version"))
    missing = [k for k in ("fps", "features", "total_episodes", "total_frames", "data_path") if k not in info]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)}")
    fps = info["fps"]
    if type(fps) not in (int, float) or not 0 < fps < 10_000:  # frames are timed as index / fps
        raise DatasetError(f"{path}: fps must be a positive number of frames per second, got {fps!r}")
    _check_info_types(path, info)
    return info


def _check_info_types(path: Path, info: dict[str, Any]) -> None:
    """Every info.json field the import reads must have the type lerobot writes: one line naming it."""
    def bad(field: str, expected: str, got: Any) -> DatasetError:
        return DatasetError(f"{path}: {field} must be {expected}, got {json.dumps(got)[:80]}")

    for key in ("total_episodes", "total_frames"):
        if type(info[key]) is not int or info[key] < 0:
            raise bad(key, "a non-negative integer", info[key])
    templates = {"data_path": ("chunk_index", "file_index"), "video_path": ("video_key", "chunk_index", "file_index")}
    for key, fields in templates.items():
        template = info.get(key)
        if key == "video_path" and template is None:
            continue
        if not isinstance(template, str):
            raise bad(key, "a path template string" + (" or null" if key == "video_path" else ""), template)
        try:
            template.format(**{f: "x" if f == "video_key" else 0 for f in fields})
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise DatasetError(f"{path}: {key} {template!r} is not a path template with only the placeholders "
                               f"{', '.join('{' + f + '}' for f in fields)} ({type(e).__name__}: {e})") from None
    if info.get("robot_type") is not None and not isinstance(info["robot_type"], str):
        raise bad("robot_type", "a string or null", info["robot_type"])
    features = info["features"]
    if not isinstance(features, dict):
        raise bad("features", "an object (feature name -> {dtype, shape, ...})", features)
    for name, ft in features.items():
        if not isinstance(ft, dict):
            raise bad(f"features[{name!r}]", "an object with dtype and shape", ft)
        if "dtype" in ft and not isinstance(ft["dtype"], str):
            raise bad(f"features[{name!r}].dtype", "a string", ft["dtype"])
        shape = ft.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"features[{name!r}].shape", "a list of non-negative integers", shape)
        if ft.get("info") is not None and not isinstance(ft["info"], dict):
            raise bad(f"features[{name!r}].info", "an object or null", ft["info"])


def _camera(key: str) -> str | None:
    if key.startswith(IMAGES_PREFIX) and len(key) > len(IMAGES_PREFIX):
        return key[len(IMAGES_PREFIX):]
    return SINGLE_IMAGE_CAMERA if key == SINGLE_IMAGE else None


def _image_hw(ft: dict) -> tuple[int, int] | None:
    """(height, width) of an RGB camera feature, None if it is not 3-channel colour (depth, grey)."""
    shape, names = list(ft.get("shape") or []), [str(n) for n in (ft.get("names") or [])]
    info = ft.get("info") or {}
    if len(shape) != 3 or info.get("is_depth_map") or info.get("video.is_depth_map"):
        return None
    if names and names[0].startswith("channel"):  # (C, H, W), as some older datasets declare
        c, h, w = shape
    else:
        h, w, c = shape
    return (int(h), int(w)) if c == 3 else None


def _plan(root: Path, info: dict) -> tuple[dict[str, tuple[str, tuple[int, int]]], list[str]]:
    """Cameras to import (polcache key -> (LeRobot key, (H, W))) and the features left out, with why."""
    features = info["features"]  # types checked by read_info
    missing = [k for k in (ACTION, *REQUIRED_INDEX_FEATURES) if k not in features]
    if missing:
        raise DatasetError(f"{root}: missing required feature(s) {', '.join(missing)} in {INFO_PATH}")
    for key in (STATE, ACTION):
        ft = features.get(key)
        if ft is not None and (len(ft.get("shape") or []) != 1 or ft.get("dtype") in ("video", "image", "string")):
            raise DatasetError(f"{root}: feature {key} must be a numeric vector, got dtype {ft.get('dtype')} "
                               f"shape {ft.get('shape')}")
    cameras: dict[str, tuple[str, tuple[int, int]]] = {}
    skipped = []
    for key, ft in features.items():
        if key in (STATE, ACTION) or key in INDEX_FEATURES:
            continue
        cam = _camera(key)
        if cam is None or ft.get("dtype") not in ("video", "image"):
            skipped.append(f"{key} (no polcache counterpart)")
        elif (hw := _image_hw(ft)) is None:
            skipped.append(f"{key} (not an RGB image: shape {ft.get('shape')})")
        else:
            cameras[f"image_{cam}"] = (key, hw)
    if STATE not in features and not cameras:
        raise DatasetError(f"{root}: no observation.state and no RGB camera feature: nothing to use as observation")
    if any(features[k]["dtype"] == "video" for k, _ in cameras.values()) and not info.get("video_path"):
        raise DatasetError(f"{root}: {INFO_PATH} has video features but no video_path")
    return cameras, skipped


def _read_parquet(root: Path, path: Path, columns: list[str] | None, what: str) -> Any:
    """Read `columns` (None: all) of one parquet file, turning every way it can be missing or broken
    into a DatasetError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = path.relative_to(root)
    if not path.is_file():
        raise DatasetError(f"{root}: missing {what} {rel}")
    try:
        names = set(pq.read_schema(path).names)
        absent = [c for c in columns or [] if c not in names]
        if absent:
            raise DatasetError(f"{root}: {what} {rel} has no column(s) {', '.join(absent)}")
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{root}: {what} {rel} is unreadable (truncated or corrupt: {e})") from None


def _concat(root: Path, tables: list[Any], what: str) -> Any:
    import pyarrow as pa

    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as e:
        raise DatasetError(f"{root}: {what} files disagree on their columns ({e})") from None


def _numbers(root: Path, table: Any, name: str) -> np.ndarray:
    """A numeric column as (rows, width): list columns flattened, scalar columns as width 1."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if col.null_count:
        raise DatasetError(f"{root}: column {name} has {col.null_count} missing values")
    n = len(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        values = col.flatten().to_numpy(zero_copy_only=False)
        if n and values.size % n:
            raise DatasetError(f"{root}: column {name} has rows of different lengths")
        return values.reshape(n, -1)
    return col.to_numpy(zero_copy_only=False).reshape(n, 1)


def _vector(root: Path, table: Any, features: dict, key: str) -> np.ndarray:
    """A vector feature's column as (frames, width), refused when the width is not the shape
    info.json declares for it (lerobot reads that shape; the stored columns are what trains)."""
    x = _numbers(root, table, key)
    declared = features[key].get("shape")
    if declared != [x.shape[1]]:
        raise DatasetError(f"{root}: feature {key} declares shape {declared} in {INFO_PATH} but its parquet column "
                           f"holds shape [{x.shape[1]}]")
    return x


def _read_episodes(root: Path, info: dict, video_keys: list[str]) -> dict[str, np.ndarray]:
    """Episode metadata columns, sorted by episode_index and checked against info.json."""
    files = sorted((root / EPISODES_DIR).glob("*/*.parquet"))
    if not files:
        raise DatasetError(f"{root}: missing episode metadata ({EPISODES_DIR}/chunk-*/file-*.parquet)")
    need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        need += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    table = _concat(root, [_read_parquet(root, f, need, "episode metadata file") for f in files], "episode metadata")
    cols = {c: _numbers(root, table, c)[:, 0] for c in need}
    order = np.argsort(cols["episode_index"], kind="stable")
    cols = {c: v[order] for c, v in cols.items()}
    n = len(order)
    if n == 0:
        raise DatasetError(f"{root}: the dataset has no episodes")
    if not np.array_equal(cols["episode_index"], np.arange(n)):
        raise DatasetError(f"{root}: episode metadata does not list episodes 0..{n - 1} once each")
    empty = np.flatnonzero(cols["length"] <= 0)
    if len(empty):
        e = int(empty[0])
        raise DatasetError(f"{root}: episode {e} has length {int(cols['length'][e])} in the episode metadata; "
                           f"empty episodes are not supported (remove it from the dataset)")
    if n != info["total_episodes"]:
        raise DatasetError(f"{root}: episode metadata lists {n} episodes but {INFO_PATH} says total_episodes="
                           f"{info['total_episodes']}: truncated dataset")
    if int(cols["length"].sum()) != info["total_frames"]:
        raise DatasetError(f"{root}: episode lengths add up to {int(cols['length'].sum())} frames but {INFO_PATH} "
                           f"says total_frames={info['total_frames']}: truncated dataset")
    return cols


def _files(eps: dict[str, np.ndarray], prefix: str) -> list[tuple[int, int]]:
    """(chunk_index, file_index) pairs the episodes use, in first-use order."""
    pairs = zip(eps[f"{prefix}/chunk_index"].tolist(), eps[f"{prefix}/file_index"].tolist())
    return list(dict.fromkeys(pairs))


def _read_frames(root: Path, info: dict, eps: dict[str, np.ndarray], columns: list[str]) -> Any:
    """Every frame's row, ordered by (episode_index, frame_index), checked against the episode lengths."""
    import pyarrow as pa

    tables = [_read_parquet(root, root / info["data_path"].format(chunk_index=c, file_index=f), columns, "data file")
              for c, f in _files(eps, "data")]
    table = _concat(root, tables, "data")
    if table.num_rows != info["total_frames"]:
        raise DatasetError(f"{root}: data files hold {table.num_rows} frames but {INFO_PATH} says total_frames="
                           f"{info['total_frames']}: truncated dataset")
    ep, fi = _numbers(root, table, "episode_index")[:, 0], _numbers(root, table, "frame_index")[:, 0]
    lengths = eps["length"]
    if ep.min() < 0 or ep.max() >= len(lengths):
        raise DatasetError(f"{root}: data files name episode {int(ep.max())}, not in the episode metadata")
    counts = np.bincount(ep, minlength=len(lengths))
    bad = np.flatnonzero(counts != lengths)
    if len(bad):
        e = int(bad[0])
        raise DatasetError(f"{root}: episode {e} has {counts[e]} frames in the data files but its metadata says "
                           f"length {lengths[e]}: truncated dataset")
    order = np.lexsort((fi, ep))
    if not np.array_equal(fi[order], np.concatenate([np.arange(n) for n in lengths])):
        raise DatasetError(f"{root}: frame_index does not run 0..length-1 in every episode")
    return table.take(pa.array(order))


def _read_tasks(root: Path) -> dict[int, str]:
    """task_index -> task string from meta/tasks.parquet (written by pandas: the task is the index)."""
    table = _read_parquet(root, root / TASKS_PATH, None, "task table")
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    task_col = "task" if "task" in table.column_names else next(
        (c for c in meta.get("index_columns", []) if isinstance(c, str) and c in table.column_names), None)
    if task_col is None or "task_index" not in table.column_names:
        raise DatasetError(f"{root}: {TASKS_PATH} needs a task_index column and the task strings")
    return dict(zip(table.column("task_index").to_pylist(), table.column(task_col).to_pylist()))


def _encode_tasks(root: Path, task_of: dict[int, str], frame_task: np.ndarray, starts: np.ndarray,
                  width: int, setting: str) -> np.ndarray:
    """Each frame's task string as the `instruction` observation, (frames, width) uint8, encoded as
    `polcache record --instructions` encodes an instruction. A task that does not fit is refused as
    record refuses one: the longest, so one retry with its size is enough. `setting`: what gave the
    width, a format of it (INSTRUCTIONS_FLAG, or training's config key)."""
    used, first, inverse = np.unique(frame_task, return_index=True, return_inverse=True)
    texts = [task_of[int(t)] for t in used]
    episode_of = np.searchsorted(starts, first, "right") - 1  # the episode each task first appears in
    size, longest = max((len(text.encode("utf-8").strip()) if isinstance(text, str) else 0, i)  # null: refused below
                        for i, text in enumerate(texts))
    if size > width:
        raise DatasetError(f"{root}: {setting.format(width)}: episode {episode_of[longest]}'s task "
                           f"{cut_short(repr(texts[longest]))} takes {size} UTF-8 bytes (the longest); give "
                           f"{setting.format(size)} or more")
    try:
        rows = np.stack([encode_instruction(text, width, f"{root}: {setting.format(width)}: episode {e}'s task "
                                                         f"{cut_short(repr(text))}")
                         for text, e in zip(texts, episode_of.tolist())])
    except InstructionError as exc:  # empty, or a NUL inside: nothing a policy could read
        raise DatasetError(str(exc)) from None
    return rows[inverse.reshape(-1)]


def _rgb(frame: Any, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as uint8 (H, W, 3) RGB; resized to `size` (H, W) in the same swscale conversion,
    so the full-size RGB image is never made."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[1], height=size[0], interpolation=RESIZE_INTERPOLATION)


class _VideoCursor:
    """One mp4 decoded front to back while its episodes are read in order (v3.0 puts them back to back in
    a file), so each frame is decoded once and only one episode's images are held. The frames near the
    end of a read are kept, since the next episode's lookup window may reach back into them; a read
    starting before what was let go reopens the file (episodes stored out of order: right, only slower)."""

    def __init__(self, root: Path, path: Path, hw: tuple[int, int], size: tuple[int, int] | None, tol: float):
        self._root, self._path, self._hw, self._size, self._tol = root, path, hw, size, tol
        self._container: Any = None

    def _open(self) -> None:
        import av

        self.close()
        self._container = av.open(str(self._path))
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._time_base = stream.time_base
        self._frames = self._container.decode(stream)
        self._kept: list[tuple[float, Any]] = []  # (time, frame) decoded and maybe wanted by the next read
        self._let_go = -np.inf  # the latest time of a decoded frame no longer kept
        self._reached = -np.inf  # the latest time decoded

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def read(self, times: np.ndarray, bar: tqdm) -> tuple[np.ndarray, np.ndarray]:
        """(images, found): for each of `times` (seconds into the file, increasing) the decoded frame
        nearest it within tol, as lerobot looks frames up; found is False where none was."""
        import av

        images = np.empty((len(times), *(self._size or self._hw), 3), np.uint8)
        best = np.full(len(times), np.inf)
        try:
            if self._container is None or self._let_go >= times[0] - self._tol:
                self._open()
            kept, self._kept = self._kept, []
            for t, frame in kept:
                self._take(t, frame, times, images, best, bar)
            while self._reached <= times[-1] + self._tol:
                frame = next(self._frames, None)
                if frame is None:
                    break
                if frame.pts is None:
                    continue
                self._reached = t = float(frame.pts * self._time_base)
                self._take(t, frame, times, images, best, bar)
        except (av.error.FFmpegError, IndexError) as e:
            raise DatasetError(f"{self._root}: video {self._path.relative_to(self._root)} is unreadable ({e})") from None
        return images, np.isfinite(best)

    def _take(self, t: float, frame: Any, times: np.ndarray, images: np.ndarray, best: np.ndarray, bar: tqdm) -> None:
        """Put the frame at time t where it is the nearest so far, and keep it if the next read may want it."""
        if t >= times[-1] - self._tol:
            self._kept.append((t, frame))
        else:
            self._let_go = max(self._let_go, t)
        lo, hi = np.searchsorted(times, t - self._tol, "left"), np.searchsorted(times, t + self._tol, "right")
        if lo == hi:
            return
        if (frame.height, frame.width) != self._hw:
            raise DatasetError(f"{self._root}: {self._path.relative_to(self._root)} has {frame.height}x{frame.width} "
                               f"frames but info.json declares {self._hw[0]}x{self._hw[1]}")
        dist = np.abs(times[lo:hi] - t)
        closer = dist < best[lo:hi]  # several frames may fall in the window: the nearest wins
        if closer.any():
            bar.update(int(np.isinf(best[lo:hi][closer]).sum()))
            images[lo:hi][closer] = _rgb(frame, self._size)
            best[lo:hi][closer] = dist[closer]


def _check_timestamps(root: Path, timestamp: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                      fps: float) -> None:
    """Each episode's timestamps must be frame_index / fps (so increasing), within half a frame period:
    video frames are looked up by them, so a wrong one would silently pair a frame with another's image.
    (lerobot's own check is tighter, 1e-4 s; half a period tolerates float32 and rounded writers.)"""
    frame_index = np.arange(len(timestamp)) - np.repeat(starts, lengths)
    expected = frame_index / fps
    tol = 0.5 / fps
    bad = np.flatnonzero(~(np.abs(timestamp - expected) < tol))  # NaN counts as bad
    if len(bad):
        row = int(bad[0])
        e = int(np.searchsorted(starts, row, "right") - 1)
        k = row - int(starts[e])
        raise DatasetError(f"{root}: episode {e} frame {k} has timestamp {timestamp[row]:.6g} s but frame_index / fps "
                           f"= {expected[row]:.6g} s (fps {fps} in {INFO_PATH}); timestamps must be frame_index / fps "
                           f"within half a frame ({tol:.3g} s): out of order, or fps is wrong")


def _decode_images(root: Path, key: str, column: Any, e: int, hw: tuple[int, int], size: tuple[int, int] | None,
                   bar: tqdm) -> np.ndarray:
    """Episode e's images stored in the parquet as {bytes, path} structs (PNG/JPEG bytes)."""
    import av

    blobs = column.combine_chunks().field("bytes").to_pylist()
    out = np.empty((len(blobs), *(size or hw), 3), np.uint8)
    for k, blob in enumerate(blobs):
        if blob is None:
            raise DatasetError(f"{root}: image feature {key} episode {e} frame {k} has no embedded bytes")
        try:
            with av.open(io.BytesIO(blob)) as c:
                frame = next(c.decode(video=0))
                if (frame.height, frame.width) != hw:
                    raise DatasetError(f"{root}: image feature {key} episode {e} frame {k} is {frame.height}x"
                                       f"{frame.width}, info.json declares {hw[0]}x{hw[1]}")
                out[k] = _rgb(frame, size)
        except (av.error.FFmpegError, StopIteration) as exc:
            raise DatasetError(f"{root}: image feature {key} episode {e} frame {k} is not a readable image "
                               f"({exc})") from None
        bar.update()
    return out


def _names(ft: dict) -> list[str] | None:
    """A vector feature's element names: a list, or {"motors": [...]} as some datasets write them."""
    names = ft.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    return [str(n) for n in names] if isinstance(names, list) else None


def _check_finite(root: Path, starts: np.ndarray, vectors: dict[str, np.ndarray | None]) -> None:
    """Refuse a NaN or inf in a vector feature, naming the first episode and frame holding one."""
    for key, x in vectors.items():
        if x is not None and (at := first_non_finite(x, starts)) is not None:
            raise DatasetError(f"{root}: feature {key} holds NaN or inf at episode {at[0]} frame {at[1]}")


def _video_files(root: Path, info: dict[str, Any], eps: Any, videos: dict[str, str]
                 ) -> tuple[dict[str, list[tuple[int, int]]], dict[tuple[str, int, int], Path]]:
    """Each video camera's (chunk, file) per episode, and each such file's path, checked to exist before
    hours of decoding, not after."""
    files = {lk: list(zip(eps[f"videos/{lk}/chunk_index"].tolist(), eps[f"videos/{lk}/file_index"].tolist()))
             for lk in videos.values()}
    paths = {(lk, c, f): root / info["video_path"].format(video_key=lk, chunk_index=c, file_index=f)
             for lk, pairs in files.items() for c, f in pairs}
    for path in paths.values():
        if not path.is_file():
            raise DatasetError(f"{root}: missing video file {path.relative_to(root)}")
    return files, paths


def _imported_attrs(info: dict[str, Any], tasks: list[str], instruction_bytes: int,
                    image_size: tuple[int, int] | None, cameras: dict[str, tuple[str, tuple[int, int]]]
                    ) -> dict[str, Any]:
    """The polcache dataset's attributes for an import: rate, source, task, robot, feature names, resize."""
    features = info["features"]
    attrs: dict[str, Any] = {"fps": info["fps"], "source": f"lerobot {info['codebase_version']}"}
    # one task throughout (e.g. a Meta-World task name): the dataset's task; not where the strings are instructions
    # (language, not an environment's name: eval would look for a task called "reach the goal")
    if len(set(tasks)) == 1 and tasks[0] and not instruction_bytes:
        attrs["task"] = tasks[0]
    if info.get("robot_type"):
        attrs["robot_type"] = info["robot_type"]
    for key, attr in ((STATE, "state_names"), (ACTION, "action_names")):
        if key in features and (names := _names(features[key])) is not None:
            attrs[attr] = names
    if image_size is not None:
        attrs["image_resize"] = {"size": list(image_size), "interpolation": RESIZE_INTERPOLATION.lower(),
                                 "source_sizes": {k: list(hw) for k, (_, hw) in cameras.items()}}
    return attrs


def import_lerobot(root: str | Path, out: str | Path, progress: bool = True, instruction_bytes: int = 0,
                   image_size: tuple[int, int] | None = None, instruction_setting: str = INSTRUCTIONS_FLAG
                   ) -> ImportReport:
    """Convert a LeRobotDataset v3.0 root into a polcache zarr dataset at `out` (written atomically),
    one episode at a time, so memory holds about one episode's images whatever the dataset's size.
    `instruction_bytes` > 0 also makes each frame's task string its `instruction` observation of
    that many bytes, as `polcache record --instructions` writes it, for language-conditioned policies.
    Opt-in, as record's flag is: many datasets' only task is a generic name, which a policy without
    language would carry in every frame for nothing. `image_size` (height, width) resizes every
    camera to exactly that size as it is decoded (aspect ratio not kept, as lerobot's and
    diffusion_policy's resize transforms do); the attrs' image_resize records it and the source sizes.
    `instruction_setting`: what gave instruction_bytes, for refusals (a format of the width)."""
    require_pyarrow()
    root = Path(root)
    if image_size is not None and not (isinstance(image_size, tuple) and len(image_size) == 2
                                       and all(type(n) is int and 1 <= n <= MAX_IMAGE_SIDE for n in image_size)):
        raise DatasetError(f"image_size must be (height, width), each 1..{MAX_IMAGE_SIDE} pixels, got {image_size!r}")
    check_dataset_output(out, inputs=[root], demonstrations=True)
    info = read_info(root)
    fps = info["fps"]
    cameras, skipped = _plan(root, info)
    if image_size is not None and not cameras:  # said, or a user would believe the images were resized
        raise DatasetError(f"{root}: --image-size: the dataset has no camera features to resize")
    features = info["features"]
    videos = {k: lk for k, (lk, _) in cameras.items() if features[lk]["dtype"] == "video"}
    eps = _read_episodes(root, info, list(videos.values()))
    has_state, has_tasks = STATE in features, "task_index" in features
    columns = [ACTION, "timestamp", "frame_index", "episode_index"] + [STATE] * has_state + ["task_index"] * has_tasks
    columns += [lk for k, (lk, _) in cameras.items() if k not in videos]
    frames = _read_frames(root, info, eps, columns)
    action = _vector(root, frames, features, ACTION)
    state = _vector(root, frames, features, STATE) if has_state else None
    lengths = eps["length"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    _check_finite(root, starts, {ACTION: action, STATE: state})
    if instruction_bytes and not has_tasks:
        raise DatasetError(f"{root}: {instruction_setting.format(instruction_bytes)}: the dataset has no task_index "
                           f"feature, so no task strings to take instructions from")
    tasks = [""] * len(lengths)
    instruction = None
    if has_tasks:
        task_of = _read_tasks(root)
        frame_task = _numbers(root, frames, "task_index")[:, 0]
        used = frame_task if instruction_bytes else frame_task[starts]  # an episode's task is its first frame's
        unknown = sorted(set(used.tolist()) - set(task_of))
        if unknown:
            raise DatasetError(f"{root}: task_index {unknown[0]} is not in {TASKS_PATH}")
        tasks = [task_of[int(t)] for t in frame_task[starts]]
        if instruction_bytes:
            instruction = _encode_tasks(root, task_of, frame_task, starts, instruction_bytes, instruction_setting)

    timestamp = _numbers(root, frames, "timestamp")[:, 0].astype(np.float64)
    _check_timestamps(root, timestamp, starts, lengths, fps)
    files, paths = _video_files(root, info, eps, videos)
    if cameras:
        require_av()
    attrs = _imported_attrs(info, tasks, instruction_bytes, image_size, cameras)

    # Episode by episode: decoded (and resized) then appended, so memory holds one episode's images.
    cursors: dict[tuple[str, int, int], _VideoCursor] = {}
    last_use = {(lk, *pair): e for lk, pairs in files.items() for e, pair in enumerate(pairs)}
    try:
        with (dataset_writer(out, attrs) as writer,
              tqdm(total=len(frames) * len(cameras), desc="decode images", unit="frame", disable=not progress) as bar):
            for e, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
                obs = {**({"state": state[s:s + n]} if state is not None else {}),
                       **({INSTRUCTION_KEY: instruction[s:s + n]} if instruction is not None else {})}
                for key, (lkey, hw) in cameras.items():
                    if key not in videos:
                        obs[key] = _decode_images(root, lkey, frames.column(lkey).slice(s, n), e, hw, image_size, bar)
                        continue
                    file = (lkey, *files[lkey][e])
                    if file not in cursors:
                        cursors[file] = _VideoCursor(root, paths[file], hw, image_size, 0.4 / fps)
                    # A frame is looked up at its episode's from_timestamp + its own timestamp, as lerobot does.
                    times = eps[f"videos/{lkey}/from_timestamp"][e] + timestamp[s:s + n]
                    obs[key], found = cursors[file].read(times, bar)
                    if not found.all():
                        raise DatasetError(f"{root}: {lkey} has no video frame for episode {e} frame "
                                           f"{int(np.flatnonzero(~found)[0])} (video truncated or timestamps off)")
                    if last_use[file] == e:
                        cursors.pop(file).close()
                writer.append(Episode(obs=obs, action=action[s:s + n], task=tasks[e]))
    finally:
        for cursor in cursors.values():
            cursor.close()
    obs_keys = sorted([*(["state"] if state is not None else []), *cameras,
                       *([INSTRUCTION_KEY] if instruction is not None else [])])
    return ImportReport(Path(out), len(lengths), len(frames), obs_keys, fps, skipped)


# ---- training straight from a LeRobot root ------------------------------------


def _fingerprint(root: Path) -> str:
    """Hash of info.json and every meta/data/video file's name, size and mtime: changes when the dataset does."""
    h = hashlib.sha256(f"polcache-lerobot-import/{_CACHE_VERSION}\n".encode())
    h.update((root / INFO_PATH).read_bytes())
    for sub in ("meta", "data", "videos", "images"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polcache" / "lerobot"


def cached_import(root: str | Path, progress: bool = False, instruction_bytes: int = 0,
                  instruction_setting: str = INSTRUCTIONS_FLAG) -> Path:
    """Import a LeRobot root once and return the polcache copy: <root>/.polcache/episodes-<hash>.zarr,
    or ~/.cache/polcache/lerobot/<root's path hash>-<hash>.zarr when the root is read-only; a new copy
    replaces the root's earlier ones there (the dataset changed). A file lock makes concurrent
    callers (torchrun ranks) wait for one import instead of racing. Images keep their size (the hash
    has no options in it): for smaller ones, import with image_size and train on that dataset.
    `instruction_bytes` > 0: with each frame's task string as the instruction observation (a
    language policy's), a copy of its own beside the one without."""
    import fcntl  # POSIX only, like the rest of the runtime; imported here so polcache.data loads anywhere

    root = Path(root)
    read_info(root)  # refuse a bad root before hashing or creating anything
    key = _fingerprint(root)
    name = f"{key}-instructions{instruction_bytes}" if instruction_bytes else key
    # per folder, the prefix of this root's copies there: the user cache holds several roots' copies
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    for folder, prefix in ((root / LEROBOT_CACHE, "episodes-"), (_user_cache_dir(), f"{where}-")):
        cache = folder / f"{prefix}{name}.zarr"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / f".{cache.name}.lock", "a")
        except OSError:
            continue
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not restore(cache).exists():  # written atomically, so present means complete
                import_lerobot(root, cache, progress, instruction_bytes=instruction_bytes,
                               instruction_setting=instruction_setting)
                print(f"imported LeRobot root {root} into {cache}: used again while the root is unchanged "
                      f"(delete it to free the space)")
                for stale in folder.glob(f"{prefix}*.zarr"):  # copies of this dataset as it was before go
                    if not stale.name.startswith(f"{prefix}{key}"):
                        shutil.rmtree(stale, ignore_errors=True)
                for stale_lock in folder.glob(f".{prefix}*.zarr.lock"):  # also a failed import's
                    if not stale_lock.name.startswith(f".{prefix}{key}"):
                        stale_lock.unlink(missing_ok=True)
        return cache
    raise DatasetError(f"{root}: no writable cache directory for the imported dataset "
                       f"(tried {root / '.polcache'} and {_user_cache_dir()})")


def open_dataset(path: str | Path, progress: bool = False, instruction_bytes: int = 0,
                 instruction_setting: str = INSTRUCTIONS_FLAG) -> EpisodeStore:
    """Open a dataset for training: a polcache zarr store, or a LeRobot v3.0 root (imported once
    into a cache, see `cached_import`), so `dataset=` may name either. `instruction_bytes`: the
    instruction width of a language policy, whose instructions a LeRobot root's task strings are
    (a zarr store holds its own); `instruction_setting` names what gave it (a format of the width)."""
    path = restore(path)  # a write killed between its two renames left it aside: the dataset is back
    refuse_hub_id(path)
    if is_lerobot_root(path):
        path = cached_import(path, progress, instruction_bytes, instruction_setting)
    return EpisodeStore.open(path)
