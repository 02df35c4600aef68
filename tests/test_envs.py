"""Simulation tasks: registry, seeding, observation layout, the cue-reach memory property and recording."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from polcache.envs import list_tasks, make_env, make_expert, record_demonstrations
from polcache.envs.cue_reach import CUE_STEPS, DOCK_BY, GO_STEP
from polcache.errors import PolcacheError, UnknownTaskError


@pytest.fixture(scope="module")
def reach():
    env = make_env("reach-v3", seed=0)
    yield env
    env.close()


def rollout(env, policy, seed):
    """Observations (including the last) and the final info of one episode."""
    obs = env.reset(seed=seed)
    history = [obs]
    info = {"success": False}
    for _ in range(env.max_episode_steps):
        obs, _, done, info = env.step(policy(obs))
        history.append(obs)
        if done:
            break
    return history, info


# --- registry ---------------------------------------------------------------------------


def test_list_tasks_has_all_metaworld_tasks_and_our_own():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    tasks = list_tasks()
    assert len(ALL_V3_ENVIRONMENTS) == 50
    assert set(ALL_V3_ENVIRONMENTS) <= set(tasks)
    assert {"cue-reach", "pad-reach-left", "pad-reach-middle", "pad-reach-right"} <= set(tasks)
    assert len(tasks) == len(set(tasks)) == 54


def test_own_tasks_run_where_meta_world_is_not_installed(monkeypatch):
    """A robot workstation may have MuJoCo alone: cue-reach must not need Meta-World, and a
    Meta-World name there says what to install instead of "unknown task"."""
    monkeypatch.setitem(sys.modules, "metaworld.policies", None)  # `import metaworld.policies` fails
    assert "reach-v3" not in list_tasks() and "cue-reach" in list_tasks()
    env = make_env("cue-reach", seed=0)
    env.reset(seed=0)
    env.close()
    with pytest.raises(UnknownTaskError, match=r"'reach-v3' is not one of polcache's own .*polcache\[sim\]"):
        make_env("reach-v3")


def test_a_library_failing_inside_a_lazy_import_is_named(tmp_path, monkeypatch):
    """PyOpenGL without libEGL raises AttributeError while MuJoCo imports; `from polcache.envs
    import make_env` must show it, not only "cannot import name"."""
    (tmp_path / "lazypkg").mkdir()
    (tmp_path / "lazypkg" / "__init__.py").write_text(
        "from polcache.lazy import lazy_exports\n__getattr__ = lazy_exports(__name__, {'thing': 'lazypkg.broken'})\n")
    (tmp_path / "lazypkg" / "broken.py").write_text("import types\ntypes.SimpleNamespace().eglQueryString\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="lazypkg.thing: importing lazypkg.broken failed: .*eglQueryString") as err:
        from lazypkg import thing  # noqa: F401
    assert isinstance(err.value, PolcacheError)  # the command line prints it in one line


def test_a_renderer_that_cannot_load_is_one_line_naming_mujoco_gl(tmp_path):
    """MUJOCO_GL=osmesa where libosmesa6 is missing: PyOpenGL fails inside MuJoCo's import with an
    AttributeError (a stand-in mujoco package raises the same here)."""
    import os
    import subprocess

    (tmp_path / "mujoco").mkdir()
    (tmp_path / "mujoco" / "__init__.py").write_text("None.glGetError\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.run([sys.executable, "-m", "polcache", "record", "--task", "cue-reach", "--episodes", "1", "--out",
                          str(tmp_path / "x.zarr")], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "'NoneType' object has no attribute 'glGetError'" in line and "MUJOCO_GL=disable runs state-only" in line
    assert "MUJOCO_GL=" in line and "MUJOCO_GL=disable runs state-only tasks" in line


def test_unknown_task_names_it_and_suggests():
    with pytest.raises(UnknownTaskError) as e:
        make_env("reach-v2")
    msg = str(e.value)
    assert "reach-v2" in msg and "reach-v3" in msg and "\n" not in msg
    with pytest.raises(UnknownTaskError, match="cue-reach"):
        make_expert("cue-rech", None)


def test_unknown_camera_is_a_clear_error():
    with pytest.raises(PolcacheError, match="'tpo'.*did you mean top"):
        make_env("cue-reach", cameras=("tpo",))


# --- Meta-World -------------------------------------------------------------------------


def test_metaworld_seeds_differ_and_reproduce(reach):
    a = reach.reset(seed=1)["state"]
    goal_a = reach.goal()
    b = reach.reset(seed=2)["state"]
    assert not np.allclose(goal_a, reach.goal())
    assert not np.allclose(a[-3:], b[-3:])  # the goal is part of the observation
    np.testing.assert_array_equal(reach.reset(seed=1)["state"], a)
    np.testing.assert_array_equal(reach.goal(), goal_a)
    # make_env(seed=s) starts with the episode reset(seed=s) gives, then s + 1.
    other = make_env("reach-v3", seed=1)
    np.testing.assert_array_equal(other.reset()["state"], a)
    np.testing.assert_array_equal(other.reset()["state"], b)
    other.close()


def test_metaworld_state_obs_matches_spec(reach):
    obs = reach.reset(seed=0)
    obs2, reward, done, info = reach.step(np.zeros(reach.action_dim))
    spec = reach.observation_spec()
    assert set(spec) == set(obs) == {"state"}
    for o in (obs, obs2):
        assert o["state"].shape == spec["state"].shape == (39,)
        assert o["state"].dtype == np.float32
    assert isinstance(reward, float) and done is False and info["success"] is False
    assert reach.max_episode_steps == 500 and reach.action_dim == 4
    assert "reach" in reach.description


def test_metaworld_rest_action_keeps_the_hand_and_the_grip(reach):
    reach.reset(seed=0)
    move = np.array([1.0, 0.0, 0.0, 0.7], np.float32)
    for _ in range(5):
        obs, *_ = reach.step(move)
    rest = reach.rest_action(move)
    np.testing.assert_allclose(rest, [0.0, 0.0, 0.0, 0.7])
    hand = [obs["state"][:3]]
    for _ in range(8):
        obs, *_ = reach.step(rest)
        hand.append(obs["state"][:3])
    step = np.linalg.norm(np.diff(hand, axis=0), axis=1)
    assert step[-1] < 0.1 * step[0]  # the hand settles where its last command put it (it lags the mocap)


def test_metaworld_expert_succeeds(reach):
    _, info = rollout(reach, make_expert("reach-v3", reach), seed=3)
    assert info["success"]


def test_metaworld_images_match_spec_and_are_not_black():
    env = make_env("push-v3", seed=0, image=True, cameras=("corner", "topview"), image_size=64)
    obs = env.reset()
    spec = env.observation_spec()
    assert set(obs) == set(spec) == {"state", "image_corner", "image_topview"}
    for key in ("image_corner", "image_topview"):
        assert obs[key].shape == spec[key].shape == (64, 64, 3)
        assert obs[key].dtype == np.uint8
        assert obs[key].mean() > 20 and obs[key].std() > 10
    frame = env.render(size=128)
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    env.close()


def test_corner_camera_is_upright():
    """Meta-World's corner camera is mounted upside down; upright, the black sky is at the top."""
    env = make_env("reach-v3", seed=0)
    env.reset()
    image = env.render("corner", 64).astype(float)
    assert image[:8].mean() < image[-8:].mean()
    env.close()


