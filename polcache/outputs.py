"""Output paths are checked before any work, with one helper, so a wrong --out costs one line
instead of a finished run, and a command never replaces a file or folder that it did not write.

Every writer names what it writes (`what`, e.g. "a polcache dataset") and how to recognise its
own earlier output (`ours`); an existing path that is not its own is refused, as is a path
under a file, a folder where a file goes (or the reverse), an empty path, the command's own
input, and a path inside a folder that polcache replaces whole when it writes it again (a
dataset, a checkpoint, an exported policy, a report, a LeRobot root), where the output would
vanish unseen."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from polcache.errors import OutputError, PolcacheError
from polcache.jsonfile import read_json_object

# A LeRobot dataset root (polcache.data.lerobot), which export-lerobot replaces whole: what marks one,
# and where its import is cached inside it
LEROBOT_INFO = "meta/info.json"
LEROBOT_CACHE = ".polcache"


def check_output(path: str | Path, what: str, *, folder: bool, ours: Callable[[Path], bool] | None = None,
                 flag: str | None = "--out", inputs: Iterable[str | Path] = (),
                 error: type[PolcacheError] = OutputError, whole: bool = False) -> Path:
    """`path` as a Path when the command may write `what` there; else OutputError in one line.

    folder: the output is a directory (an existing empty one is fine) or else a file.
    ours: true for an existing output of this command, which may be replaced; None: nothing may be.
    inputs: paths the command reads, which the output must not be.
    error: the class raised (a library writer raises its own, e.g. DatasetError).
    whole: the command replaces the folder whole (a dataset, an exported policy, a report); else it puts
    files into it (GIFs, keys), which must then not be such a folder itself either."""
    name = f"{flag} {path}" if flag else str(path)
    if not str(path).strip():
        raise error(f"{flag or 'output'}: empty path; expected {what}")
    if not folder and str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file there
        raise error(f"{name}: ends with a slash, a folder; expected {what}, a file name")
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise error(f"{name}: {parent} is a file, not a folder")
    if (holder := enclosing_output(path, itself=folder and not whole)) is not None:
        where = f"is {holder[1]}" if holder[0] == path.resolve() else f"is inside {holder[0]}, {holder[1]}"
        raise error(f"{name}: {where}, which is replaced whole when it is written again; give a path outside it")
    for source in inputs:
        if Path(source).resolve() == path.resolve():
            raise error(f"{name}: is also the input; refusing to overwrite it")
    if (why := unwritable(path)) is not None:
        raise error(f"{name}: {why}; nothing was done")
    if not path.exists():
        return path
    if path.is_dir() != folder:
        raise error(f"{name}: is a {'file' if folder else 'folder'}; expected {what}")
    if folder and not any(path.iterdir()):
        return path
    if ours is None or not ours(path):
        it = replaced_whole(path)  # a checkpoint, a run, an artifact...: named, where the folder is one
        raise error(f"{name}: exists and is {it + ', ' if it else ''}not {what}; refusing to overwrite it")
    return path


def unwritable(path: Path) -> str | None:
    """Why the output cannot be written, checked where its writer creates it (the nearest existing
    folder above it): a read-only file system, a folder this user may not write in or a full disk
    were found only after the recording, training or evaluation was done."""
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not folder.is_dir():  # a file where a folder of the path goes (access() would call it unwritable)
        return f"{folder} is a file, not a folder"
    fs = os.statvfs(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is on a read-only file system" if fs.f_flag & os.ST_RDONLY else \
            f"{folder} is not writable by this user"
    # a full disk too (the space a run's output will need cannot be known ahead; none at all can); a
    # file system of no blocks is no disk: /proc and /sys (which root's access() calls writable) refuse
    # new files, a FUSE file system may not, so there a folder is made and removed to know
    if fs.f_blocks and (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) == 0:
        return f"no space left on the file system of {folder}"
    if not fs.f_blocks:
        try:
            os.rmdir(tempfile.mkdtemp(dir=folder))
        except OSError:
            return f"{folder} is on a file system where files cannot be created (such as /proc or /sys)"
    return None


def json_kind(path: Path, format: str, fields: Iterable[str] = ()) -> bool:
    """True for a JSON object whose "format" is `format`, or, for files written before the marker,
    one that has every one of `fields`."""
    try:
        doc = read_json_object(path)
    except Exception:
        return False
    fields = list(fields)
    return doc.get("format") == format or (bool(fields) and all(f in doc for f in fields))


def replaced_whole(folder: Path) -> str | None:
    """What `folder` is where polcache replaces it whole at its next write (everything put inside
    it is then lost), else None: a zarr dataset (recorded, imported or embedded), a checkpoint
    (training's OUT/last and OUT/best), an exported policy, a report, a LeRobot dataset root (which
    `data export-lerobot` writes again whole)."""
    if (folder / "zarr.json").is_file():
        return "a dataset"
    if (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file():
        return "a checkpoint"
    if (folder / "manifest.json").is_file() and json_kind(folder / "manifest.json", "polcache-export"):
        return "an exported policy"
    if (folder / "index.html").is_file() and (folder / "views.json").is_file():
        return "a report"
    if (folder / LEROBOT_INFO).is_file():
        return "a LeRobot dataset"
    return None


def enclosing_output(path: str | Path, itself: bool = False) -> tuple[Path, str] | None:
    """The outermost folder above `path` (or, with `itself`, `path` too: a folder that a command puts
    files into) that is replaced whole (see `replaced_whole`), and what it is."""
    path = Path(path).resolve()
    for folder in [*reversed(path.parents), *([path] if itself else [])]:
        if (what := replaced_whole(folder)) is not None:
            if what == "a LeRobot dataset" and path.relative_to(folder).parts[:1] == (LEROBOT_CACHE,):
                continue  # its import cache, polcache's own: imported again when an export wiped it
            return folder, what
    return None
