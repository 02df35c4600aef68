"""`polcache dashboard` and `polcache report`: metrics as a live page or a static one."""

from __future__ import annotations

import argparse
import signal

from polcache.cli_types import non_empty, port


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboard", help="live local web page of a server's and robots' metrics",
                              description="Follow metrics JSON-lines files (--metrics-file of `serve` and `sim-robot`; "
                                          "rotated or truncated files are followed) and/or Prometheus endpoints "
                                          "(--metrics-port) and serve a live page (on 127.0.0.1 unless --host "
                                          "says). Every asset is "
                                          "served from here; no internet needed.")
    p.add_argument("--metrics", action="append", default=[], metavar="FILE",
                   help="a metrics JSON-lines file to follow (repeatable: server and robots)")
    p.add_argument("--connect", action="append", default=[], metavar="ADDR",
                   help="scrape a running process's Prometheus endpoint: HOST:PORT or http://HOST:PORT/metrics "
                        "(repeatable)")
    p.add_argument("--port", type=port, default=8050, help="port of the page (default 8050; 0 picks a free one)")
    p.add_argument("--host", type=non_empty, default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.set_defaults(handler=_dashboard)

    p = subparsers.add_parser("report", help="static HTML page with PNG plots of recorded runs",
                              description="The dashboard's views of recorded metrics files (rotated backups FILE.N "
                                          "are read too) as OUT/index.html with one PNG per view.")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="metrics JSON-lines files (server and robots)")
    p.add_argument("--out", required=True, help="output directory (written whole; an existing one is replaced only if "
                                               "it is an earlier report)")
    p.set_defaults(handler=_report)


def _dashboard(args: argparse.Namespace) -> int:
    from polcache.dashboard import run_dashboard

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # TERM (polcache launch, systemd) stops it as Ctrl-C does
    try:
        run_dashboard(args.metrics, args.connect, args.port, args.host)
    except KeyboardInterrupt:  # the way a service is stopped, not a failure: exit 0, as `polcache serve`
        pass
    return 0


def _report(args: argparse.Namespace) -> int:
    from polcache.dashboard import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0
