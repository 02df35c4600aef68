"""Atomic directory writes: `path` always names a complete directory, and what a killed writer
left behind is undone by the next write."""

import subprocess
import sys
from pathlib import Path

import pytest

import polcache.atomic as atomic
from polcache.atomic import atomic_directory, atomic_write_text


def _write(path, text):
    with atomic_directory(path) as tmp:
        tmp.mkdir()
        (tmp / "data.txt").write_text(text)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_directory_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _write(tmp_path / "d", "first")
    _write(tmp_path / "d", "second")
    assert (tmp_path / "d" / "data.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d") as tmp:
        tmp.mkdir()
        raise RuntimeError("the write failed")
    assert (tmp_path / "d" / "data.txt").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_the_next_write_undoes_what_a_killed_writer_left(tmp_path):
    dead = _dead_pid()
    aside = tmp_path / f".d.old-{dead}-0a1b2c3d"  # killed between its two renames: d missing
    aside.mkdir()
    (aside / "data.txt").write_text("good")
    (tmp_path / f".d.tmp-{dead}-0a1b2c3d").mkdir()  # its half-written replacement
    (tmp_path / f".f.txt.tmp-{dead}-00000000").write_text("half")
    live = tmp_path / f".d.tmp-{atomic.os.getpid()}-ffffffff"  # a writer still running: left alone
    live.mkdir()
    atomic._recover(tmp_path / "d")  # noqa: SLF001 - what every write of d does first
    assert (tmp_path / "d" / "data.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", live.name, f".f.txt.tmp-{dead}-00000000"])
    atomic_write_text(tmp_path / "f.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", live.name, "f.txt"])


