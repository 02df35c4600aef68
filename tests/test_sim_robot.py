"""The simulated robot over ZeroMQ agrees with in-process evaluation of the same policy."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from polcache.policy.spec import ArraySpec, PolicySpec, StatelessSession
from polcache.serve.server import PolicyServer

pytest.importorskip("metaworld")

TASK = "reach-v3"


class ExpertBackend:
    """Meta-World's scripted reach policy as a chunking backend: the expert's action for the
    newest observation, repeated for the chunk (a stand-in for a trained checkpoint)."""

    spec = PolicySpec(obs={"state": ArraySpec((39,), "float32")}, action_dim=4, n_obs_steps=2, horizon=8,
                      n_action_steps=8, task=TASK)

    def __init__(self):
        from polcache.envs.metaworld_env import metaworld_expert

        self.expert = metaworld_expert(TASK)

    def predict(self, obs, seed=None, past_actions=None):
        action = self.expert({"state": obs["state"][0, -1]})
        return np.repeat(action[None, None], self.spec.n_action_steps, axis=1).astype(np.float32)

    def session(self):
        return StatelessSession(self)


def test_sim_robot_over_zeromq_matches_in_process_eval():
    from polcache.sim.robot import run_sim_robot
    from polcache.sim.evaluate import evaluate

    episodes = 4
    in_process = evaluate(ExpertBackend(), TASK, episodes, seed=1000, progress=False)
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        remote = run_sim_robot(TASK, server.endpoint, hz=100, episodes=episodes, seed=1000)
    assert remote.successes == in_process.successes == episodes
    assert remote.ci95 == in_process.ci95
    assert [e["seed"] for e in remote.per_episode] == [e["seed"] for e in in_process.per_episode]
    tick = remote.extra["tick"]
    assert tick["safe_stops"] == 1 and remote.extra["safe_stop"]  # the robot stopped at the end
    assert tick["ticks"] >= sum(e["length"] for e in remote.per_episode)
    assert remote.latency_ms["n"] > 0
    assert "success 100%" in remote.summary()
    # what each measures: a robot's latency spans capture to its tick, eval's is the inference alone
    assert "observation-to-action latency p50" in remote.summary() and "inference p50" in remote.summary()
    assert "chunk latency p50" in in_process.summary()
    # the executed actions' jerk at chunk seams and elsewhere, as the evaluator reports it
    assert all("seam_jerk" in e and "jerk" in e for e in remote.per_episode)
    assert np.isfinite(remote.extra["seam_jerk"]) and np.isfinite(in_process.extra["seam_jerk"])


def test_sim_robot_name_is_what_the_server_sees():
    """Several sim-robots on one task could not be told apart at the server: --name names each."""
    from polcache.cli import main

    robots = []
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0", on_record=lambda r: robots.append(r.robot)) as server:
        assert main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "1", "--server", server.endpoint,
                     "--name", "arm 2"]) == 0
    assert robots and set(robots) == {"arm 2"}


def test_sim_robot_refused_for_camera_images_says_which_options_send_them():
    """A policy that sees a camera, served to a sim-robot run without --cameras: the refusal names
    the missing image key and the options that send it."""
    from polcache.errors import PolcacheError
    from polcache.sim.robot import run_sim_robot

    class ImageBackend(ExpertBackend):
        spec = PolicySpec(obs={"state": ArraySpec((39,), "float32"), "image_top": ArraySpec((32, 32, 3), "uint8")},
                          action_dim=4, n_obs_steps=2, horizon=8, n_action_steps=8, task=TASK)

    with PolicyServer(ImageBackend(), "tcp://127.0.0.1:0") as server:
        with pytest.raises(PolcacheError, match=r"'image_top'.*--cameras NAME.*--image-size"):
            run_sim_robot(TASK, server.endpoint, hz=100, episodes=1, connect_timeout_s=5)


def test_a_stopped_sim_robot_reports_its_finished_episodes(monkeypatch, tmp_path, capsys):
    """SIGTERM (as `polcache launch` stops it) during the second of three episodes: the first is
    still a result, printed and written, and the exit says how it was stopped."""
    import json

    from polcache.cli import main
    from polcache_client.signals import Terminated
    from polcache.sim.robot import SimRobot

    begin = SimRobot.begin

    def stopped_in_the_second(self, seed):
        if seed == 1001:
            raise Terminated
        begin(self, seed)

    monkeypatch.setattr(SimRobot, "begin", stopped_in_the_second)
    out = tmp_path / "robot.json"
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        assert main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "3", "--server", server.endpoint,
                     "--json", str(out)]) == 143
    said = capsys.readouterr().out
    assert "[interrupted: 1 of 3 episodes finished]" in said
    result = json.loads(out.read_text())
    assert result["episodes"] == 1
    assert result["extra"]["interrupted"] == {"episodes_asked": 3, "signal": "SIGTERM"}


def test_a_sim_robot_stopped_before_its_server_answered_still_writes_its_result(monkeypatch, tmp_path, capsys):
    """SIGTERM while the robot waits for its server (`polcache launch` stopped during the server's
    start): the README promises the result "also when none [finished]", yet --json was not written
    (found by an outside probe)."""
    import json

    from polcache.cli import main
    from polcache_client import PolicyClient
    from polcache_client.signals import Terminated

    def terminated(self, timeout_s=None):
        raise Terminated

    monkeypatch.setattr(PolicyClient, "connect", terminated)
    out = tmp_path / "robot.json"
    assert main(["sim-robot", "--task", TASK, "--hz", "50", "--episodes", "3", "--server", "tcp://127.0.0.1:9",
                 "--json", str(out)]) == 143
    said = capsys.readouterr().out
    assert "[interrupted: 0 of 3 episodes finished]" in said
    assert "SIGTERM before the server answered: the control loop never started, the robot never moved" in said
    # standard JSON: what has no value (no episode, no chunk) is null; Python's NaN stopped jq and browsers
    result = json.loads(out.read_text(), parse_constant=lambda constant: pytest.fail(f"{constant} in {out}"))
    assert result["episodes"] == 0 and result["extra"]["interrupted"] == {"episodes_asked": 3, "signal": "SIGTERM"}
    assert result["extra"]["safe_stop"] is False and result["mean_episode_length"] is None
    assert result["latency_ms"] == {"p50": None, "p95": None, "p99": None, "n": 0}


def _run_across_a_restart(monkeypatch, tmp_path, backend, episodes: int = 2) -> tuple[int, dict]:
    """sim-robot's exit status and --json result, its server restarted with `backend` on the same
    address before the second episode (it then knows no robot)."""
    import json

    from polcache.cli import main
    from polcache.sim.robot import SimRobot

    servers = [PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0").start()]
    begin = SimRobot.begin

    def restarted_before_the_second(self, seed):
        if seed == 1001:
            servers[0].stop()
            servers.append(PolicyServer(backend, servers[0].endpoint).start())
        begin(self, seed)

    monkeypatch.setattr(SimRobot, "begin", restarted_before_the_second)
    out = tmp_path / "robot.json"
    try:
        status = main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", str(episodes), "--server",
                       servers[0].endpoint, "--json", str(out)])
    finally:
        servers[-1].stop()
    return status, json.loads(out.read_text())


def test_a_sim_robot_whose_server_restarted_says_it_reconnected(monkeypatch, tmp_path, capsys):
    """A reconnect (a new epoch: the episode's observation history starts over) showed only as a dip
    in the dashboard's fresh actions; the summary names it, the episode it happened in says so."""
    status, result = _run_across_a_restart(monkeypatch, tmp_path, ExpertBackend())
    out = capsys.readouterr().out
    assert status == 0 and "reconnected to the server 1 time (it went silent or forgot this robot)" in out
    assert result["episodes"] == 2 and result["extra"]["reconnects"] == 1
    assert [e["reconnects"] for e in result["per_episode"]] == [0, 1]
    assert result["extra"]["policy_changes"] == 0 and "mix policies" not in out


class LongerChunks(ExpertBackend):
    spec = dataclasses.replace(ExpertBackend.spec, horizon=16, n_action_steps=12)


def test_a_sim_robot_whose_server_came_back_with_another_policy_says_its_results_mix_policies(
        monkeypatch, tmp_path, capsys, caplog):
    """A server restarted with another checkpoint was reconnected to in silence (an outside probe)."""
    status, result = _run_across_a_restart(monkeypatch, tmp_path, LongerChunks())
    assert status == 0 and result["extra"]["policy_changes"] == 1
    assert ("the server served another policy after 1 reconnect (restarted with another checkpoint or settings; "
            "logged above): this run's results mix policies") in capsys.readouterr().out
    assert "serves another policy than before this reconnect (horizon 8 -> 16, n_action_steps 8 -> 12)" in caplog.text


class OtherRobot(ExpertBackend):
    spec = dataclasses.replace(ExpertBackend.spec, obs={"state": ArraySpec((8,), "float32")})


def test_a_sim_robot_refused_by_its_restarted_server_reports_the_episodes_it_finished(monkeypatch, tmp_path, capsys):
    """It said one line and exited 2 (bad input), its finished episodes lost with its --json (a probe)."""
    status, result = _run_across_a_restart(monkeypatch, tmp_path, OtherRobot(), episodes=3)
    out = capsys.readouterr().out
    assert status == 1 and result["episodes"] == 1
    refused = result["extra"]["server_refused"]
    assert refused["episodes_asked"] == 3 and "[spec_mismatch] obs_spec.state.shape" in refused["error"]
    assert re.search(r"reach-v3 \[ended by the server's refusal: 1 of 3 episodes finished\]: success", out), out
    assert "the server refused this robot when it reconnected, which ended the run: server at" in out
    # the watchdog's stop while the server was away, or the loop's own on its way out
    assert ("on the server's refusal the robot was already stopped" in out
            or "then the safe stop on the server's refusal" in out), out


@pytest.mark.parametrize("where", ["begin", "reset_episode", "end"])
def test_every_way_out_of_a_sim_robot_ends_with_one_safe_stop(where, monkeypatch, tmp_path, capsys):
    """SIGTERM in the second episode's begin(), or Ctrl-C in its reset_episode(), came between the
    loop's runs (which stop the robot only on their own way out, not at an episode's end): the first
    episode's robot was left unstopped, as it was after the last episode. Each way out stops it once."""
    import json
    import os
    import signal

    from polcache.cli import main
    from polcache.sim.robot import SimRobot
    from polcache_client import ControlLoop

    begin, reset_episode = SimRobot.begin, ControlLoop.reset_episode
    stops = []

    def terminated_in_the_second(self, seed):
        if where == "begin" and seed == 1001:
            os.kill(os.getpid(), signal.SIGTERM)
        begin(self, seed)

    def interrupted_in_the_second(self, instruction=None):
        if where == "reset_episode" and self.client.epoch == 1:
            raise KeyboardInterrupt
        reset_episode(self, instruction)

    monkeypatch.setattr(SimRobot, "begin", terminated_in_the_second)
    monkeypatch.setattr(SimRobot, "safe_stop", lambda self: stops.append(self.steps))
    monkeypatch.setattr(ControlLoop, "reset_episode", interrupted_in_the_second)
    out = tmp_path / "robot.json"
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        status = main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "2", "--server", server.endpoint,
                       "--json", str(out)])
    said = capsys.readouterr().out
    assert status == {"begin": 143, "reset_episode": 130, "end": 0}[where]
    on = {"begin": "on SIGTERM", "reset_episode": "on SIGINT", "end": "at the end"}[where]
    watchdog = int(re.search(rf"(\d+) watchdog safe stops?, then the safe stop {on}\n", said)[1])
    result = json.loads(out.read_text())
    assert result["extra"]["safe_stop"] is True
    assert result["extra"]["tick"]["safe_stops"] == len(stops) == watchdog + 1


