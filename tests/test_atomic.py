"""Atomic directory writes: `path` always names a complete directory, and what a killed writer
left behind is undone by the next write."""

import subprocess
import sys

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
