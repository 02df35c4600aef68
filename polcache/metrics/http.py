"""A tiny Prometheus endpoint on the standard library: GET /metrics (prometheus_client's text
exposition of the run's own registry), nothing else. Off unless a port is given, and bound to
loopback unless told otherwise."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from polcache.errors import PolcacheError
from polcache.metrics.registry import Metrics


def serve_prometheus(metrics: Metrics, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving on a daemon thread; call .shutdown() to stop. Port 0 picks a free one
    (read it back from .server_address)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            body = metrics.prometheus_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # "Address already in use" alone named neither the port nor the option
        raise PolcacheError(f"--metrics-port {port}: cannot serve Prometheus metrics on {host}:{port}: "
                            f"{exc.strerror or exc}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="polcache-prometheus", daemon=True).start()
    return server