@pytest.mark.parametrize("episode", [1, 0])
def test_a_sim_robot_stopped_mid_episode_says_its_loop_safe_stopped_it(episode, monkeypatch, tmp_path, capsys):
    """SIGTERM while the loop runs: the loop safe-stops the robot, which the summary said nothing of
    ("0 safe stops": its count is the watchdog's, from the tick records). Stopped in the first episode,
    it said nothing at all and wrote no result (`polcache launch` stopped early left no robot.json)."""
    import json

    from polcache.cli import main
    from polcache_client.signals import Terminated
    from polcache.sim.robot import SimRobot

    begin, act = SimRobot.begin, SimRobot.act
    stops = []

    def begin_seeded(self, seed):
        self.seed = seed
        begin(self, seed)

    def stopped_in_the_episode(self, action):
        if self.seed == 1000 + episode and self.steps == 5:
            raise Terminated
        act(self, action)

    monkeypatch.setattr(SimRobot, "begin", begin_seeded)
    monkeypatch.setattr(SimRobot, "act", stopped_in_the_episode)
    monkeypatch.setattr(SimRobot, "safe_stop", lambda self: stops.append(self.steps))
    out = tmp_path / "robot.json"
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        assert main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "3", "--server", server.endpoint,
                     "--json", str(out)]) == 143
    said = capsys.readouterr().out
    assert stops[-1] == 5 and re.search(r"\d+ watchdog safe stops?, then the safe stop on SIGTERM\n", said), said
    # ticks before each episode's first chunk are told apart from misses (a slow network showed only misses)
    waiting = int(re.search(r"(\d+) ticks? waiting for an episode's first action, \d+ ticks? without", said)[1])
    assert waiting >= episode + 1  # at least one tick per episode begun
    assert f"[interrupted: {episode} of 3 episodes finished]" in said
    assert ("no episode finished" in said) == (episode == 0)
    result = json.loads(out.read_text())
    assert result["episodes"] == episode and result["extra"]["interrupted"]["signal"] == "SIGTERM"
    assert result["extra"]["safe_stop"] is True
    # the tick records count the loop's stop too (they had none of it); the line names it on its own
    watchdog = int(re.search(r"(\d+) watchdog safe stops?, then", said)[1])
    assert result["extra"]["tick"]["safe_stops"] == len(stops) == watchdog + 1
    # the actions past due on arrival, which the dashboard counts by thousands in a healthy run, explained
    chunk = result["extra"]["chunk"]
    assert f"chunks: {chunk['chunks']:.0f} received, {chunk['stale_chunks']:.0f} stale; " \
           f"{chunk['dropped_actions'] / chunk['chunks']:.1f} actions of each already past due on arrival " \
           f"(the observation-to-action latency, p50 " in said