# --- cue-reach --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cue():
    env = make_env("cue-reach", seed=0, image=True, cameras=("top",), image_size=48)
    yield env
    env.close()


def test_cue_reach_spec_and_images(cue):
    obs = cue.reset(seed=0)
    spec = cue.observation_spec()
    assert set(obs) == set(spec) == {"state", "image_top"}
    assert obs["state"].shape == spec["state"].shape and obs["state"].dtype == np.float32
    assert obs["image_top"].shape == spec["image_top"].shape == (48, 48, 3)
    assert obs["image_top"].std() > 10
    assert cue.action_dim == 2 and cue.max_episode_steps <= 80


def test_cue_reach_expert_always_succeeds(cue):
    expert = make_expert("cue-reach", cue)
    targets = []
    for seed in range(12):
        _, info = rollout(cue, expert, seed)
        assert info["success"], f"seed {seed}"
        targets.append(cue.target)
    assert set(targets) == {0, 1, 2}


def test_cue_reach_decision_time_observations_carry_no_cue(cue):
    """States and images from DOCK_BY to the go signal are identical whatever the target, so a
    policy seeing only the last two observations at decision time chooses blindly: 1/3 at best."""
    expert = make_expert("cue-reach", cue)
    by_target: dict[int, list] = {}
    for seed in range(12):
        history, _ = rollout(cue, expert, seed)
        by_target.setdefault(cue.target, []).append(history)
        # With a camera the state never carries the cue: only the lit pad in the image does.
        assert not np.stack([o["state"][4:7] for o in history]).any()
    assert set(by_target) == {0, 1, 2}
    reference = by_target[0][0]
    for histories in by_target.values():
        for history in histories:
            for t in range(DOCK_BY, GO_STEP + 1):
                np.testing.assert_array_equal(history[t]["state"], reference[t]["state"])
                np.testing.assert_array_equal(history[t]["image_top"], reference[t]["image_top"])
    # Early images do show the cue: the first frames differ between targets.
    assert not np.array_equal(by_target[0][0][0]["image_top"], by_target[1][0][0]["image_top"])


