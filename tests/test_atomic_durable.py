"""What a writer killed mid-write on a filesystem without an atomic exchange (NFS, CIFS, sshfs)
leaves behind is put back by the next reader, and training runs keep their checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from polcache.atomic import restore
from polcache.data import EpisodeStore
from polcache.policy import load_policy

from test_train_recipe import demo_dataset, train_cli

# Runs `code` in a fresh interpreter whose atomic writes cannot exchange (the two-renames fallback)
# and which dies (like SIGKILL: no cleanup) between the two renames of a write of `target`.
KILLED_BETWEEN_RENAMES = r"""
import os, sys
import polcache.atomic as atomic
atomic._exchange = lambda a, b: False
target, rename = os.path.realpath(sys.argv[1]), os.rename
def dying(a, b, *args, **kwargs):
    if os.path.realpath(b) == target and ".tmp-" in os.path.basename(a):
        os._exit(137)
    return rename(a, b, *args, **kwargs)
os.rename = dying
exec(sys.argv[2])
"""


def kill_between_renames(target, code):
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target), code], capture_output=True,
                          text=True)
    assert proc.returncode == 137, proc.stderr
    assert not target.exists() and list(target.parent.glob(f".{target.name}.old-*"))  # set aside, not back


def test_a_reader_puts_back_what_a_writer_killed_between_its_renames_set_aside(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "data.txt").write_text("good")
    kill_between_renames(d, "from polcache.atomic import atomic_directory\n"
                            f"with atomic_directory({str(d)!r}) as tmp:\n"
                            "    tmp.mkdir(); (tmp / 'data.txt').write_text('new')")
    assert restore(d) == d and (d / "data.txt").read_text() == "good"
    assert restore(d) == d  # a complete path: nothing to do


def test_a_dataset_whose_write_was_killed_between_renames_still_opens(tmp_path, capsys):
    data = demo_dataset(tmp_path / "d.zarr")
    kill_between_renames(data, f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                               "from test_train_recipe import demo_dataset\n"
                               f"demo_dataset({str(data)!r}, shift=5.0)")
    store = EpisodeStore.open(data)
    assert store.num_episodes == 3 and np.allclose(store.array("state")[0], 0.0)  # the complete old one


def test_a_run_whose_save_was_killed_between_renames_resumes_from_its_checkpoint(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0  # saved at step 2
    kill_between_renames(run / "last", "from polcache.policy import load_policy, save_checkpoint\n"
                                       f"policy, cfg, _ = load_policy({str(run / 'last')!r})\n"
                                       f"save_checkpoint({str(run / 'last')!r}, cfg, policy, step=3)")
    capsys.readouterr()
    assert train_cli(data, run, "train.steps=4") == 0
    assert capsys.readouterr().out.splitlines()[0] == f"resuming from {run / 'last'} at step 2"
    assert load_policy(run / "last")[2]["step"] == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".last")) == []


def test_loading_a_checkpoint_whose_save_was_killed_between_renames(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    kill_between_renames(run / "last", "from polcache.policy import load_policy, save_checkpoint\n"
                                       f"policy, cfg, _ = load_policy({str(run / 'last')!r})\n"
                                       f"save_checkpoint({str(run / 'last')!r}, cfg, policy, step=3)")
    assert load_policy(run / "last")[2]["step"] == 2


# Holds OUT's training lock as a running `polcache train` does, until its stdin closes.
HOLDS_THE_RUN = r"""
import sys
from pathlib import Path
from polcache.train.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_second_training_with_the_same_out_is_refused_while_one_runs(tmp_path, capsys):
    import pytest

    from polcache.config import load_config
    from polcache.errors import ConfigError
    from polcache.train.loop import save_initial

    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    assert train_cli(data, run) == 0
    first = subprocess.Popen([sys.executable, "-c", HOLDS_THE_RUN, str(run)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "holding\n"
        capsys.readouterr()
        assert train_cli(data, run, "train.steps=4") == 2
        assert capsys.readouterr().err.strip() == (
            f"polcache train: error: out={run}: another training holds it (pid {first.pid}, lock {run / '.train.lock'}); "
            "wait for it to end or give another out directory")
        assert load_policy(run / "last")[2]["step"] == 2  # untouched
        cfg = load_config("configs/recommended_cpu.yaml", [f"dataset={data}", f"out={run}"])
        with pytest.raises(ConfigError, match="another training holds it"):  # a suite's untrained baseline too
            save_initial(cfg)
        assert load_policy(run / "last")[2]["step"] == 2
    finally:
        first.kill()  # the kernel drops a killed run's lock: the next run goes on
        first.wait()
    assert train_cli(data, run, "train.steps=4") == 0
    assert load_policy(run / "last")[2]["step"] == 4


def test_a_run_killed_before_writing_anything_leaves_an_out_that_the_next_run_takes(tmp_path, capsys):
    run, data = tmp_path / "run", demo_dataset(tmp_path / "d.zarr")
    run.mkdir()
    (run / ".train.lock").write_text("12345\n")  # all that a run killed while loading its data leaves
    assert train_cli(data, run) == 0
    assert load_policy(run / "last")[2]["step"] == 2
    assert train_cli(tmp_path / "missing.zarr", tmp_path / "new") == 2  # failed before any work: no folder left
    assert not (tmp_path / "new").exists()


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from polcache.train.loop import launch_rank
    from polcache.train.run_lock import run_lock

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch_rank() == 1
    with run_lock(tmp_path / "run", rank=0):
        with run_lock(tmp_path / "run", rank=1):  # another rank of the same run: not refused, takes nothing
            pass


def test_train_refuses_an_out_it_cannot_write_before_any_work(tmp_path, capsys, monkeypatch):
    """It failed at its lock file with status 1 (before the lock: a traceback)."""
    from polcache import outputs

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    assert train_cli(demo_dataset(tmp_path / "d.zarr"), locked / "run") == 2
    assert f"out={locked / 'run'}: {locked} is not writable by this user; nothing was done" in capsys.readouterr().err
    assert not (locked / "run").exists()