def test_a_sim_robot_stopped_after_its_watchdogs_stop_says_its_loop_made_none(monkeypatch, tmp_path, capsys):
    """SIGTERM after the watchdog had safe-stopped the robot (no fresh actions): the loop does not stop
    it again, yet the loop line said "then the safe stop on SIGTERM" and the result "safe_stop": true."""
    import json

    import polcache.sim.robot as sim_robot
    from polcache.cli import main
    from polcache_client import Watchdog
    from polcache_client.signals import Terminated

    begin, observe = sim_robot.SimRobot.begin, sim_robot.SimRobot.observe
    robots, stops = [], []

    def begin_seeded(self, seed):
        self.seed = seed
        robots.append(self)
        begin(self, seed)

    def watchdog_stop(self):
        stops.append((self.seed, self.steps))

    def stopped_after_the_watchdogs_stop(self):
        if stops and stops[-1][0] == 1001:
            raise Terminated
        return observe(self)

    class Starved(Watchdog):
        """No fresh action after the second episode's first step: the last one held (--hold-ms), then the
        stop, before the held action ends the episode."""

        def step(self, now, action):
            robot = robots[-1]
            return super().step(now, None if robot.seed == 1001 and robot.steps >= 1 else action)

    monkeypatch.setattr(sim_robot.SimRobot, "begin", begin_seeded)
    monkeypatch.setattr(sim_robot.SimRobot, "safe_stop", watchdog_stop)
    monkeypatch.setattr(sim_robot.SimRobot, "observe", stopped_after_the_watchdogs_stop)
    monkeypatch.setattr(sim_robot, "Watchdog", Starved)
    out = tmp_path / "robot.json"
    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        assert main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "3", "--server", server.endpoint,
                     "--hold-ms", "20", "--json", str(out)]) == 143
    said = capsys.readouterr().out
    assert stops and stops[-1][0] == 1001  # the watchdog's stop came last: the loop made none
    assert re.search(rf"{len(stops)} watchdog safe stops?; on SIGTERM the robot was already stopped \(not told "
                     rf"again\)\n", said), said  # the end said, not only left out
    result = json.loads(out.read_text())
    assert result["extra"]["safe_stop"] is False
    assert result["extra"]["tick"]["safe_stops"] == len(stops)


