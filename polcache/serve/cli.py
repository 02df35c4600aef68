"""`polcache serve`, `polcache keys`: the policy server's commands (the simulated robot's, `polcache sim-robot`,
is polcache.sim.robot_cli)."""

from __future__ import annotations

import argparse
import logging
import signal

from polcache.cli_types import (add_backend_options, backend_options, batch_size, non_empty, non_negative_float, port,
                                 positive_float, positive_int, thread_count)
from polcache.serve.server import DEFAULT_BIND, DEFAULT_INLINE_MS, DEFAULT_MAX_BATCH, MAX_INLINE_MS, MAX_SIMULATED_LATENCY_MS
from polcache_client.protocol import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_SERVER = DEFAULT_BIND  # where a robot on this machine finds a server started with the defaults


def add_metrics_options(p: argparse.ArgumentParser) -> None:
    """Where a process's metrics go: for the server and for robots (`polcache sim-robot`)."""
    p.add_argument("--metrics-file", type=non_empty,
                   help="append metrics as JSON lines here (rotated at 10 MiB, 3 backups)")
    p.add_argument("--metrics-port", type=port, help="serve Prometheus text on http://127.0.0.1:PORT/metrics "
                                                  "(default: off; 0 takes a free port and prints it)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="host a policy for robots over ZeroMQ",
                              description="Serve one checkpoint to robots speaking the polcache protocol "
                                          "(docs/protocol.md): each observation is answered with a timestamped "
                                          "action chunk and per-stage timing. Binds to loopback unless told otherwise.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or an artifact from `polcache export`")
    p.add_argument("--cache", help="block cache schedule JSON or baseline spec (as for `polcache eval`)")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"ZeroMQ address to bind (default {DEFAULT_BIND})")
    p.add_argument("--keys", help="CurveZMQ key directory from `polcache keys` (required for a non-loopback bind)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without encryption")
    p.add_argument("--instruction", help="language-conditioned policies: the instruction followed for robots that "
                                         "send none (protocol version 3 robots send their own)")
    p.add_argument("--deadline-ms", type=positive_float,
                   help="per-request budget (default: (n_action_steps - 1) / robot rate)")
    p.add_argument("--max-message-bytes", type=positive_int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"refuse larger messages (default {DEFAULT_MAX_MESSAGE_BYTES})")
    p.add_argument("--rtc", action="store_true",
                   help="real-time chunking: guide each robot's next chunk toward its last chunk's actions still due "
                        "(flow samplers, torch backend; robots should run --blend latest)")
    p.add_argument("--max-batch", type=batch_size, default=DEFAULT_MAX_BATCH,
                   help=f"robots whose waiting observations share one inference (default {DEFAULT_MAX_BATCH}; "
                        "1: one inference per robot; --backend trt builds its engines for up to N)")
    p.add_argument("--inline-ms", type=non_negative_float, default=DEFAULT_INLINE_MS,
                   help=f"while every recent inference took less than this, run it on the server thread and save "
                        f"two thread hand-offs per chunk (default {DEFAULT_INLINE_MS:g}; 0: always on the worker thread, "
                        f"at most {MAX_INLINE_MS:g})")
    p.add_argument("--simulate-latency-ms", type=non_negative_float, default=0.0,
                   help="add this much to every inference, as a slower computer would (testing real-time chunking "
                        f"and blending under latency; default 0, at most {MAX_SIMULATED_LATENCY_MS:g})")
    add_backend_options(p)
    p.add_argument("--threads", type=thread_count, default=1, help="torch (or ONNX Runtime) intra-op threads "
                                                                  "(default 1)")
    add_metrics_options(p)
    p.set_defaults(handler=_serve)

    p = subparsers.add_parser("keys", help="create CurveZMQ keys for a non-loopback server",
                              description="Write server and client CurveZMQ key pairs into a directory. Give the "
                                          "directory to `polcache serve --keys`; copy only client.key_secret and "
                                          "server.key to the robot (never server.key_secret).")
    p.add_argument("--dir", required=True, type=non_empty, help="directory for the key files")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(handler=_keys)


