"""Transport overhead for one 96x96x3 image + state observation answered by an 8x4 action
chunk, over tcp loopback, side by side in one run:

- polcache: the real PolicyServer (ROUTER/DEALER, validated single-frame msgpack, history,
  inference worker hand-off) with a zero-cost policy, driven by PolicyClient's wire format;
- polcache+metrics: the same server recording every request into polcache's metrics as
  `polcache serve --metrics-file` does under `polcache launch` (Prometheus histograms and
  counters, a JSON-lines file, no in-process distributions);
- python-floor: the least per-message Python polcache's wire format needs, as a lower bound for
  any rewrite of the server in Python: a ROUTER loop that decodes with the server's
  ObservationReader, stacks the two-step window, calls the zero-cost policy and encodes the chunk
  (no sessions, epochs, fairness, hand-off, records; driven by the same client as polcache);
- msgpack REQ/REP: the same raw-numpy msgpack encoding with a bare echo server;
- pickle REQ/REP: the common pickle-over-REQ/REP setup (baseline only; polcache never
  unpickles peer data, which is why pickle lives here and not in polcache/);
- msgpack+Nus (`--echo-work-us N,..`): the bare echo server spinning N us before each reply, as
  if it did N us of per-message work: how the round trip grows with server work on this machine.

Each server runs in its own process, stopped (SIGSTOP) while the others are timed. Modes are
interleaved in rounds so drift hits all alike. The p99 ratio to the echo comes with a 90%
interval from resampling the rounds (how much it depends on which rounds met a slow moment).
Besides the round-trip times, the CPU each request costs the server process (all its threads:
Python, ZeroMQ's I/O thread, the kernel on their behalf; also split into the Python threads and
the I/O thread) and the client's thread: a figure that load on the machine barely moves, where
the tail does.
`--baseline-tree DIR` adds "polcache-baseline" and "polcache-baseline+metrics": the same servers
imported from another checkout (e.g. `git worktree add /tmp/before main`), for a before/after
comparison in one run.
`--pin` places the processes as `polcache launch configs/launch/sim.yaml` does: every server
(polcache and the baselines alike, each with its ZeroMQ I/O thread) on the last CPU, the client
on CPU 0.
`--in-process` instead times the per-message Python alone, without sockets: the server's path
from a received frame to its reply frame (PolicyServer's handling and inline dispatch, the send
replaced by a list append), warm and with the CPU caches evicted before each message (an 8 MB
sweep: how a server finds them after sleeping between requests), and the client's encode and
decode.

    python benchmarks/bench_transport.py [--calls 80] [--rounds 100] [--baseline-tree DIR]
                                         [--echo-work-us 25,50,100] [--pin] [--in-process]
                                         [--json benchmarks/results/transport.json]
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from common import RESULTS, free_port, print_table, round_robin, write_json
from polcache_client.protocol import (DEFAULT_MAX_MESSAGE_BYTES, ActionChunk, Handshake, Observation,
                                      ObservationReader, Welcome, decode, encode, encode_array, encode_chunk)

IMAGE = (96, 96, 3)
STATE_DIM = 39
ACTION_SHAPE = (8, 4)
HZ = 50.0  # the robot's rate, as its handshake states it
MODES = ("polcache", "polcache+metrics", "python-floor", "msgpack", "pickle")
POLCACHE_WIRE = ("polcache", "python-floor")  # modes driven by PolicyClient's wire format
REPO = Path(__file__).resolve().parents[1]


class ZeroBackend:
    """A policy that costs nothing, so only transport and runtime overhead are measured."""

    def __init__(self):
        from polcache.policy.spec import ArraySpec, PolicySpec

        self.spec = PolicySpec(obs={"image_front": ArraySpec(IMAGE, "uint8"), "state": ArraySpec((STATE_DIM,), "float32")},
                               action_dim=ACTION_SHAPE[1], n_obs_steps=2, horizon=16, n_action_steps=ACTION_SHAPE[0])

    def predict(self, obs, seed=None, past_actions=None):
        return np.zeros((1, *ACTION_SHAPE), np.float32)

    def session(self):
        from polcache.policy.spec import StatelessSession

        return StatelessSession(self)


def _raw_pack(arrays: dict[str, np.ndarray]) -> bytes:
    return msgpack.packb({k: encode_array(v) for k, v in arrays.items()})


def _raw_unpack(data: bytes) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in msgpack.unpackb(data).items()}


def serve(mode: str, port: int, metrics_file: str) -> None:
    """Run one server in this process until killed."""
    address = f"tcp://127.0.0.1:{port}"
    if mode.startswith("polcache"):
        import logging

        from polcache.metrics import JsonlWriter, Metrics
        from polcache.serve.server import PolicyServer

        # stopped between its rounds (SIGSTOP, see main), it would rightly say after each that it stood still
        logging.getLogger("polcache.serve").setLevel(logging.ERROR)

        on_record = Metrics(0, sink=JsonlWriter(metrics_file)).record if mode.endswith("+metrics") else None
        PolicyServer(ZeroBackend(), address, deadline_ms=1e9, on_record=on_record).serve_forever()
        return
    if mode == "python-floor":
        serve_floor(address)
        return
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(address)
    actions = np.zeros(ACTION_SHAPE, np.float32)
    work_s = float(mode.partition("+")[2].removesuffix("us") or 0) / 1e6
    while True:
        data = sock.recv()
        if mode == "pickle":
            pickle.loads(data)
            sock.send(pickle.dumps(actions))
        else:
            _raw_unpack(data)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < work_s:  # spin: CPU work, not a sleep
                pass
            sock.send(_raw_pack({"actions": actions}))


def serve_floor(address: str) -> None:
    """The python-floor server (see the module docstring): what is left of PolicyServer's
    per-message work when everything but decode, window, policy and encode is taken away."""
    from polcache.serve.handshake import robot_obs_spec

    backend = ZeroBackend()
    reader = ObservationReader(robot_obs_spec(backend.spec))
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    newest: dict[bytes, Observation] = {}  # per robot: the two-step window's older step
    action_offsets_s = np.arange(ACTION_SHAPE[0], dtype=np.float64) / HZ
    while True:
        robot, frame = sock.recv_multipart()
        msg, version = reader.read(frame)
        if type(msg) is not Observation:  # the handshake
            welcome = Welcome(policy=backend.spec.to_dict(), max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                              server="python-floor")
            sock.send_multipart([robot, encode(welcome, version)])
            continue
        older = newest.get(robot, msg)
        newest[robot] = msg
        window = {}
        for key, array in msg.arrays.items():
            stacked = window[key] = np.empty((1, 2, *array.shape), array.dtype)
            stacked[0, 0], stacked[0, 1] = older.arrays[key], array
        chunk = ActionChunk(epoch=msg.epoch, seq=msg.seq, obs_seqs=[older.seq, msg.seq], t_capture=msg.t_capture,
                            t_actions=msg.t_capture + action_offsets_s, actions=backend.predict(window)[0], timing={})
        sock.send(robot, zmq.SNDMORE)
        sock.send(encode_chunk(chunk, version)[0])


class Client:
    def __init__(self, mode: str, port: int):
        self.mode = mode
        ctx = zmq.Context.instance()
        self.polcache = mode.startswith(POLCACHE_WIRE)
        self.sock = ctx.socket(zmq.DEALER if self.polcache else zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.seq = 0
        self.server_us: list[float] = []  # polcache: the server's own stages (the chunk's timing map) per call
        if self.polcache:
            spec = {"image_front": (IMAGE, "uint8"), "state": ((STATE_DIM,), "float32")}
            self.sock.send(encode(Handshake(obs_spec=spec, action_dim=ACTION_SHAPE[1], hz=HZ, name="bench")))
            self.sock.recv()

    def round_trip(self, arrays: dict[str, np.ndarray]) -> object:
        """One request and its decoded reply (returned: the caller checks it after the clock stops)."""
        if self.mode == "pickle":
            self.sock.send(pickle.dumps(arrays))
            return pickle.loads(self.sock.recv())
        if self.mode.startswith("msgpack"):
            self.sock.send(_raw_pack(arrays))
            return _raw_unpack(self.sock.recv())
        self.seq += 1
        self.sock.send(encode(Observation(epoch=0, seq=self.seq, t_capture=time.monotonic(), arrays=arrays)))
        return decode(self.sock.recv())


def in_process(calls: int) -> list[dict]:
    """Microseconds of Python per message, no sockets (see the module docstring)."""
    from polcache.serve.server import PolicyServer

    server = PolicyServer(ZeroBackend(), "tcp://127.0.0.1:0", deadline_ms=1e9)
    replies: list[bytes] = []
    server._send = lambda robot, frame: replies.append(frame)  # noqa: SLF001 - the path up to the socket
    spec = {"image_front": (IMAGE, "uint8"), "state": ((STATE_DIM,), "float32")}
    server._handle(b"robot", [encode(Handshake(obs_spec=spec, action_dim=ACTION_SHAPE[1], hz=HZ, name="bench"))])
    replies.clear()  # the welcome
    rng = np.random.default_rng(0)
    arrays = {"image_front": rng.integers(0, 255, IMAGE, dtype=np.uint8),
              "state": rng.standard_normal(STATE_DIM).astype(np.float32)}
    frames = iter([encode(Observation(epoch=0, seq=i + 1, t_capture=float(i), arrays=arrays))
                   for i in range(3 * calls + 100)])
    sweep = np.ones(8 << 20, np.uint8)

    def serve_one() -> float:
        t0 = time.perf_counter()
        server._handle(b"robot", [next(frames)])  # noqa: SLF001
        server._dispatch()  # noqa: SLF001 - inline once 16 inferences were fast: on this thread
        if server._busy:  # noqa: SLF001 - the first ones go to the worker thread
            server._collect_results()  # noqa: SLF001
        return time.perf_counter() - t0

    try:
        for _ in range(100):  # until the inline path is on and the code is warm
            serve_one()
        assert server._runs_inline()  # noqa: SLF001
        warm = [serve_one() for _ in range(calls)]
        cold = []
        for _ in range(calls):
            sweep.sum()
            cold.append(serve_one())
    finally:
        server._shutdown()  # noqa: SLF001 - never served, so never stopped
    assert len(replies) == 2 * calls + 100 and isinstance(decode(replies[-1]), ActionChunk)
    obs = Observation(epoch=0, seq=1, t_capture=0.0, arrays=arrays)
    reply, raw_reply = replies[-1], _raw_pack({"actions": np.zeros(ACTION_SHAPE, np.float32)})
    codec = round_robin({"client: encode an observation": lambda: encode(obs),
                         "client: decode a chunk": lambda: decode(reply),
                         "raw msgpack: pack the observation": lambda: _raw_pack(arrays),
                         "raw msgpack: unpack the reply": lambda: _raw_unpack(raw_reply)}, calls, warmup=0)
    rows = {"server: frame in to reply out, warm caches": warm, "server: the same, caches evicted first": cold, **codec}
    return [{"what": what, "p50_us": round(float(np.percentile(ts, 50)) * 1e6, 1),
             "mean_us": round(float(np.mean(ts)) * 1e6, 1)} for what, ts in rows.items()]


def ratio_interval(times: list[float], bare: list[float], rounds: int, draws: int = 400) -> tuple[float, float]:
    """A 90% interval of p99(times) / p99(bare): the rounds resampled with replacement, the same
    rounds for both (a burst of load on the machine hits the modes of one round alike), so how
    far the ratio could move by which rounds happened to be slow."""
    mode, base = np.asarray(times).reshape(rounds, -1), np.asarray(bare).reshape(rounds, -1)
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(draws):
        picked = rng.integers(0, rounds, rounds)
        ratios.append(np.percentile(mode[picked], 99) / np.percentile(base[picked], 99))
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def _import_path(tree: Path) -> str:
    """PYTHONPATH under which a server imports polcache and polcache_client from `tree`."""
    return os.pathsep.join([str(tree), str(tree / "client")])


def process_cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of process `pid` so far (Linux /proc), as a pair: its Python
    threads (the server loop, the idle inference worker), then its ZeroMQ I/O threads."""
    zmq_s = other_s = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        name, _, rest = (task / "stat").read_text().partition("(")[2].rpartition(")")  # "tid (name) state ..."
        fields = rest.split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if name.startswith("ZMQbg"):
            zmq_s += seconds
        else:
            other_s += seconds
    return other_s, zmq_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=80, help="round trips per mode and round")
    parser.add_argument("--rounds", type=int, default=100,
                        help="short rounds (80 calls: ~16 ms), so a burst of load on the machine hits all modes alike")
    parser.add_argument("--baseline-tree", help="also time the polcache server of this checkout (before/after)")
    parser.add_argument("--json", default=str(RESULTS / "transport.json"))
    parser.add_argument("--echo-work-us", default="",
                        help="comma-separated: also time the msgpack echo spinning this long per message")
    parser.add_argument("--pin", action="store_true",
                        help="servers on the last CPU, the client on CPU 0, as polcache launch places them")
    parser.add_argument("--in-process", action="store_true",
                        help="time the per-message Python alone, without sockets (see the docstring)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.metrics_file)
        return
    if args.in_process:
        rows = in_process(args.calls * args.rounds)
        print("per message, no sockets: 96x96x3 uint8 image + state observation -> 8x4 chunk")
        print_table(rows, ["what", "p50_us", "mean_us"])
        write_json(args.json.replace("transport.json", "transport_in_process.json"), {"benchmark": "transport-in-process",
                                                                                    "rows": rows})
        return

    rng = np.random.default_rng(0)
    arrays = {"image_front": rng.integers(0, 255, IMAGE, dtype=np.uint8),
              "state": rng.standard_normal(STATE_DIM).astype(np.float32)}
    trees = {"polcache": REPO, "polcache+metrics": REPO}  # this script's checkout, not whichever is installed
    if args.baseline_tree:
        trees["polcache-baseline"] = trees["polcache-baseline+metrics"] = Path(args.baseline_tree).resolve()
    modes = [*trees, *MODES[2:], *(f"msgpack+{int(us)}us" for us in args.echo_work_us.split(",") if us)]
    ports = {mode: free_port() for mode in modes}
    server_cpus, placement = None, "unpinned"
    if args.pin:  # before any ZeroMQ context: its I/O thread inherits the client's CPU
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error(f"--pin needs two CPUs, this process may use {cpus}")
        server_cpus = {cpus[-1]}
        os.sched_setaffinity(0, {cpus[0]})
        placement = f"servers on CPU {cpus[-1]}, client on CPU {cpus[0]}"
    files = tempfile.TemporaryDirectory()  # the metrics files of the +metrics servers
    servers = [subprocess.Popen([sys.executable, __file__, "--serve", m, "--port", str(p),
                                 "--metrics-file", os.path.join(files.name, f"{m}.jsonl")],
                                env={**os.environ, "PYTHONPATH": _import_path(trees.get(m, REPO))},
                                preexec_fn=None if server_cpus is None else lambda: os.sched_setaffinity(0, server_cpus))
               for m, p in ports.items()]
    try:
        clients = {mode: Client(mode, port) for mode, port in ports.items()}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        server_cpu = {mode: np.zeros(2) for mode in modes}  # CPU seconds (Python threads, ZeroMQ I/O), timed calls only
        client_cpu = {mode: 0.0 for mode in modes}
        for proc in servers:
            proc.send_signal(signal.SIGSTOP)
        for _ in range(args.rounds):
            for (mode, client), server in zip(clients.items(), servers):
                # only the measured server runs: an idle one's periodic wake-ups (polcache's loop
                # and metrics writer; a REP echo has none) would land in the others' timings
                server.send_signal(signal.SIGCONT)
                for _ in range(50):  # warm-up after the other modes ran
                    client.round_trip(arrays)
                s0, c0 = np.array(process_cpu_s(server.pid)), time.thread_time()
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    reply = client.round_trip(arrays)
                    times[mode].append(time.perf_counter() - t0)
                    if client.polcache:
                        assert isinstance(reply, ActionChunk), reply
                        if mode.startswith("polcache"):  # its own stages, from the chunk's timing map
                            client.server_us.append(sum(reply.timing.values()) * 1e3)
                server_cpu[mode] += np.array(process_cpu_s(server.pid)) - s0
                client_cpu[mode] += time.thread_time() - c0
                server.send_signal(signal.SIGSTOP)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        files.cleanup()
    polcache_bytes = len(encode(Observation(epoch=0, seq=0, t_capture=0.0, arrays=arrays)))
    payload_bytes = {"msgpack": len(_raw_pack(arrays)), "pickle": len(pickle.dumps(arrays))}
    bare_p99 = float(np.percentile(times["msgpack"], 99))
    rows = []
    for mode in modes:
        us = np.asarray(times[mode]) * 1e6
        rows.append({"mode": mode, "calls": len(us), "p50_us": round(float(np.percentile(us, 50)), 1),
                     "p99_us": round(float(np.percentile(us, 99)), 1), "mean_us": round(float(us.mean()), 1),
                     "p99_over_msgpack": round(float(np.percentile(us, 99)) / (bare_p99 * 1e6), 2),
                     "ratio_90pct_interval": "%.2f-%.2f" % ratio_interval(times[mode], times["msgpack"], args.rounds),
                     "server_cpu_us": round(float(server_cpu[mode].sum()) / len(us) * 1e6, 1),
                     "server_python_cpu_us": round(float(server_cpu[mode][0]) / len(us) * 1e6, 1),
                     "server_zmq_io_cpu_us": round(float(server_cpu[mode][1]) / len(us) * 1e6, 1),
                     "client_cpu_us": round(client_cpu[mode] / len(us) * 1e6, 1),
                     "request_bytes": payload_bytes.get(mode.partition("+")[0], polcache_bytes)})
        if clients[mode].server_us:  # what the server's stages account for; the rest is wake-ups, sockets, client
            rows[-1]["server_stages_p50_us"] = round(float(np.percentile(clients[mode].server_us, 50)), 1)
    print(f"round trip, 96x96x3 uint8 image + {STATE_DIM} float32 state -> 8x4 float32 actions, tcp loopback, "
          f"{placement}")
    print_table(rows, ["mode", "calls", "p50_us", "p99_us", "mean_us", "p99_over_msgpack", "ratio_90pct_interval",
                       "server_cpu_us",
                       "server_python_cpu_us", "server_zmq_io_cpu_us",
                       "client_cpu_us", "server_stages_p50_us", "request_bytes"])
    write_json(args.json, {"benchmark": "transport", "rows": rows, "calls": args.calls, "rounds": args.rounds,
                           "placement": placement})


if __name__ == "__main__":
    main()