def test_sim_robot_on_another_task_than_the_policys_is_warned(caplog):
    """Allowed (a transfer test), but said: a policy of reach-v3 driving push-v3 is rarely meant."""
    import logging

    from polcache.sim.robot import run_sim_robot

    with caplog.at_level(logging.WARNING, logger="polcache.sim.robot"), \
            PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        run_sim_robot("push-v3", server.endpoint, hz=100, episodes=1, connect_timeout_s=5)
    assert "the server's policy was trained on reach-v3, this robot runs push-v3" in caplog.text


def test_a_language_policy_on_a_task_without_written_instructions_names_sim_robots_option():
    """The server's refusal speaks to robots in general (send one, or --instruction at the server); the
    simulated robot adds its own way out."""
    from polcache.errors import PolcacheError
    from polcache.sim.robot import run_sim_robot

    class Listening(ExpertBackend):
        spec = PolicySpec(obs={"state": ArraySpec((39,), "float32"), "instruction": ArraySpec((32,), "uint8")},
                          action_dim=4, n_obs_steps=2, horizon=8, n_action_steps=8, task="hammer-v3")

    with PolicyServer(Listening(), "tcp://127.0.0.1:0") as server:
        with pytest.raises(PolcacheError, match=r"\[bad_instruction\].* \(sim-robot: no instructions are written for "
                                                r"task 'hammer-v3'; give one with --instruction TEXT\)"):
            run_sim_robot("hammer-v3", server.endpoint, hz=50, episodes=1, seed=0)


