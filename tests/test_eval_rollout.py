"""How evaluation feeds chunks to the env: step cap, executed actions per chunk, ensembling."""

import numpy as np
import pytest

from polcache.policy.spec import StatelessSession
from polcache.sim.evaluate import Rollout, run_episode
from fakes import ACTION_DIM, STATE_DIM, fake_spec


class CountingEnv:
    """Never succeeds; records every action it is given."""

    max_episode_steps = 40

    def __init__(self):
        self.actions: list[np.ndarray] = []

    def reset(self, seed=None):
        self.actions.clear()
        return {"state": np.zeros(STATE_DIM, np.float32)}

    def step(self, action):
        self.actions.append(np.asarray(action))
        return {"state": np.zeros(STATE_DIM, np.float32)}, 0.0, False, {"success": False}


class ChunkIndexBackend:
    """Chunk c is filled with the value c, so an executed action says which chunks made it."""

    def __init__(self, n_action_steps=4):
        self.spec = fake_spec(n_action_steps=n_action_steps)
        self.calls = 0

    def predict(self, obs, seed=None, past_actions=None):
        out = np.full((1, self.spec.n_action_steps, ACTION_DIM), float(self.calls), np.float32)
        self.calls += 1
        return out

    def session(self):
        return StatelessSession(self)


def _run(rollout: Rollout, n_action_steps=4):
    env, backend, lat = CountingEnv(), ChunkIndexBackend(n_action_steps), []
    result = run_episode(env, backend, seed=0, latencies=lat, rollout=rollout)
    return result, np.array([a[0] for a in env.actions]), len(lat)


def test_cap_and_default_chunking():
    result, acts, chunks = _run(Rollout(max_steps=10))
    assert result["length"] == 10 and chunks == 3
    assert acts.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert _run(Rollout())[0]["length"] == CountingEnv.max_episode_steps
    assert _run(Rollout(max_steps=1000))[0]["length"] == CountingEnv.max_episode_steps  # never above the task's


class SeedCheckingBackend(ChunkIndexBackend):
    """Records each chunk's seed after the check every real backend makes."""

    def __init__(self):
        super().__init__()
        self.seeds = []

    def predict(self, obs, seed=None, past_actions=None):
        from polcache.policy.spec import check_seed

        self.seeds.append(check_seed(seed))
        return super().predict(obs, seed, past_actions)


@pytest.mark.parametrize("seed", [1000, 10**15, 2**63 - 1, 2**63 + 5])  # the last: episode seed S + i past 2^63-1
def test_chunk_seeds_stay_in_every_backends_range_and_keep_their_old_values(seed):
    backend = SeedCheckingBackend()
    run_episode(CountingEnv(), backend, seed=seed, latencies=[], rollout=Rollout(max_steps=10))
    assert backend.seeds == [(seed * 10007 + c) % 2**63 for c in range(3)]
    if seed * 10007 + 2 < 2**63:  # what runs with such seeds drew before: unchanged
        assert backend.seeds == [seed * 10007 + c for c in range(3)]


def test_fewer_executed_actions_replan_sooner():
    _, acts, chunks = _run(Rollout(max_steps=6, action_steps=2))
    assert acts.tolist() == [0, 0, 1, 1, 2, 2] and chunks == 3
    from polcache.errors import PolcacheError

    with pytest.raises(PolcacheError, match="--action-steps 99: the policy executes at most 4 actions per chunk"):
        _run(Rollout(max_steps=8, action_steps=99))  # refused, no longer clamped to n_action_steps in silence


@pytest.mark.parametrize("decay, expected", [(0.0, [0, 0, 0.5, 0.5, 1.5, 1.5]),
                                             (50.0, [0, 0, 1, 1, 2, 2])])
def test_ensembling_blends_overlapping_chunks(decay, expected):
    # Chunks of 4 replanned every 2 steps: from step 2 on, two chunks cover every step.
    _, acts, _ = _run(Rollout(max_steps=6, action_steps=2, ensemble_decay=decay))
    assert acts == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("action_steps, delay, hint", [(None, 0, "pass --action-steps 3 or fewer"),
                                                      (2, 2, "pass --action-steps 1 or fewer"),
                                                      (1, 3, "lower --delay")])
def test_ensembling_chunks_that_never_overlap_is_refused_not_a_silent_no_op(action_steps, delay, hint):
    from polcache.errors import PolcacheError

    with pytest.raises(PolcacheError, match=f"--ensemble blends nothing here.*{hint}"):
        _run(Rollout(max_steps=6, action_steps=action_steps, ensemble_decay=0.5, delay=delay))


def test_a_delay_keeps_the_previous_chunk_running_until_the_next_arrives():
    from polcache.errors import PolcacheError

    # chunk c is planned at step 4c and arrives 3 steps later; the first chunk is waited for
    result, acts, _ = _run(Rollout(max_steps=16, action_steps=4, delay=3), n_action_steps=8)
    assert acts.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert np.isfinite(result["seam_jerk"]) and np.isfinite(result["jerk"])
    with pytest.raises(PolcacheError, match="needs chunks of at least 9 actions"):
        _run(Rollout(max_steps=16, action_steps=6, delay=3), n_action_steps=8)