def test_cue_reach_state_shows_the_cue_only_during_the_cue_phase():
    with make_env("cue-reach") as env:
        expert = make_expert("cue-reach", env)
        for seed in range(3):
            history, _ = rollout(env, expert, seed)
            cue_part = np.stack([o["state"][4:7] for o in history[: GO_STEP + 1]])
            assert (cue_part[:CUE_STEPS].argmax(1) == env.target).all()  # informative early...
            assert not cue_part[CUE_STEPS:].any()  # ...and gone afterwards


def test_cue_reach_rushing_to_the_lit_pad_fails():
    """A short-memory shortcut (go to the lit pad while it is lit) is ruled out."""
    env = make_env("cue-reach")
    pads = env.pads

    def greedy(obs):
        target = pads[int(obs["state"][4:7].argmax())]
        return np.clip((target - obs["state"][:2]) * 20, -1, 1)

    for seed in range(3):
        history, info = rollout(env, greedy, seed)
        assert not info["success"] and len(history) - 1 < env.max_episode_steps
    env.close()


# --- pad-reach: the instruction is the only cue ------------------------------------------


def test_pad_reach_tasks_look_alike_until_the_expert_heads_for_its_pad():
    """Up to the go signal the three tasks give identical states and images for a seed, so only
    the instruction can tell a policy which pad to reach; the expert reaches the named one."""
    from polcache.envs.pad_reach import PAD_REACH_TASKS

    histories = {}
    for pad, task in enumerate(PAD_REACH_TASKS):
        with make_env(task, image=True, cameras=("top",), image_size=32) as env:
            history, info = rollout(env, make_expert(task, env), seed=7)
            assert info["success"] and env.target == pad
            histories[task] = history
    reference = histories[PAD_REACH_TASKS[0]]
    for history in histories.values():
        for t in range(GO_STEP + 1):
            np.testing.assert_array_equal(history[t]["state"], reference[t]["state"])
            np.testing.assert_array_equal(history[t]["image_top"], reference[t]["image_top"])
    finals = {task: h[-1]["state"][:2] for task, h in histories.items()}
    assert len({tuple(np.round(p, 3)) for p in finals.values()}) == 3


# --- recording --------------------------------------------------------------------------


def test_record_reach_writes_successful_episodes(tmp_path, reach):
    from polcache.data.store import EpisodeStore

    out = tmp_path / "reach.zarr"
    summary = record_demonstrations("reach-v3", 2, out, seed=5, progress=False)
    assert summary["episodes"] == 2 and summary["dropped"] == 0
    store = EpisodeStore.open(out)
    assert store.num_episodes == 2 and store.action_dim == 4
    attrs = store.attrs
    assert attrs["task"] == "reach-v3" and attrs["seed"] == 5 and attrs["episode_seeds"] == [5, 6]
    assert attrs["obs_spec"] == {"state": {"shape": [39], "dtype": "float32"}}
    assert attrs["expert"].endswith("SawyerReachV3Policy")
    assert attrs["fps"] == 80.0  # Meta-World steps 5 x 2.5 ms: a LeRobot export states the real rate
    # obs[t] is the observation before action[t]: replaying the actions reproduces the states.
    episode = store.episode(1)
    obs = reach.reset(seed=6)
    for t in range(len(episode.action)):
        np.testing.assert_allclose(episode.obs["state"][t], obs["state"], atol=1e-6)
        obs, _, _, info = reach.step(episode.action[t])
    assert info["success"]
    assert len(episode.action) < reach.max_episode_steps


def test_record_drops_failed_episodes(tmp_path, monkeypatch):
    from polcache.data.store import EpisodeStore
    from polcache.envs import record

    def flaky_expert(task, env):
        expert = make_expert(task, env)
        return lambda obs: np.zeros(2, np.float32) if env.target == 0 else expert(obs)

    monkeypatch.setattr(record, "make_expert", flaky_expert)
    summary = record_demonstrations("cue-reach", 6, tmp_path / "cue", image=True, image_size=32, progress=False)
    env = make_env("cue-reach")
    zero_target = [s for s in range(6) if (env.reset(seed=s), env.target)[1] == 0]
    assert summary["dropped_seeds"] == zero_target and summary["episodes"] == 6 - len(zero_target) > 0
    store = EpisodeStore.open(tmp_path / "cue")
    assert store.obs_keys == ["image_top", "state"] and store.num_episodes == summary["episodes"]