def test_an_image_policy_served_to_a_robot_without_cameras_names_sim_robots_options():
    """The hint hangs on the refusal's error code (ConnectError.code), not on the message's wording."""
    from polcache.errors import PolcacheError
    from polcache.sim.robot import run_sim_robot

    class Seeing(ExpertBackend):
        spec = PolicySpec(obs={"state": ArraySpec((39,), "float32"), "image_top": ArraySpec((64, 64, 3), "uint8")},
                          action_dim=4, n_obs_steps=2, horizon=8, n_action_steps=8, task="reach-v3")

    with PolicyServer(Seeing(), "tcp://127.0.0.1:0") as server:
        with pytest.raises(PolcacheError, match=r"\[spec_mismatch\].*image_top.* \(sim-robot sends camera NAME's image "
                                                r"as image_NAME for each --cameras NAME"):
            run_sim_robot("reach-v3", server.endpoint, hz=50, episodes=1, seed=0)


@pytest.mark.parametrize("stamped", [True, False])
def test_a_lagging_sensor_is_timed_from_its_capture_where_the_robot_says_when(stamped):
    """sim-robot --sensor-lag-ms 60: each observation is 60 ms old; stamped (capture_time()), the
    chunks' latency counts from then (>= the lag), unstamped from when the robot asked."""
    from polcache.sim.robot import run_sim_robot

    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        result = run_sim_robot(TASK, server.endpoint, hz=100, episodes=2, seed=1000, sensor_lag_ms=60.0,
                               stamped=stamped)
    assert result.extra["sensor_lag_ms"] == 60.0 and result.extra["stamped"] == stamped
    assert result.episodes == 2
    latency = result.latency_ms["p50"]
    assert latency >= 60.0 if stamped else latency < 60.0