def log_to_stderr() -> None:
    """INFO and above on stderr, timestamped: what a server and a robot say while they run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)  # MuJoCo's renderer: its INFO lines say nothing to a user


def _serve(args: argparse.Namespace) -> int:
    from polcache.serve.security import check_bind

    check_bind(args.bind, args.keys, args.insecure)  # before the slow torch import and checkpoint load
    import torch

    from polcache.metrics import collect_metrics
    from polcache.policy import load_backend
    from polcache.serve.records import ErrorRecord, RequestRecord
    from polcache.serve.server import PolicyServer, served_batch

    log_to_stderr()
    torch.set_num_threads(args.threads)
    backend = load_backend(args.checkpoint, cache=args.cache, threads=args.threads, max_batch=args.max_batch,
                           **backend_options(args))
    info = {"role": "server", "checkpoint": args.checkpoint, "backend": backend.describe(),
            "policy": backend.spec.to_dict(), "deadline_ms": args.deadline_ms,
            "max_batch": served_batch(backend, args.max_batch)}  # what a recorded run says it served
    # no snapshot is read (window 0); the endpoint shows its families before the first request
    with collect_metrics(args.metrics_file, args.metrics_port, info=info, window=0,
                         kinds=(RequestRecord, ErrorRecord)) as metrics:
        server = PolicyServer(backend, args.bind, keys_dir=args.keys, insecure=args.insecure,
                              max_message_bytes=args.max_message_bytes, deadline_ms=args.deadline_ms,
                              on_record=metrics.record, on_session_closed=metrics.forget_robot,
                              # in every welcome: a robot reconnecting to another sampler or cache plan says so
                              name=f"polcache serve {args.checkpoint} ({_described(info['backend'])})",
                              instruction=args.instruction, max_batch=args.max_batch, rtc=args.rtc,
                              simulated_latency_ms=args.simulate_latency_ms, inline_ms=args.inline_ms)
        # e.g. on CUDA: captures each batch size's graph before the first robots ask (they wait meanwhile)
        sizes = tuple(range(1, server.max_batch + 1))
        if len(sizes) > 1:  # a minute or two on CPUs at --max-batch 64: not silence
            print(f"warming up batches of 1..{len(sizes)} robots", flush=True)
        if args.rtc:  # a torch backend with a flow sampler (PolicyServer checked)
            backend.warmup(sizes, rtc=True)
        else:
            backend.warmup(sizes)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        print(f"serving {args.checkpoint} on {server.endpoint} (Ctrl-C to stop)", flush=True)
        print(f"policy: {_described(info['backend'])}; {_batching(server.max_batch, backend, args.rtc)}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    if args.verify > 1:  # the startup info line's count is always 0: how many it chose, said at the end
        what = backend.describe()
        print(f"self-verification: {what['verified_chunks']} chunks chosen among {args.verify} candidates (a chunk is "
              f"scored once its robot executed actions at {what['verify_min_past']} past frames' steps and reported "
              f"them: protocol version 2)", flush=True)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from polcache.serve.security import generate_keys

    paths = generate_keys(args.dir, force=args.force)
    for path in paths:
        print(f"wrote {path}")
    server_public, server_secret, _, client_secret = paths
    print(f"copy {client_secret} and {server_public} to each robot; {server_secret} stays on this computer (keep the "
          f"folder out of version control: it holds secrets)")
    return 0


def _batching(max_batch: int, backend, rtc: bool) -> str:
    """How waiting robots are served: together up to max_batch (but the rows that self-verify or
    chunk in real time), or one per inference and why."""
    from polcache.policy.batching import batching_blocker

    if max_batch > 1:
        alone = [what for what, on in (("self-verifies", getattr(backend, "candidates", 1) > 1),
                                       ("is guided by real-time chunking", rtc)) if on]
        return (f"robots waiting together share one inference, up to {max_batch}"
                + (f" (but a robot whose chunk {' or '.join(alone)} has an inference of its own)" if alone else ""))
    why = batching_blocker(backend)
    return f"one robot per inference ({why})" if why else "one robot per inference (--max-batch 1)"


def _described(backend: dict) -> str:
    """One line of what serves: backend, device, a reduced precision and its check against fp32, sampler
    and steps, the cache plan (the schedule in force was said only in the metrics file) and
    self-verification where on."""
    cache = backend.get("cache")
    if not cache:
        plan = "no cache"
    else:
        name = cache.get("source") or cache.get("method")
        plan = (f"cache {name}: decided at run time" if cache.get("dynamic") else
                f"cache {name}: {cache.get('block_evals')} of {cache.get('block_evals_uncached')} block evaluations "
                f"per chunk")
    verify = backend.get("verify_candidates") or 1  # said only at the end (its count of chosen chunks) before
    verified = (f", self-verification: the best of {verify} candidate chunks, scored at "
                f"{backend.get('verify_min_past')} past frames' executed steps" if verify > 1 else "")
    precision, parity, reduced = backend.get("precision"), backend.get("parity"), ""
    if precision not in (None, "fp32"):
        reduced = f" in {precision}"
        if parity:
            reduced += (f" (checked against fp32: median |diff| {parity['median_abs']:.2g}, max "
                        f"{parity['max_abs']:.2g} over {parity['probes']} probe observations)")
    return (f"{backend.get('backend')} on {backend.get('device')}{reduced}, {backend.get('sampler')} "
            f"{backend.get('steps')} steps, {plan}{verified}")