def test_record_keep_replaces_failed_episodes(tmp_path, monkeypatch):
    from polcache.envs import record

    def flaky_expert(task, env):
        expert = make_expert(task, env)
        return lambda obs: np.zeros(2, np.float32) if env.target == 0 else expert(obs)

    monkeypatch.setattr(record, "make_expert", flaky_expert)
    summary = record_demonstrations("cue-reach", 20, tmp_path / "cue", progress=False, keep=3)
    assert summary["episodes"] == 3  # stopped once 3 were kept, failures did not count
    attempted = 3 + summary["dropped"]
    env = make_env("cue-reach")
    assert summary["dropped_seeds"] == [s for s in range(attempted) if (env.reset(seed=s), env.target)[1] == 0]


def test_record_cli(tmp_path, capsys):
    from polcache.cli import main
    from polcache.data.store import EpisodeStore

    assert main(["record", "--task", "cue-reach", "--episodes", "2", "--out", str(tmp_path / "d"), "--seed", "3",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out  # the kept line without the bar too: scripts and logs run without it
    assert "record cue-reach: kept 2 of 2 episodes, dropped 0" in out and "2 episodes" in out
    assert main(["record", "--task", "cue-reach", "--episodes", "2", "--out", str(tmp_path / "p"),
                 "--hold-steps", "7", "--stop-steps", "5", "--action-noise", "0.1", "--no-progress"]) == 0
    attrs = EpisodeStore.open(tmp_path / "p").attrs
    assert (attrs["hold_steps"], attrs["stop_steps"], attrs["action_noise"], attrs["stop_rate"]) == (7, 5, 0.1, 0.1)
    assert main(["record", "--task", "cue-reach", "--episodes", "1", "--keep", "3", "--out", str(tmp_path / "k"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "; --keep 3 not reached in 1 attempts" in out and ": 1 episode, " in out
    with pytest.raises(SystemExit):  # refused by the flag's type, before anything is recorded
        main(["record", "--task", "cue-reach", "--episodes", "1", "--out", str(tmp_path / "n"), "--stop-steps", "-1"])
    assert "argument --stop-steps: expected an integer >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # accepted and ignored, it wrote a state-only dataset
        main(["record", "--task", "cue-reach", "--episodes", "1", "--out", str(tmp_path / "n"), "--image-size", "7"])
    assert "argument --image-size: sizes camera images; give --image (or --cameras) with it" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert main(["record", "--task", "nope", "--episodes", "1", "--out", str(tmp_path / "e")]) == 2
    assert "'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("sig, status, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_stopped_record_keeps_the_old_dataset_and_says_so(tmp_path, capsys, monkeypatch, sig, status, said):
    """A process manager's SIGTERM stops recording as Ctrl-C does: the line saying so, 128 + the signal."""
    import signal

    from polcache.cli import main
    from polcache.data.store import EpisodeStore
    from polcache.envs import record

    out = tmp_path / "d.zarr"
    assert main(["record", "--task", "cue-reach", "--episodes", "2", "--out", str(out)]) == 0
    before = EpisodeStore.open(out).num_episodes
    run_episode, calls = record._run_episode, []

    def stop_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(getattr(signal, sig))
        return run_episode(*args, **kwargs)

    monkeypatch.setattr(record, "_run_episode", stop_in_the_second)
    capsys.readouterr()
    assert main(["record", "--task", "cue-reach", "--episodes", "5", "--out", str(out)]) == status
    assert capsys.readouterr().err.strip().endswith(f"polcache record: {said}")
    assert EpisodeStore.open(out).num_episodes == before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_during_the_save_lets_the_save_finish_and_says_what_was_written(tmp_path, capsys, monkeypatch, sig):
    """Every episode recorded, a stop in the final save: it said "terminated" (143) although the swap had
    already replaced the dataset. The save is held to its end and the run reports the new dataset."""
    import signal

    from polcache.cli import main
    from polcache.data import store
    from polcache.data.store import EpisodeStore

    out = tmp_path / "d.zarr"
    assert main(["record", "--task", "cue-reach", "--episodes", "2", "--out", str(out)]) == 0
    put = store._put

    def stop_while_saving(*args, **kwargs):
        signal.raise_signal(getattr(signal, sig))
        return put(*args, **kwargs)

    monkeypatch.setattr(store, "_put", stop_while_saving)
    capsys.readouterr()
    assert main(["record", "--task", "cue-reach", "--episodes", "3", "--out", str(out), "--no-progress"]) == 0
    streams = capsys.readouterr()
    assert "wrote" in streams.out and EpisodeStore.open(out).num_episodes == 3
    assert "record" not in streams.err  # --no-progress: no bar (as every other long command has)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_perturbed_actions_are_executed_and_the_experts_own_are_recorded():
    """Holds, stops and action noise change what the robot executes; the dataset keeps the
    expert's action at every observation."""
    from polcache.envs.record import Perturbations, _run_episode

    class Counter:
        """State = the step count; executes whatever it is given and remembers it."""
        task, max_episode_steps = "count", 400

        def reset(self, seed):
            self.t, self.executed = 0, []
            return {"state": np.array([0.0], np.float32)}

        def step(self, action):
            self.executed.append(float(action[0]))
            self.t += 1
            return {"state": np.array([self.t], np.float32)}, 0.0, False, {"success": False}

    env = Counter()
    expert = lambda obs: obs["state"].copy()  # noqa: E731  the action names the step it was decided at
    episode, _ = _run_episode(env, expert, seed=0, extra_steps=0, perturb=Perturbations(hold_steps=3))
    np.testing.assert_array_equal(episode.action[:, 0], np.arange(400))  # labels: always the expert's
    executed = np.array(env.executed)
    stale = np.arange(400) - executed  # how old the executed decision is
    assert stale.min() == 0 and stale.max() >= 3
    assert 0.1 < (stale > 0).mean() < 0.4  # holds start at 10% of steps and last 1-3 steps
    held = np.flatnonzero(stale > 0)
    np.testing.assert_array_equal(executed[held], executed[held - 1])  # a held step repeats the step before
    _run_episode(env, expert, seed=0, extra_steps=0)
    assert env.executed == list(map(float, range(400)))  # off by default
    with pytest.raises(PolcacheError, match="--hold-steps must be >= 0, got -1"):
        Perturbations(hold_steps=-1)

    # --stop-steps: the robot rests (the env's rest action, here -1) for 1..S steps instead
    env.rest_action = lambda last: np.full_like(last, -1.0)
    episode, _ = _run_episode(env, expert, seed=0, extra_steps=0, perturb=Perturbations(stop_steps=3))
    np.testing.assert_array_equal(episode.action[:, 0], np.arange(400))
    executed = np.array(env.executed)
    rests = np.flatnonzero(executed == -1)
    np.testing.assert_array_equal(executed[executed != -1], np.flatnonzero(executed != -1))  # fresh otherwise
    assert 0.1 < len(rests) / 400 < 0.4
    runs = np.split(rests, np.flatnonzero(np.diff(rests) > 1) + 1)
    assert max(len(r) for r in runs) <= 6  # 1..3 steps each; one stop may follow another
    with pytest.raises(PolcacheError, match="--stop-steps must be >= 0, got -2"):
        Perturbations(stop_steps=-2)

    # --action-noise: every fresh action gets Gaussian noise of that deviation, clipped to [-1, 1]
    expert = lambda obs: np.array([0.5, 0.0], np.float32)  # noqa: E731
    episode, _ = _run_episode(env, expert, seed=0, extra_steps=0, perturb=Perturbations(action_noise=0.2))
    np.testing.assert_array_equal(episode.action, np.tile([0.5, 0.0], (400, 1)))
    noise = np.array(env.executed) - 0.5
    assert abs(noise.mean()) < 0.05 and 0.17 < noise.std() < 0.23
    with pytest.raises(PolcacheError, match="--action-noise must be >= 0, got nan"):
        Perturbations(action_noise=float("nan"))


def test_rest_action_stops_the_point_mass():
    """A stop rests the robot: cue-reach's point mass stops (velocity actions)."""
    from polcache.envs import make_env

    with make_env("cue-reach", seed=0, image=False, cameras=None, image_size=96) as env:
        env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(np.array([1.0, 0.5], np.float32))
        assert np.linalg.norm(obs["state"][2:4]) > 0.05
        for _ in range(3):
            obs, *_ = env.step(env.rest_action(np.array([1.0, 0.5], np.float32)))
        np.testing.assert_allclose(obs["state"][2:4], 0.0, atol=0.02)
