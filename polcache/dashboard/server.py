"""`polcache dashboard`: a local web page of a running (or finished) robot loop, live.

Everything the page needs is served from here (the page and its hand-written SVG plotting in
polcache/dashboard/static; no CDN, no plotting package), so it works on a robot network with no
internet. A background thread follows the sources every `poll_s` and samples this machine's
CPU and GPU; the page polls GET /data.json (every view, computed from the records, see
polcache.dashboard.views) once a second. Sources: metrics JSON-lines files (rotated and
truncated files are followed) and/or Prometheus endpoints.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from polcache.dashboard.scrape import PrometheusScraper
from polcache.dashboard.system import SystemSampler
from polcache.dashboard.tail import JsonlTail
from polcache.dashboard.views import RunState
from polcache.errors import PolcacheError
from polcache.metrics.jsonl import check_metrics_input

log = logging.getLogger(__name__)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}


class Dashboard:
    """Sources -> RunState, on a thread; `serve(port)` starts the page. `stop()` ends both."""

    def __init__(self, metrics_files: Sequence[str | Path] = (), connect: Sequence[str] = (), poll_s: float = 0.5,
                 keep: int = 20_000):
        if not metrics_files and not connect:
            raise PolcacheError("give --metrics FILE (repeatable) or --connect ADDR")
        self.state = RunState(keep=keep)
        self.sources = ([(JsonlTail(p), {"name": str(p)}) for p in metrics_files]
                        + [(PrometheusScraper(a), {"name": a}) for a in connect])
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.system = SystemSampler()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="polcache-dashboard-follow", daemon=True)
        self.http: ThreadingHTTPServer | None = None

    def poll(self) -> None:
        """Read every source once and sample the machine (the thread calls this; tests may too).
        A source that cannot be read says why on the page and in one log line per change; the
        others are still read."""
        if self._read_sources():  # started over: the files read before the rewritten one, again from their start
            self._read_sources()
        cpu, gpu = self.system.sample_cpu(), self.system.sample_gpu()
        with self.lock:
            self.state.add_system(time.time(), cpu, gpu)

    def _read_sources(self) -> bool:
        """Each source's new records into the state; whether a rewritten file made the page start over."""
        started_over = False
        for i, (source, _) in enumerate(self.sources):
            before = source.problem
            try:
                records = source.poll()
            except OSError as exc:  # e.g. a read error on an open file: this source only
                source.problem, records = f"{getattr(source, 'path', source)}: cannot read it ({exc})", []
            if source.problem != before and source.problem:
                log.warning("dashboard: %s", source.problem)
            if getattr(source, "rewritten", False):
                self._start_over(source)
                started_over = True
            if records:
                with self.lock:
                    self.state.add(records, self.sources[i][1])
        return started_over

    def _start_over(self, rewritten: JsonlTail) -> None:
        """A file truncated or rewritten (a new run over the same path, a user's edit) holds other records
        than those shown: counted on top of them, the rates doubled and the counts grew by the records read
        twice. The page starts over from what the files hold now: every file is read again from its start
        (a rotated-away backup's records are no longer shown, as on a page opened now); the machine's load
        samples are kept."""
        log.warning("dashboard: %s was truncated or rewritten: the page shows what the files hold now",
                    rewritten.path)
        with self.lock:
            system = self.state.system
            self.state = RunState(keep=self.state.keep)
            self.state.system = system
        for i, (source, context) in enumerate(self.sources):
            self.sources[i] = (source, {"name": context["name"]})  # clock offsets and robot labels start over too
            if isinstance(source, JsonlTail) and source is not rewritten:
                source.rewind()

    def data(self) -> dict:
        with self.lock:
            views = self.state.views()
        views["_meta"]["bad_lines"] = views["_meta"]["bad_records"] + sum(
            getattr(s, "bad_lines", 0) for s, _ in self.sources)
        views["_meta"]["source_problems"] = [s.problem for s, _ in self.sources if s.problem]
        views["_meta"]["notes"] += [held for s, _ in self.sources if (held := getattr(s, "held_line", None))]
        return views

    def serve(self, port: int = 8050, host: str = "127.0.0.1") -> str:
        """Start following and serving (daemon threads); returns the page's address."""
        self.http = ThreadingHTTPServer((host, port), _handler(self))
        self.http.daemon_threads = True
        self._thread.start()
        threading.Thread(target=self.http.serve_forever, name="polcache-dashboard-http", daemon=True).start()
        return f"http://{host}:{self.http.server_address[1]}/"

    def stop(self) -> None:
        self._stop.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self._thread.is_alive():  # its poll under way reads the files closed below
            self._thread.join(timeout=5)
        for source, _ in self.sources:
            if isinstance(source, JsonlTail):
                source.close()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bug in reading one record must not stop the page updating
                log.exception("dashboard: reading the sources failed")
            self._stop.wait(self.poll_s)


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/data.json":
                self._send(json.dumps(dashboard.data(), allow_nan=False).encode(), "application/json")
            elif path in STATIC:
                name, content_type = STATIC[path]
                self._send(files("polcache.dashboard").joinpath("static", name).read_bytes(), content_type)
            else:
                self.send_error(404, "the dashboard serves /, /app.js and /data.json")

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one request a second per open page
            pass

    return Handler


def run_dashboard(metrics_files: Sequence[str] = (), connect: Sequence[str] = (), port: int = 8050,
                  host: str = "127.0.0.1", seconds: float | None = None) -> None:
    """Serve until interrupted (or for `seconds`), printing the page's address first."""
    for path in metrics_files:  # refused now, not as a failed read at every poll or an empty page
        check_metrics_input(path, "--metrics")
    dashboard = Dashboard(metrics_files, connect)
    try:
        url = dashboard.serve(port, host)
    except OSError as exc:
        raise PolcacheError(f"cannot listen on {host}:{port}: {exc}") from None
    print(f"dashboard on {url} (Ctrl-C to stop)", flush=True)
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        dashboard.stop()
