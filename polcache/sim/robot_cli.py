"""`polcache sim-robot`: a MuJoCo task run as a robot against a policy server (polcache.sim.robot)."""

from __future__ import annotations

import argparse

from polcache.cli_types import (control_rate, counted, given_only_with, image_size, name_list, non_negative_float,
                                 positive_float, positive_int, seed_int)
from polcache.serve.cli import DEFAULT_SERVER, add_metrics_options, log_to_stderr
from polcache.serve.handshake import own_robot_name
from polcache_client.protocol import ProtocolError
from polcache_client.schedule import BLEND_MODES


def robot_name(value: str) -> str:
    """--name, refused here by the server's own rule rather than as a refused handshake."""
    try:
        return own_robot_name(value, "name")
    except ProtocolError as exc:  # the rule's own words: printable, not blank, at most 4096 characters
        raise argparse.ArgumentTypeError(f"expected a name the server accepts ({exc}), got "
                                         f"{value if len(value) <= 40 else value[:37] + '...'!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sim-robot", help="run a simulated task as a robot against a policy server",
                              description="Run a MuJoCo task as a robot that speaks the protocol, paced to wall-clock "
                                          "time at --hz; prints success rate with a 95% Wilson interval like "
                                          "`polcache eval`, plus loop timing.")
    p.add_argument("--task", required=True, help="task name (see polcache.envs.list_tasks())")
    p.add_argument("--hz", type=control_rate, required=True, help="control rate (Hz)")
    p.add_argument("--episodes", type=positive_int, default=10, help="number of episodes (default 10)")
    p.add_argument("--seed", type=seed_int, default=1000,
                   help="episode i resets with seed S+i (default 1000, as eval)")
    p.add_argument("--instruction", help="send this instruction in every episode (default: the task's held-out "
                                         "paraphrases, one per episode, where written; ignored by policies without "
                                         "language)")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"policy server address (default {DEFAULT_SERVER})")
    p.add_argument("--keys", help="CurveZMQ key directory (for an encrypted server)")
    p.add_argument("--name", type=robot_name,
                   help="the name this robot gives the server and labels its metrics with (default 'sim-robot TASK'; "
                        "give robots sharing a task their own)")
    p.add_argument("--cameras", type=name_list,
                   help="comma-separated cameras for image observations (default: state only)")
    p.add_argument("--image-size", type=image_size,
                   help="camera image side in pixels, for --cameras (default 96; the policy's size)")
    p.add_argument("--blend", choices=BLEND_MODES, default="ensemble",
                   help="overlapping chunks: ensemble (the default) or latest")
    p.add_argument("--decay", type=non_negative_float,
                   help="--blend ensemble: weight exp(-decay * k), k = 0 for the newest chunk (default 0.5)")
    p.add_argument("--hold-ms", type=positive_float, default=200.0,
                   help="hold the last action this long without a fresh one, then safe-stop (default 200)")
    p.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the server (default 30)")
    p.add_argument("--realtime", action="store_true",
                   help="run the control loop under SCHED_FIFO (needs root or CAP_SYS_NICE): steadier ticks on a "
                        "busy machine")
    p.add_argument("--sensor-lag-ms", type=non_negative_float, default=0.0,
                   help="a lagging sensor: each observation shows the scene as it was this many ms ago (default 0), "
                        "stamped with when it was captured (the adapter's capture_time())")
    p.add_argument("--unstamped", action="store_true",
                   help="with --sensor-lag-ms: the robot does not say when its data were captured, so its chunks are "
                        "timed from when it asked (what the lag costs a robot without capture_time())")
    p.add_argument("--allow-rate-mismatch", action="store_true",
                   help="run even where the task steps at another rate than the policy was trained at (its dataset's "
                        "fps): refused by default, as in eval, as its success rate would not be the policy's")
    p.add_argument("--json", help="write the full result as JSON here (an existing file is replaced only if it is "
                                  "an eval result)")
    add_metrics_options(p)
    p.checks += [_sensor_lag_check, _decay_check,
                 given_only_with("--image-size", "image_size", "--cameras", "cameras")]
    p.set_defaults(handler=_sim_robot)


def _sensor_lag_check(args: argparse.Namespace) -> str | None:
    """The lagging sensor's flags, judged together and named as flags (the library names its arguments)."""
    from polcache.sim.robot import MAX_SENSOR_LAG_MS

    if args.sensor_lag_ms > MAX_SENSOR_LAG_MS:
        return (f"argument --sensor-lag-ms: expected at most {MAX_SENSOR_LAG_MS:g} ms (every chunk would be past due), "
                f"got {args.sensor_lag_ms:g}")
    if args.unstamped and not args.sensor_lag_ms:
        return "argument --unstamped: applies to a lagging sensor only; give --sensor-lag-ms MS with it"
    return None


def _decay_check(args: argparse.Namespace) -> str | None:
    if args.decay is not None and args.blend != "ensemble":  # accepted and ignored, it read as a setting of the run
        return f"argument --decay: weighs ensembled chunks; --blend {args.blend} executes the newest chunk only"
    return None