@pytest.mark.parametrize("flags, said", [([], "of which the sensor's 40 ms lag"),
                                          (["--unstamped"], "without the sensor's 40 ms lag: --unstamped")])
def test_sim_robots_chunks_line_says_what_the_sensor_lag_is_in_the_latency(flags, said, capsys):
    from polcache.cli import main

    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        assert main(["sim-robot", "--task", TASK, "--hz", "100", "--episodes", "1", "--server", server.endpoint,
                     "--sensor-lag-ms", "40", *flags]) == 0
    assert re.search(rf"\(the observation-to-action latency, p50 [\d.]+ ms \({re.escape(said)}\), is ",
                     capsys.readouterr().out)


def test_a_sensor_lag_beyond_what_the_loop_accepts_is_refused_by_name():
    from polcache.errors import PolcacheError
    from polcache.sim.robot import run_sim_robot

    with pytest.raises(PolcacheError, match=r"sensor_lag_ms must be in \[0, 5000\] ms, got 6000"):
        run_sim_robot(TASK, "tcp://127.0.0.1:1", hz=50, episodes=1, sensor_lag_ms=6000.0)
    with pytest.raises(PolcacheError, match=r"stamped=False leaves out .* give the lag \(sensor_lag_ms\)"):
        run_sim_robot(TASK, "tcp://127.0.0.1:1", hz=50, episodes=1, stamped=False)


@pytest.mark.parametrize("flags, said", [
    (["--sensor-lag-ms", "6000"], "argument --sensor-lag-ms: expected at most 5000 ms (every chunk would be past due), "
                                  "got 6000"),
    (["--unstamped"], "argument --unstamped: applies to a lagging sensor only; give --sensor-lag-ms MS with it"),
])
def test_sim_robots_sensor_flags_are_refused_by_their_own_names(capsys, flags, said):
    """The command's refusals named the library's arguments (sensor_lag_ms, stamped=False)."""
    from polcache.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["sim-robot", "--task", TASK, "--hz", "50", *flags])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"polcache sim-robot: error: {said} (see polcache sim-robot --help)\n"


def test_the_simulated_sensor_returns_the_newest_observation_old_enough(monkeypatch):
    from polcache.sim import robot as sim_robot

    class Env:
        action_dim = 1
        max_episode_steps = 10

        def observation_spec(self):
            return {"state": ArraySpec((1,), "float32")}

        def reset(self, seed):
            self.t = 0
            return {"state": np.zeros(1, np.float32)}

        def step(self, action):
            self.t += 1
            return {"state": np.full(1, self.t, np.float32)}, 0.0, False, {"success": False}

    clock = [100.0]
    monkeypatch.setattr(sim_robot.time, "monotonic", lambda: clock[0])
    robot = sim_robot.SimRobot(Env(), sensor_lag_s=0.05)
    robot.begin(0)  # observation 0 made at 100.00
    assert robot.observe()["state"][0] == 0 and robot.capture_time() == 100.0  # nothing older: the reset's
    for _ in range(3):  # observations 1..3 made 20 ms apart
        clock[0] += 0.02
        robot.act(np.zeros(1, np.float32))
    assert robot.observe()["state"][0] == 0 and robot.capture_time() == pytest.approx(100.01)  # 50 ms ago
    clock[0] = 100.11  # observation 3 (made at 100.06) is the scene as of 50 ms ago, captured then
    assert robot.observe()["state"][0] == 3 and robot.capture_time() == pytest.approx(100.06)
    clock[0] = 105.0  # the robot held still since: the same scene, captured 50 ms ago
    assert robot.observe()["state"][0] == 3 and robot.capture_time() == pytest.approx(104.95)
    assert not hasattr(sim_robot.SimRobot(Env(), sensor_lag_s=0.05, stamped=False), "capture_time")


