"""Demonstration episodes on disk, as one zarr (v3) group.

Layout (same idea as diffusion_policy's ReplayBuffer, so datasets are easy to inspect):

    <root>.attrs   {"format": "polcache-episodes", "version": 1, "complete": true, ...user attrs}
    data/obs/<key> (N, ...)   every episode concatenated along time
    data/action    (N, Da)    float32
    meta/episode_ends (E,)    int64 cumulative ends; episode i is [ends[i-1], ends[i])
    meta.attrs["tasks"]       one task string per episode

Writes are atomic: a sibling temp directory is filled, flagged complete, and renamed into
place, so a crash or a bad episode never leaves a half-written dataset where a good one was.
`dataset_writer` takes the episodes one at a time (write_dataset uses it), so writing holds about
one episode in memory, not the dataset.
Chunks are zstd frames with checksums, so bytes damaged later fail to decode instead of
reading as other numbers; a chunk that fails is named in a DatasetError where it is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from polcache.atomic import atomic_directory, output_lock, restore
from polcache.config import EMBEDDING_KEY
from polcache.errors import DatasetError
from polcache.outputs import check_output
from polcache.policy.spec import ArraySpec

FORMAT = "polcache-episodes"
VERSION = 1
_RESERVED_ATTRS = ("format", "version", "complete")
_IMAGE_CHUNK = 64  # frames per image chunk: small enough to read one window cheaply
_LOWDIM_CHUNK = 16384  # state/action rows per chunk: low-dim arrays are tiny
# zarr's default codec (zstd level 0) plus a checksum of each chunk's content: bit-rot that would
# still decode is then caught. Datasets written without it open as before (the codec is per array).
_COMPRESSOR = ZstdCodec(level=0, checksum=True)
# What reading a damaged chunk raises: numcodecs' decompression errors (RuntimeError), a chunk that
# decodes to the wrong size (ValueError), the file system (OSError).
_READ_ERRORS = (RuntimeError, ValueError, OSError)


@dataclass
class Episode:
    """One demonstration. obs: key -> (T, ...): "state" float32 (T, D), "image_<cam>" uint8 (T, H, W, 3)."""

    obs: dict[str, np.ndarray]
    action: np.ndarray  # (T, action_dim) float32
    task: str = ""


def _check_key(key: str) -> None:
    # "embedding": per-frame encoder outputs written by `polcache ptp embed` (polcache.ptp.embeddings);
    # "instruction": the UTF-8 bytes of the instruction followed (polcache.policy.language)
    if key not in ("state", "embedding", "instruction") and not (key.startswith("image_") and len(key) > len("image_")):
        raise DatasetError(f"obs key {key!r} is not supported: use 'state', 'instruction' or 'image_<camera>'")
    if "/" in key:
        raise DatasetError(f"obs key {key!r} must not contain '/'")


def _checked(i: int, ep: Episode, keys: list[str], ref_shapes: dict[str, tuple[int, ...]]
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Episode i's obs and action as written (numbers as float32), checked against the first episode's
    keys and step shapes (`ref_shapes`, filled from the first episode)."""
    if sorted(ep.obs) != keys:
        raise DatasetError(f"episode {i}: obs keys {sorted(ep.obs)} differ from episode 0's {keys}")
    action = np.asarray(ep.action)
    if action.ndim != 2 or action.shape[0] == 0:
        raise DatasetError(f"episode {i}: action must be (T>0, action_dim), got shape {action.shape}")
    if not np.issubdtype(action.dtype, np.number):
        raise DatasetError(f"episode {i}: action has non-numeric dtype {action.dtype}")
    action = action.astype(np.float32)
    if not np.isfinite(action).all():
        raise DatasetError(f"episode {i}: action contains NaN or inf")
    T = action.shape[0]
    ref_shapes.setdefault("action", action.shape[1:])
    if action.shape[1:] != ref_shapes["action"]:
        raise DatasetError(f"episode {i}: action dim {action.shape[1:]} differs from episode 0's {ref_shapes['action']}")
    obs = {}
    for k in keys:
        x = np.asarray(ep.obs[k])
        if x.ndim < 1 or x.shape[0] != T:
            raise DatasetError(f"episode {i}: obs[{k!r}] has {x.shape[0] if x.ndim else 0} steps but action has {T}")
        if k in ("state", "embedding"):
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
                raise DatasetError(f"episode {i}: obs[{k!r}] must be numeric (T, D), got {x.dtype} {x.shape}")
            x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise DatasetError(f"episode {i}: obs[{k!r}] contains NaN or inf")
        elif k == "instruction":
            if x.dtype != np.uint8 or x.ndim != 2:
                raise DatasetError(f"episode {i}: obs['instruction'] must be uint8 (T, bytes), got {x.dtype} {x.shape}")
        elif x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise DatasetError(f"episode {i}: obs[{k!r}] must be uint8 (T, H, W, 3), got {x.dtype} {x.shape}")
        ref_shapes.setdefault(k, x.shape[1:])
        if x.shape[1:] != ref_shapes[k]:
            raise DatasetError(f"episode {i}: obs[{k!r}] step shape {x.shape[1:]} differs from episode 0's {ref_shapes[k]}")
        obs[k] = x
    if not isinstance(ep.task, str):
        raise DatasetError(f"episode {i}: task must be a str, got {type(ep.task).__name__}")
    return obs, action