def _sim_robot(args: argparse.Namespace) -> int:
    from polcache.metrics import collect_metrics
    from polcache.sim.robot import run_sim_robot, sim_robot_name
    from polcache.signals import sigterm_as_interrupt
    from polcache.sim.evaluate import check_result_output, result_written_first
    from polcache_client.records import ChunkRecord, TickRecord

    if args.json is not None:
        check_result_output(args.json)
    log_to_stderr()
    cameras = args.cameras
    info = {"role": "robot", "task": args.task, "hz": args.hz, "server": args.server}
    name = args.name or sim_robot_name(args.task)
    metrics_cm = collect_metrics(args.metrics_file, args.metrics_port, robot=name, info=info,
                                 kinds=(TickRecord, ChunkRecord))
    with sigterm_as_interrupt(), metrics_cm as metrics:  # TERM stops the loop safely, like Ctrl-C
        result = run_sim_robot(args.task, args.server, args.hz, args.episodes, args.seed, cameras=cameras,
                               keys_dir=args.keys, blend=args.blend, decay=args.decay,
                               hold_s=args.hold_ms / 1e3, connect_timeout_s=args.connect_timeout,
                               realtime=args.realtime, metrics=metrics, instruction=args.instruction, name=name,
                               sensor_lag_ms=args.sensor_lag_ms, stamped=not args.unstamped,
                               allow_rate_mismatch=args.allow_rate_mismatch,
                               **({} if args.image_size is None else {"image_size": args.image_size}))
    with result_written_first(args.json, result):
        _say(args, result)
    return result.exit_status()


def _starved(result, hz: float) -> str:
    """Why episodes ran out of ticks, where the answer is the machine: chunks that arrive later than
    they last leave the robot nothing to execute, whatever the policy would have done."""
    latency = result.latency_ms.get("p50", float("nan"))
    actions = result.extra.get("chunk_actions")
    if not actions or not latency > actions / hz * 1e3:  # NaN: no chunk arrived (said above)
        return ""
    return (f". The observation-to-action latency (p50 {latency:.0f} ms) is longer than a chunk lasts ({actions} "
            f"actions at {hz:g} Hz: {actions / hz * 1e3:.0f} ms), so most chunks arrived with every action past due: "
            f"the server's answers did not keep up with the policy at this rate (a loaded CPU, the server's threads, "
            f"a simulated latency), and these episodes measure that, not the policy")


def _say(args: argparse.Namespace, result) -> None:
    """The run's summary lines: the result, the loop, reconnects, chunks, seam jerk."""
    print(result.summary())
    tick = result.extra["tick"]
    err = tick.get("period_error_ms", {})
    stopped = result.extra.get("interrupted")
    # the tick records count the loop's own stop on the way out too; it is named on its own
    loop_stops = 1 if result.extra["safe_stop"] else 0
    refused = result.extra.get("server_refused")
    when = "on " + stopped["signal"] if stopped else "on the server's refusal" if refused else "at the end"
    final = (f", then the safe stop {when}" if loop_stops
             else f"; {when} the robot was already stopped (not told again)" if stopped or refused else "")
    if stopped and not tick:
        print(f"{stopped['signal']} before the server answered: the control loop never started, the robot never moved")
    else:
        print(f"loop {args.hz:g} Hz: period error p50 {err.get('p50', float('nan')):.3f} ms / p99 "
              f"{err.get('p99', float('nan')):.3f} ms, {counted(tick.get('missed_ticks', 0), 'missed tick')}, "
              f"{counted(tick.get('waiting', 0), 'tick')} waiting for an episode's first action, "
              f"{counted(tick.get('deadline_miss', 0), 'tick')} without a fresh action, "
              f"{counted(tick.get('safe_stops', 0) - loop_stops, 'watchdog safe stop')}{final}")
    if refused:
        print(f"the server refused this robot when it reconnected, which ended the run: {refused['error']}")
    if truncated := result.extra["truncated_episodes"]:
        print(f"{counted(truncated, 'episode')} cut at the loop's tick limit, most ticks without a step (waiting for "
              f"chunks or safe-stopped): counted as no success, left out of the mean episode length, marked "
              f"truncated in --json{_starved(result, args.hz)}")
    if reconnects := result.extra["reconnects"]:  # otherwise only a dip in the dashboard's fresh actions shows it
        print(f"reconnected to the server {counted(reconnects, 'time')} (it went silent or forgot this robot): each "
              f"reconnect starts a new epoch, and that episode's observation history starts over")
    if changes := result.extra["policy_changes"]:
        print(f"the server served another policy after {counted(changes, 'reconnect')} (restarted with another "
              f"checkpoint or settings; logged above): this run's results mix policies")
    chunk = result.extra.get("chunk", {})
    if chunk.get("chunks"):  # the dashboard's "dropped actions" climbs by thousands in a healthy run: say why
        latency = chunk.get("latency_ms", {}).get("p50", float("nan"))
        lag = (f" (of which the sensor's {args.sensor_lag_ms:g} ms lag)" if args.sensor_lag_ms and not args.unstamped
               else f" (without the sensor's {args.sensor_lag_ms:g} ms lag: --unstamped)" if args.sensor_lag_ms else "")
        print(f"chunks: {chunk['chunks']:.0f} received, {chunk.get('stale_chunks', 0):.0f} stale; "
              f"{chunk.get('dropped_actions', 0) / chunk['chunks']:.1f} actions of each already past due on arrival "
              f"(the observation-to-action latency, p50 {latency:.1f} ms{lag}, is {latency * args.hz / 1e3:.1f} "
              f"control periods), so never executed")
    if jerk := result.jerk_line():
        print(jerk)

