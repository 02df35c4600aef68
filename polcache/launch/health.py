"""Is a child ready? The policy server is ready when it echoes a protocol heartbeat (it answers
heartbeats from any peer, even before a handshake, docs/protocol.md); the dashboard when its HTTP
port answers. Both give up early if the process exits, so a crash is reported at once."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import zmq

from polcache_client.curve import apply_client_keys
from polcache_client.protocol import Heartbeat, ProtocolError, decode, encode


class NotReady(RuntimeError):
    """The process exited or did not answer in time; the message says which."""


def _check_alive(name: str, proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        raise NotReady(f"{name} exited with status {proc.returncode} before it was ready")


def wait_for_server(proc: subprocess.Popen, address: str, timeout_s: float, keys_dir: str | None = None) -> float:
    """Send heartbeats to `address` until one is echoed; returns the seconds it took."""
    t0 = time.monotonic()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys_dir:
            apply_client_keys(sock, keys_dir)
        sock.connect(address)
        while time.monotonic() - t0 < timeout_s:
            _check_alive("the server", proc)
            sock.send(encode(Heartbeat(t=time.monotonic())), zmq.NOBLOCK)
            if sock.poll(250):
                try:
                    if isinstance(decode(sock.recv()), Heartbeat):
                        return time.monotonic() - t0
                except ProtocolError:
                    pass  # not the answer we wait for: keep asking
        raise NotReady(f"the server did not answer a heartbeat on {address} within {timeout_s:g} s")
    finally:
        sock.close()


def wait_for_http(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    """Request `url` until the server answers with any HTTP status; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        _check_alive("the dashboard", proc)
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return time.monotonic() - t0
        except urllib.error.HTTPError:  # it answered, if only with an error status
            return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise NotReady(f"the dashboard did not answer on {url} within {timeout_s:g} s")