def test_of_several_directories_set_aside_the_newest_is_put_back(tmp_path):
    """Two `.old` leftovers (a restore that could not rename, then a second killed writer): the one set
    aside last holds the newer data, whatever the order of the random tags in their names."""
    import time

    dead = _dead_pid()
    for tag, text in (("00000000", "older"), ("ffffffff", "newer")):
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "data.txt").write_text(text)
        atomic.os.rename(tmp_path / "src", tmp_path / f".d.old-{dead}-{tag}")  # a rename stamps its ctime
        time.sleep(0.01)
    atomic._recover(tmp_path / "d")  # noqa: SLF001 - what every write of d does first
    assert (tmp_path / "d" / "data.txt").read_text() == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_write_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Power loss: every file and folder of the new directory is fsynced before the swap, the parent after it
    (and after a file's replace)."""
    events, fsync, rename = [], atomic.os.fsync, atomic.os.rename

    def synced(fd):
        events.append(("fsync", atomic.os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", synced)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: (events.append(("swap", str(b))), False)[1])
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (events.append(("rename", str(b))), rename(a, b))[1])
    _write(tmp_path / "d", "first")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "data.txt").write_text("second")
    synced_names = [Path(p).name for op, p in events if op == "fsync"]
    first_swap = next(i for i, (op, _) in enumerate(events) if op == "swap")
    assert {"data.txt", "sub"} <= set(synced_names[:first_swap]) and events[first_swap - 1][1].startswith(str(tmp))
    assert events[-1] == ("fsync", str(tmp_path))  # the parent, after the renames
    events.clear()
    atomic_write_text(tmp_path / "f.txt", "whole")
    assert [op for op, _ in events] == ["fsync", "fsync"] and events[-1] == ("fsync", str(tmp_path))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_symbolic_link_is_written_through_and_nothing_is_left_beside_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    (tmp_path / "real").mkdir()
    _write(tmp_path / "real" / "d", "first")
    (tmp_path / "cur").symlink_to(tmp_path / "real" / "d")
    _write(tmp_path / "cur", "second")
    assert (tmp_path / "cur").is_symlink() and (tmp_path / "real" / "d" / "data.txt").read_text() == "second"
    (tmp_path / "real" / "f.json").write_text("old")
    (tmp_path / "f.json").symlink_to(tmp_path / "real" / "f.json")
    atomic_write_text(tmp_path / "f.json", "new")
    assert (tmp_path / "f.json").is_symlink() and (tmp_path / "real" / "f.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "f.json", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["d", "f.json"]


def test_a_link_left_as_a_temp_by_a_killed_writer_is_removed_and_its_target_kept(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.txt").write_text("keep")
    leftover = tmp_path / f".d.tmp-{_dead_pid()}-0a1b2c3d"
    leftover.symlink_to(tmp_path / "real")  # what the exchange of a link once left
    _write(tmp_path / "d", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "real"]
    assert (tmp_path / "real" / "data.txt").read_text() == "keep"


def test_a_killed_writers_temps_are_removed_though_its_pid_looks_alive(tmp_path):
    """In a container a dead writer's pid (e.g. 1) names a live process: its lock, free, says it is gone."""
    import fcntl

    for tag in ("1-0a1b2c3d", f"{atomic.os.getpid()}-ffffffff"):
        (tmp_path / f".d.tmp-{tag}").mkdir()
        (tmp_path / f".d.lock-{tag}").touch()
    held = open(tmp_path / f".d.lock-{atomic.os.getpid()}-ffffffff")  # a writer still writing holds its lock
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        _write(tmp_path / "d", "new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["d", f".d.tmp-{atomic.os.getpid()}-ffffffff", f".d.lock-{atomic.os.getpid()}-ffffffff"])
    finally:
        held.close()
    _write(tmp_path / "d", "newer")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_writer_holds_its_lock_while_it_writes_and_removes_it_after(tmp_path):
    with atomic_directory(tmp_path / "d") as tmp:
        tmp.mkdir()
        (lock,) = tmp_path.glob(".d.lock-*")
        assert not atomic._writer_gone(tmp_path / "d", lock.name.partition("lock-")[2])  # noqa: SLF001
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_full_disk_is_named_with_the_output_not_left_nameless_or_a_hidden_temp(tmp_path, monkeypatch):
    """write() and fsync() name no file when the disk fills ("No space left on device" alone, as `polcache
    export`, `eval --json`, `record --out` and `train out=` printed it); a failure naming a file inside the
    temp copy named a hidden `.NAME.tmp-*` path. Each now names the output, and leaves nothing beside it."""
    import errno

    from polcache.train.loop import _log
    from polcache.train.run_lock import run_lock

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fsync", full)
        with pytest.raises(OSError, match="No space left") as info:
            atomic_write_text(tmp_path / "f.json", "{}")
        assert info.value.filename == str(tmp_path / "f.json")
    with pytest.raises(OSError) as info:
        with atomic_directory(tmp_path / "d") as tmp:
            tmp.mkdir()
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert info.value.filename == str(tmp_path / "d") and info.value.errno == errno.ENOSPC
    with pytest.raises(PermissionError) as info:  # a file outside the temp copy keeps its own name
        with atomic_directory(tmp_path / "d"):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")
    assert info.value.filename == "/etc/shadow"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with monkeypatch.context() as m:  # training's log is appended to, not replaced: named all the same
        m.setattr(atomic.os, "fsync", full)
        m.setattr("builtins.open", lambda *a, **k: _FullFile())
        with pytest.raises(OSError) as info:
            _log(tmp_path / "train_log.jsonl", {"step": 1})
        assert info.value.filename == str(tmp_path / "train_log.jsonl")
    monkeypatch.setattr("polcache.train.run_lock.os.write", full)
    with pytest.raises(OSError) as info:
        with run_lock(tmp_path / "run"):
            pass
    assert info.value.filename == str(tmp_path / "run" / ".train.lock") and not (tmp_path / "run").exists()


class _FullFile:
    """A file on a full disk: the buffered write succeeds, the flush on close fails, naming no file."""

    def __enter__(self):
        return self

    def write(self, text):
        return len(text)

    def __exit__(self, *exc):
        raise OSError(28, "No space left on device")


def test_files_written_together_are_all_replaced_or_none(tmp_path, monkeypatch):
    """`polcache calibrate` on a nearly full disk: the schedule was replaced, then the picture's write
    failed, leaving the new schedule beside the old picture of another schedule."""
    import errno

    from polcache.atomic import atomic_write_together

    pair = [tmp_path / "sched.json", tmp_path / "sched.png"]
    atomic_write_together([(pair[0], b"old schedule"), (pair[1], b"old picture")])
    fsync, calls = atomic.os.fsync, []

    def fills_up(fd):
        calls.append(fd)
        if len(calls) == 2:  # the picture, after the schedule was written whole
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fills_up)
    with pytest.raises(OSError, match="No space left") as info:
        atomic_write_together([(pair[0], b"new schedule"), (pair[1], b"new picture")])
    assert info.value.filename == str(pair[1])
    assert [p.read_bytes() for p in pair] == [b"old schedule", b"old picture"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched.json", "sched.png"]  # no temp, no lock left
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write_together([(pair[0], b"new schedule"), (pair[1], b"new picture")])
    assert [p.read_bytes() for p in pair] == [b"new schedule", b"new picture"]


def test_a_second_process_making_the_same_output_is_refused_at_its_start(tmp_path):
    """Two `ptp embed --out X` at once both said "wrote X", the second's store replacing the first's
    unseen; a dataset written while another process writes it is refused, naming that process."""
    import numpy as np

    from polcache.data import Episode, write_dataset
    from polcache.errors import PolcacheError

    out = tmp_path / "d.zarr"
    episodes = [Episode(obs={"state": np.zeros((4, 2), np.float32)}, action=np.zeros((4, 2), np.float32))]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from polcache_client import filelock; filelock.hold(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / ".d.zarr.writing")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(PolcacheError, match=rf"d\.zarr: another process \(pid {holder.pid}\) is writing it"):
            write_dataset(out, episodes)
        assert not out.exists()
    finally:
        holder.kill()  # a killed writer's lock goes with it
        holder.wait()
    write_dataset(out, episodes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]  # the next writer's lock went when it ended