def test_seam_jerk_separates_steps_where_a_chunk_takes_over():
    from polcache.sim.evaluate import seam_jerk

    smooth = np.arange(12, dtype=np.float32)[:, None]  # constant velocity: no jerk anywhere
    assert seam_jerk(smooth, [4, 8]) == {"seam_jerk": 0.0, "jerk": 0.0}
    jumpy = smooth.copy()
    jumpy[8:] += 5.0  # a jump where the chunk planned at step 8 takes over
    out = seam_jerk(jumpy, [4, 8])
    assert out["seam_jerk"] == pytest.approx(2.5) and out["jerk"] > 0
    # a chunk that arrived as the episode ended (over ZeroMQ) took over no executed step
    assert seam_jerk(jumpy, [4, 8, len(jumpy)]) == out


@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stopped_eval_reports_and_writes_the_finished_episodes(tmp_path, monkeypatch, capsys, sig, status):
    """A long evaluation stopped early is still a result: the episodes finished before Ctrl-C, a
    process manager's SIGTERM or a closed terminal's SIGHUP are summarised and written (marked as
    interrupted, with the signal, which SIGHUP's had been recorded as SIGTERM), and the command exits
    128 + the signal."""
    import importlib
    import json
    import signal

    from polcache.cli import main

    evaluate = importlib.import_module("polcache.sim.evaluate")  # the module: the package exports a function so named

    finished = []

    def stop_at_the_third(*args, **kwargs):
        if len(finished) == 2:
            signal.raise_signal(getattr(signal, sig))
        finished.append(run_episode(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(evaluate, "run_episode", stop_at_the_third)
    out = tmp_path / "e.json"
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (a runner under nohup ignores it)
    try:
        assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "5", "--max-steps",
                     "8", "--no-progress", "--json", str(out)]) == status
    finally:
        signal.signal(signal.SIGHUP, hangup)
    said = capsys.readouterr().out
    assert "reach-v3 [interrupted: 2 of 5 episodes finished]: success" in said
    result = json.loads(out.read_text())
    assert result["episodes"] == 2 and len(result["per_episode"]) == 2
    assert result["extra"]["interrupted"] == {"episodes_asked": 5, "signal": sig}


def test_a_step_cap_above_the_tasks_own_is_said(capsys):
    """The env ends its episodes at its own cap: the run goes on under that one, and one line says so."""
    from polcache.cli import main

    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/cue-reach-ptp", "--episodes", "1",
                 "--max-steps", "120", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "note: --max-steps 120 is above cue-reach's own cap of 70 steps; episodes end at 70"
    assert "(cap 70)" in out[1]


def test_an_instruction_for_a_policy_without_language_is_refused(capsys):
    from polcache.cli import main

    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1",
                 "--instruction", "reach the goal"]) == 2
    assert "--instruction: this policy takes no instruction" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1",
                 "--instructions", "train"]) == 2
    assert "--instructions train: this policy takes no instruction" in capsys.readouterr().err


def test_an_episode_gif_plays_at_the_tasks_pace_pauses_included(tmp_path):
    """imageio takes milliseconds: 0.08 gave every frame 0 ms, and a held pose's identical frames
    were merged away (the dock-and-wait phase of cue-reach vanished)."""
    from PIL import Image

    from polcache.sim.evaluate import _write_gif

    frames = [np.full((8, 8, 3), step // 6 * 40, np.uint8) for step in range(24)]  # a pose held 6 steps, 4 times
    _write_gif(tmp_path / "e.gif", frames, control_period_s=0.05)
    gif = Image.open(tmp_path / "e.gif")
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert sum(durations) == 24 * 50  # the episode's 24 steps at 20 Hz, the held poses kept


def test_the_json_result_is_written_when_stdout_is_closed(tmp_path, monkeypatch):
    """`polcache eval ... --json r.json | head -1`: the summary's print raised BrokenPipeError before
    the result was written, and the episodes run were lost."""
    import io
    import json

    from polcache.cli import main

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1", "--max-steps", "5",
                 "--no-progress", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["episodes"] == 1


def test_verification_that_chose_nothing_in_short_episodes_says_to_run_longer_ones(capsys):
    """Episodes shorter than a chunk: the warning said to lower --verify-min-past, already at 1."""
    from polcache.cli import main

    assert main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1", "--max-steps", "5",
                 "--verify", "2", "--verify-min-past", "1", "--no-progress"]) == 0
    said = capsys.readouterr().err
    assert "warning: self-verification: 0 of" in said and "longer episodes (--max-steps) verify" in said
    assert "lower --verify-min-past" not in said


def test_a_json_result_that_cannot_be_written_still_leaves_the_summary(tmp_path, monkeypatch, capsys):
    """Written before the summary, a --json that failed (a full disk) cost the summary too."""
    import errno
    import importlib

    from polcache.cli import main

    evaluate = importlib.import_module("polcache.sim.evaluate")  # the module: the package exports a function so named

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "atomic_write_text", full_disk)
    status = main(["eval", "--checkpoint", "polcache/assets/checkpoints/reach-v3", "--episodes", "1", "--max-steps", "5",
                   "--no-progress", "--json", str(tmp_path / "e.json")])
    said = capsys.readouterr()
    assert status != 0 and "reach-v3: success" in said.out and "wrote" not in said.out
    assert "No space left on device" in said.err