def is_dataset(path: Path) -> bool:
    """True for a dataset that polcache wrote (a demonstration or an embedding store)."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except Exception:
        return False


def _put(group: zarr.Group, name: str, data: np.ndarray, rows: int) -> None:
    chunks = (max(1, min(rows, data.shape[0])),) + data.shape[1:]
    # write_empty_chunks: every chunk lands on disk, so a missing chunk file means truncation.
    group.create_array(name, data=data, chunks=chunks, compressors=_COMPRESSOR, config={"write_empty_chunks": True})


def is_demonstrations(path: Path) -> bool:
    """True for a polcache dataset of demonstrations (recorded or imported), not an embedding store
    (`ptp embed`'s: observation key `embedding`, an encoder's pass over a whole dataset)."""
    try:
        return is_dataset(path) and EMBEDDING_KEY not in EpisodeStore.open(path).obs_keys
    except DatasetError:  # a damaged dataset: replacing it loses nothing
        return True


def recorded_tasks(attrs: Mapping[str, Any]) -> list[str]:
    """The tasks a dataset with `attrs` was recorded on: several for a multi-task recording (whose
    first task was stored as its task before `tasks_recorded`), [] for one that names none."""
    several = [str(task) for task in attrs.get("tasks_recorded", ())]
    if len(several) > 1:
        return several
    return [task] if (task := str(attrs.get("task", ""))) else []


def other_tasks(trained: str, attrs: Mapping[str, Any]) -> str | None:
    """The tasks a dataset with `attrs` was recorded on (joined) where none is `trained`, a policy's
    task: data of other tasks, allowed (transfer) but rarely meant; None where they agree or either
    names none."""
    recorded = recorded_tasks(attrs)
    return ", ".join(recorded) if trained and recorded and trained not in recorded else None


def first_non_finite(x: np.ndarray, starts: np.ndarray) -> tuple[int, int] | None:
    """(episode, frame) of the first row of `x` (every episode's frames, episode i from row `starts[i]`)
    holding a NaN or inf, or None: where a user finds a damaged value to mend it."""
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if finite.all():
        return None
    row = int(np.flatnonzero(~finite)[0])
    e = int(np.searchsorted(starts, row, side="right")) - 1
    return e, row - int(starts[e])


def check_dataset_output(path: str | Path, flag: str | None = None, inputs: Sequence[str | Path] = (),
                         demonstrations: bool = False) -> Path:
    """Refuse, before any work, a dataset output that is not a polcache dataset (see check_output);
    with `demonstrations` (a recording, an import), an embedding store too."""
    what, ours = ("a polcache dataset", is_dataset)
    if demonstrations:
        what, ours = f"{what} of demonstrations (an embedding store from `ptp embed` is not replaced)", is_demonstrations
    return check_output(path, what, folder=True, ours=ours, flag=flag, inputs=inputs, error=DatasetError, whole=True)


class _Column:
    """One array filled as rows arrive: written in whole chunks, each compressed once, the last partial
    chunk at finish, so it is chunked as _put chunks the whole array. Holds less than a chunk of rows."""

    def __init__(self, group: zarr.Group, name: str, chunk_rows: int):
        self._group, self._name, self._chunk_rows = group, name, chunk_rows
        self._array: zarr.Array | None = None
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def append(self, rows: np.ndarray) -> None:
        start = 0
        if self._pending_rows:  # top up the partial chunk first
            start = min(len(rows), self._chunk_rows - self._pending_rows)
            self._hold(rows[:start])
            if self._pending_rows < self._chunk_rows:
                return
            self.finish()
        whole = start + (len(rows) - start) // self._chunk_rows * self._chunk_rows
        if whole > start:
            self._write(rows[start:whole])
        if whole < len(rows):
            self._hold(rows[whole:])

    def _hold(self, rows: np.ndarray) -> None:
        self._pending.append(rows.copy())  # a view would keep the caller's whole episode alive
        self._pending_rows += len(rows)

    def _write(self, rows: np.ndarray) -> None:
        if self._array is None:
            _put(self._group, self._name, rows, self._chunk_rows)
            self._array = self._group[self._name]
        else:
            self._array.append(rows)

    def finish(self) -> None:
        """Write the rows held back (a partial chunk)."""
        if self._pending:
            self._write(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0


class DatasetWriter:
    """Episodes appended one at a time to a dataset being written by `dataset_writer`: each is checked
    against the first as write_dataset checks them, then written, so memory holds about one episode."""

    def __init__(self, root: zarr.Group):
        self._root = root
        self._data = root.create_group("data")
        self._obs = self._data.create_group("obs")
        self._columns: dict[str, _Column] = {}
        self._keys: list[str] = []
        self._ref_shapes: dict[str, tuple[int, ...]] = {}
        self._lengths: list[int] = []
        self._tasks: list[str] = []

    @property
    def num_episodes(self) -> int:
        return len(self._lengths)

    def append(self, episode: Episode) -> None:
        i = len(self._lengths)
        if i == 0:
            self._keys = sorted(episode.obs)
            if not self._keys:
                raise DatasetError("episode 0: obs is empty; need at least 'state' or one 'image_<camera>'")
            for k in self._keys:
                _check_key(k)
        obs, action = _checked(i, episode, self._keys, self._ref_shapes)
        if i == 0:
            for k in self._keys:
                self._columns[k] = _Column(self._obs, k, _IMAGE_CHUNK if k.startswith("image_") else _LOWDIM_CHUNK)
            self._columns["action"] = _Column(self._data, "action", _LOWDIM_CHUNK)
        for k, x in obs.items():
            self._columns[k].append(x)
        self._columns["action"].append(action)
        self._lengths.append(len(action))
        self._tasks.append(episode.task)

    def _finish(self) -> None:
        if not self._lengths:
            raise DatasetError("cannot write a dataset with no episodes")
        for column in self._columns.values():
            column.finish()
        meta = self._root.create_group("meta")
        _put(meta, "episode_ends", np.cumsum(self._lengths, dtype=np.int64), len(self._lengths))
        meta.attrs["tasks"] = self._tasks
        self._root.attrs["complete"] = True  # last write: only a fully written dataset carries it


def _checked_attrs(path: Path, attrs: dict | None) -> dict:
    attrs = dict(attrs or {})
    clash = [k for k in _RESERVED_ATTRS if k in attrs]
    if clash:
        raise DatasetError(f"{path}: attrs {clash} are reserved by polcache")
    try:
        json.dumps(attrs)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: attrs must be JSON-serialisable ({e})") from None
    return attrs


@contextmanager
def dataset_writer(path: str | Path, attrs: dict | None = None) -> Iterator[DatasetWriter]:
    """Write a dataset episode by episode (`writer.append(episode)`), for datasets larger than memory.
    Atomic as write_dataset: the dataset replaces `path` only when the block ends without an error,
    and is flagged complete last; an error (or no episode) leaves `path` as it was."""
    path = Path(path)
    attrs = _checked_attrs(path, attrs)
    check_dataset_output(path)
    with output_lock(path), atomic_directory(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({"format": FORMAT, "version": VERSION, "complete": False, **attrs})
        writer = DatasetWriter(root)
        yield writer
        writer._finish()


def write_dataset(path: str | Path, episodes: Sequence[Episode], attrs: dict | None = None) -> None:
    """Write episodes atomically to `path`, replacing an existing polcache dataset only once the new one is complete."""
    with dataset_writer(path, attrs) as writer:
        for episode in episodes:
            writer.append(episode)


def _episodes(ends: np.ndarray | None, a: int, b: int) -> str:
    """", episodes i..j" for rows [a, b), or "" when the episode ends are not known yet."""
    if ends is None:
        return ""
    first, last = (int(np.searchsorted(ends, r, "right")) for r in (a, b - 1))
    return f", episode {first}" if first == last else f", episodes {first}..{last}"


RECORD_AGAIN = "record, import or copy it again"  # what to do about a damaged dataset of demonstrations


def _read_rows(path: Path, name: str, arr: zarr.Array, rows: slice, ends: np.ndarray | None = None,
               remedy: str = RECORD_AGAIN) -> np.ndarray:
    """arr[rows]; a damaged chunk becomes one DatasetError naming it and `remedy`. The chunk is found
    by reading them one at a time, which happens only after a failed read: good reads cost nothing extra."""
    try:
        return np.asarray(arr[rows])
    except _READ_ERRORS as e:
        cause, where = e, ""
    start, stop, _ = rows.indices(arr.shape[0])
    size = arr.chunks[0]
    for a in range(start - start % size, stop, size):
        b = min(a + size, arr.shape[0])
        try:
            arr[a:b]
        except _READ_ERRORS as e:
            cause, where = e, f" chunk {a // size} (rows {a}..{b - 1}{_episodes(ends, a, b)})"
            break
    detail = " ".join(f"{type(cause).__name__}: {cause}".split())
    raise DatasetError(f"{path}: {name}{where} cannot be read ({detail}): the dataset is damaged; {remedy}")


def _format_expects(name: str) -> tuple[str, tuple[int | None, ...]] | None:
    """(dtype, per-step shape; None: any size) that write_dataset gives array `name` (data/action,
    data/obs/<key>); None for an obs key it never writes."""
    key = name.removeprefix("data/obs/")
    if name == "data/action" or key in ("state", "embedding"):
        return "float32", (None,)
    if key == "instruction":
        return "uint8", (None,)
    if key.startswith("image_") and len(key) > len("image_"):
        return "uint8", (None, None, 3)
    return None


def _check_array(path: Path, name: str, arr: zarr.Array, dtype: str, step: tuple[int | None, ...], why: str) -> None:
    found = tuple(int(n) for n in arr.shape[1:])
    if np.dtype(arr.dtype).name == dtype and len(found) == len(step) and all(w in (None, f) for w, f in zip(step, found)):
        return
    want = "(" + ", ".join("*" if w is None else str(w) for w in step) + ("," if len(step) == 1 else "") + ")"
    raise DatasetError(f"{path}: {name} holds {np.dtype(arr.dtype).name} steps of shape {found}, expected {dtype} "
                       f"steps of shape {want} ({why})")


def _declared(path: Path, attrs: dict[str, Any]) -> tuple[dict[str, ArraySpec] | None, int | None]:
    """attrs obs_spec and action_dim (written by `polcache record`), type-checked; None where absent."""
    spec, dim = attrs.get("obs_spec"), attrs.get("action_dim")
    if spec is not None:
        good = isinstance(spec, dict) and all(
            isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
            and all(type(n) is int and n > 0 for n in v["shape"]) for v in spec.values())
        if not good:
            raise DatasetError(f"{path}: attrs obs_spec must map each obs key to {{'shape': [positive ints], "
                               f"'dtype': str}}, got {json.dumps(spec)[:120]}")
        spec = {k: ArraySpec.from_dict(v) for k, v in spec.items()}
    if dim is not None and (type(dim) is not int or dim < 1):
        raise DatasetError(f"{path}: attrs action_dim must be a positive integer, got {dim!r}")
    return spec, dim


def _check_layout(path: Path, name: str, arr: zarr.Array, spec: dict[str, ArraySpec] | None,
                  action_dim: int | None) -> None:
    """An array's dtype and per-step shape: as write_dataset writes them, and as attrs declare them."""
    expects, key = _format_expects(name), name.removeprefix("data/obs/")
    if expects is None:
        raise DatasetError(f"{path}: {name} is not an obs key polcache writes (state, embedding, instruction, "
                           "image_<camera>)")
    _check_array(path, name, arr, *expects, "as polcache writes it")
    if name == "data/action":
        if action_dim is not None:
            _check_array(path, name, arr, "float32", (action_dim,), f"attrs action_dim is {action_dim}")
    elif spec is not None and key in spec:
        _check_array(path, name, arr, spec[key].dtype, spec[key].shape, "as attrs obs_spec declares")


class EpisodeStore:
    """Read access to a dataset written by `write_dataset`; validated on open so later reads can trust it."""

    def __init__(self, path: Path, root: zarr.Group, episode_ends: np.ndarray, tasks: list[str], obs_keys: list[str]):
        self.path = path
        self._root = root
        self._ends = episode_ends
        self._tasks = tasks
        self._obs_keys = obs_keys
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> "EpisodeStore":
        """Open and validate; any missing, truncated or foreign dataset raises DatasetError."""
        path = restore(path)  # a write killed between its two renames (no atomic exchange) left it aside
        if not path.exists():
            raise DatasetError(f"{path}: dataset does not exist")
        try:
            root = zarr.open_group(str(path), mode="r")
            attrs = dict(root.attrs)
        except PermissionError:  # said as the system's refusal, with its path, not as someone else's data
            raise
        except Exception:
            if any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs")):  # zarr's, unreadable
                raise DatasetError(f"{path}: a zarr store whose group metadata cannot be read (damaged or "
                                   f"truncated?)") from None
            raise DatasetError(f"{path}: not a polcache dataset (not a zarr group)") from None
        if attrs.get("format") != FORMAT:
            raise DatasetError(f"{path}: not a polcache dataset (format attr is {attrs.get('format')!r})")
        if type(attrs.get("version")) is not int or attrs.get("version") != VERSION:
            raise DatasetError(f"{path}: dataset version {attrs.get('version')!r} is not supported (expected {VERSION})")
        if attrs.get("complete") is not True:
            raise DatasetError(f"{path}: dataset is incomplete (write was interrupted)")

        def get(name: str) -> zarr.Array:
            try:
                node = root[name]
            except Exception:
                raise DatasetError(f"{path}: truncated dataset: missing array {name}") from None
            if not isinstance(node, zarr.Array):
                raise DatasetError(f"{path}: truncated dataset: {name} is not an array")
            return node

        ends = _read_rows(path, "meta/episode_ends", get("meta/episode_ends"), slice(None))
        if ends.ndim != 1 or len(ends) == 0 or not np.issubdtype(ends.dtype, np.integer):
            raise DatasetError(f"{path}: meta/episode_ends must be a non-empty 1-D integer array, got {ends.dtype} {ends.shape}")
        ends = ends.astype(np.int64)
        if ends[0] <= 0 or (np.diff(ends) <= 0).any():
            raise DatasetError(f"{path}: meta/episode_ends is not strictly increasing from > 0")
        try:
            tasks = root["meta"].attrs.get("tasks")
        except Exception:
            tasks = None
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise DatasetError(f"{path}: meta attrs tasks must be a list of strings, one per episode, got "
                               f"{json.dumps(tasks)[:80]}")
        if len(tasks) != len(ends):
            raise DatasetError(f"{path}: meta tasks list has {len(tasks)} entries for {len(ends)} episodes")
        try:
            obs_keys = sorted(name for name, _ in root["data/obs"].arrays())
        except Exception:
            obs_keys = []
        if not obs_keys:
            raise DatasetError(f"{path}: truncated dataset: no arrays under data/obs")
        spec, action_dim = _declared(path, attrs)
        missing = sorted(set(spec or ()) - set(obs_keys))
        if missing:
            raise DatasetError(f"{path}: truncated dataset: missing array data/obs/{missing[0]} (attrs obs_spec "
                               f"declares it)")
        undeclared = sorted(set(obs_keys) - set(spec)) if spec is not None else []
        if undeclared:  # an array added by hand, or left from another recording: nothing says what it holds
            raise DatasetError(f"{path}: data/obs/{undeclared[0]} is not declared in attrs obs_spec (which declares "
                               f"{', '.join(sorted(spec))}): remove it or declare it")
        n = int(ends[-1])
        for name in [f"data/obs/{k}" for k in obs_keys] + ["data/action", "meta/episode_ends"]:
            arr = get(name)
            want = len(ends) if name == "meta/episode_ends" else n
            if arr.ndim == 0 or arr.shape[0] != want:
                raise DatasetError(f"{path}: truncated dataset: {name} has {arr.shape[0] if arr.ndim else 0} rows, expected {want}")
            if name != "meta/episode_ends":
                _check_layout(path, name, arr, spec, action_dim)
            if arr.nchunks_initialized != arr.nchunks:
                raise DatasetError(f"{path}: truncated dataset: {name} has {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing")
        return cls(path, root, ends, tasks, obs_keys)

    @property
    def num_episodes(self) -> int:
        return len(self._ends)

    @property
    def num_steps(self) -> int:
        return int(self._ends[-1])

    @property
    def episode_ends(self) -> np.ndarray:
        """int64 cumulative ends (a copy): episode i spans [ends[i-1], ends[i])."""
        return self._ends.copy()

    @property
    def episode_starts(self) -> np.ndarray:
        """int64 first rows: episode i spans [starts[i], ends[i])."""
        return np.concatenate([[0], self._ends[:-1]])

    @property
    def obs_keys(self) -> list[str]:
        return list(self._obs_keys)

    @property
    def action_dim(self) -> int:
        return int(self._root["data/action"].shape[1])

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def attrs(self) -> dict[str, Any]:
        """User attrs given to write_dataset (polcache's own format keys left out)."""
        return {k: v for k, v in self._root.attrs.items() if k not in _RESERVED_ATTRS}

    def obs_spec(self) -> dict[str, ArraySpec]:
        """Per-step shape and dtype of each obs key, as a PolicySpec wants it."""
        out = {}
        for k in self._obs_keys:
            arr = self._root[f"data/obs/{k}"]
            out[k] = ArraySpec(tuple(int(s) for s in arr.shape[1:]), np.dtype(arr.dtype).name)
        return out

    def check_observations(self, want: dict[str, ArraySpec], where: str, taker: str, hint: str = "") -> None:
        """Refuse a dataset (`where`, as the user named it) whose observations do not fit what `taker`
        takes (`want`: key -> per-frame spec), naming the first key missing or of another shape or
        dtype, before any frame is read."""
        missing = [k for k in want if k not in self._obs_keys]
        if missing:
            raise DatasetError(f"{where} has no {missing} observations, which {taker} takes")
        have = self.obs_spec()
        for key, spec in want.items():
            if (have[key].shape, have[key].dtype) != (spec.shape, spec.dtype):
                raise DatasetError(f"{where}: observation {key!r} is {have[key].dtype}{list(have[key].shape)} per "
                                   f"frame but {taker} takes {spec.dtype}{list(spec.shape)}{hint}")

    def _node(self, key: str) -> zarr.Array:
        if key == "action":
            return self._root["data/action"]
        if key not in self._obs_keys:
            raise KeyError(f"{self.path}: no obs key {key!r}; have {self._obs_keys} and 'action'")
        return self._root[f"data/obs/{key}"]

    def _read(self, key: str, rows: slice) -> np.ndarray:
        node = self._node(key)
        remedy = ("write it again with `polcache ptp embed`" if EMBEDDING_KEY in self._obs_keys  # an embedding store
                  else RECORD_AGAIN)
        return _read_rows(self.path, node.path, node, rows, self._ends, remedy)

    def array(self, key: str) -> np.ndarray:
        """Whole obs key ("action" for actions) in memory; loaded once, cached, read-only (shared by datasets)."""
        if key not in self._cache:
            x = self._read(key, slice(None))
            x.setflags(write=False)
            self._cache[key] = x
        return self._cache[key]

    def episode(self, i: int) -> Episode:
        n = self.num_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range for {n} episodes")
        i %= n
        start = 0 if i == 0 else int(self._ends[i - 1])
        end = int(self._ends[i])
        obs = {k: self._read(k, slice(start, end)) for k in self._obs_keys}
        return Episode(obs=obs, action=self._read("action", slice(start, end)), task=self._tasks[i])

    def __repr__(self) -> str:
        return f"EpisodeStore({str(self.path)!r}, episodes={self.num_episodes}, steps={self.num_steps}, obs={self._obs_keys})"