def test_an_episode_cut_at_the_tick_limit_is_marked_truncated_not_just_failed(monkeypatch, caplog):
    """Ticks without a step (a server gone quiet) ran an episode out of ticks: it was counted as the
    policy's failure with nothing per episode saying it had been cut."""
    import logging

    from polcache.sim import robot as sim_robot

    monkeypatch.setattr(sim_robot, "episode_tick_limit", lambda steps, hz: 5)  # the expert needs more steps
    with caplog.at_level(logging.WARNING, logger="polcache.sim.robot"), \
            PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        result = sim_robot.run_sim_robot(TASK, server.endpoint, hz=100, episodes=1, seed=1000)
    (episode,) = result.per_episode
    assert episode["truncated"] and not episode["success"] and result.extra["truncated_episodes"] == 1
    assert "episode 0 (seed 1000) cut at 5 ticks" in caplog.text
    # its steps say how long the robot waited, not how long the task took: not an episode length
    assert np.isnan(result.mean_episode_length) and "no episode ran to its end" in result.summary()


def test_episodes_cut_short_by_chunks_that_arrive_too_late_are_blamed_on_the_machine():
    """On a loaded machine (inference p50 195 ms for chunks of 8 actions at 50 Hz) two of six
    episodes ran out of ticks without a step; the summary read as the policy's 67% success and a
    mean episode length that counted the two as 13 and 0 steps."""
    from polcache.sim.evaluate import EvalResult
    from polcache.sim.robot_cli import _starved

    def result(latency_ms: float, truncated: int = 2) -> EvalResult:
        return EvalResult(task=TASK, episodes=6, successes=4, success_rate=4 / 6, ci95=(0.3, 0.9),
                          mean_episode_length=44.5, latency_ms={"p50": latency_ms, "p95": 250.0, "p99": 260.0},
                          seed=0, extra={"truncated_episodes": truncated, "chunk_actions": 8})

    assert "mean episode length 44.5 steps over the 4 not cut short" in result(200.0).summary()
    assert "over the" not in result(200.0, truncated=0).summary()
    assert ("observation-to-action latency (p50 200 ms) is longer than a chunk lasts (8 actions at 50 Hz: 160 ms)"
            in _starved(result(200.0), 50.0))
    assert _starved(result(120.0), 50.0) == "" and _starved(result(float("nan")), 50.0) == ""


def test_what_a_sim_robot_records_is_what_ran(capsys):
    """The ensemble's decay is recorded (two decays gave indistinguishable results), a decay with
    --blend latest is refused (it was ignored), and a policy without language records no
    instruction (each episode had recorded the task's paraphrase it never read)."""
    from polcache.cli import main
    from polcache.sim.robot import run_sim_robot

    with PolicyServer(ExpertBackend(), "tcp://127.0.0.1:0") as server:
        result = run_sim_robot(TASK, server.endpoint, hz=100, episodes=1, seed=1000, decay=0.3)
        assert result.extra["decay"] == 0.3 and "instruction" not in result.per_episode[0]
        assert "decay" not in run_sim_robot(TASK, server.endpoint, hz=100, episodes=1, blend="latest").extra
    with pytest.raises(SystemExit, match="2"):
        main(["sim-robot", "--task", TASK, "--hz", "50", "--blend", "latest", "--decay", "0.3"])
    assert "argument --decay: weighs ensembled chunks; --blend latest executes the newest chunk only" in \
        capsys.readouterr().err


def test_a_sim_robot_on_a_task_at_another_rate_than_the_policys_is_refused_as_eval_refuses_it(capsys):
    from dataclasses import replace

    from polcache.errors import PolcacheError
    from polcache.sim.robot import run_sim_robot

    backend = ExpertBackend()
    backend.spec = replace(ExpertBackend.spec, control_hz=30.0)  # reach-v3 steps at 80 Hz
    with PolicyServer(backend, "tcp://127.0.0.1:0") as server:
        with pytest.raises(PolcacheError, match="trained at 30 Hz .* but reach-v3 steps at 80 Hz"):
            run_sim_robot(TASK, server.endpoint, hz=30, episodes=1, seed=1000)
        result = run_sim_robot(TASK, server.endpoint, hz=30, episodes=1, seed=1000, allow_rate_mismatch=True)
    assert result.extra["rate_mismatch"] == {"policy_hz": 30.0, "task_hz": 80.0}
    assert "warning: the policy was trained at 30 Hz" in capsys.readouterr().err
