"""Who may connect: loopback by default; anything wider needs CurveZMQ keys or an explicit
`--insecure`, because the protocol carries robot commands."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import zmq
import zmq.auth

from polcache.errors import PolcacheError
from polcache.outputs import check_output
from polcache.serve.address import tcp_port
from polcache_client.curve import CLIENT_NAME, SERVER_NAME, key_path, load_keypair
from polcache_client.logs import RateLimitedLog

log = logging.getLogger("polcache.serve")


class InsecureBindError(PolcacheError):
    """A non-loopback bind without keys and without --insecure."""


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address or localhost."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: not provably loopback
        return False


def check_bind(address: str, keys_dir: str | None, insecure: bool) -> None:
    """Refuse, before the checkpoint loads, a malformed bind address and an unencrypted wide one."""
    tcp_port(address, "--bind")
    if keys_dir or insecure or is_loopback(address):
        return
    raise InsecureBindError(
        f"refusing to bind {address} without encryption: create keys with `polcache keys --dir DIR` and pass "
        f"--keys DIR (to the robot too), or pass --insecure to serve unencrypted on a trusted network"
    )


def generate_keys(keys_dir: str | Path, force: bool = False) -> list[Path]:
    """Write server and client CurveZMQ key pairs; secret keys are readable by the owner only."""
    keys_dir = check_output(keys_dir, "a folder for keys", folder=True, ours=lambda _: True, flag="--dir")
    targets = [key_path(keys_dir, n, s) for n in (SERVER_NAME, CLIENT_NAME) for s in (False, True)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise PolcacheError(f"{existing[0]} already exists (pass --force to replace the keys)")
    keys_dir.mkdir(parents=True, exist_ok=True)
    for name in (SERVER_NAME, CLIENT_NAME):
        zmq.auth.create_certificates(str(keys_dir), name)
        os.chmod(key_path(keys_dir, name, secret=True), 0o600)
    return targets


def keys_error(keys_dir: str | Path, exc: Exception) -> PolcacheError:
    """A key folder the server cannot read, named as such ("cannot serve on ADDR: ..." alone read as the
    address's problem)."""
    remedy = ("" if isinstance(exc, FileNotFoundError) else
              " (the server's user must read them: check their owner and mode, e.g. a folder made by root for a "
              "service that runs as another user; new keys would lock out the robots given these)"
              if isinstance(exc, PermissionError) else
              f" (damaged? create new ones with `polcache keys --dir {keys_dir} --force` and give the robots theirs)")
    return PolcacheError(f"the server's keys in {keys_dir}: {exc}{remedy}")


def apply_server_keys(socket: zmq.Socket, keys_dir: str | Path) -> None:
    try:
        public, secret = load_keypair(keys_dir, SERVER_NAME)
    except (OSError, ValueError) as exc:
        raise keys_error(keys_dir, exc) from None
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True


class ClientKeys:
    """Which robots a CurveZMQ server admits: the public keys of the `*.key` files in its key folder
    but its own. zmq.auth's `configure_curve(location=DIR)` admits every `*.key` there, the server's
    `server.key` too, so the server's key pair (which the robots' folders hold half of) worked as a
    client's. A refusal is one log line (rate-limited): the robot itself gets no reply at all."""

    def __init__(self, keys_dir: str | Path):
        self.keys_dir = Path(keys_dir)
        try:
            self.server_key, _ = load_keypair(keys_dir, SERVER_NAME)
            found = zmq.auth.load_certificates(str(keys_dir))
        except (OSError, ValueError) as exc:
            raise keys_error(keys_dir, exc) from None
        self.keys = frozenset(k for k in found if k != self.server_key)  # Z85 bytes, as the callback gets them
        self._warn = RateLimitedLog(log).warning

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials-provider hook (on the authenticator's thread), per connection."""
        if key in self.keys:
            return True
        what = "the server's own key pair" if key == self.server_key else "an unknown client key"
        self._warn(what, f"CurveZMQ authentication refused for {what} ({key.decode('ascii', 'replace')}): not "
                            f"a client key in {self.keys_dir}; the robot gets no reply (give it client.key_secret "
                            f"and server.key from the folder `polcache keys` wrote)")
        return False


def start_authenticator(context: zmq.Context, keys_dir: str | Path):
    """A started zmq.auth ThreadAuthenticator on `context` admitting the client keys of `keys_dir`
    (ClientKeys); the caller stops it. Raises PolcacheError, with nothing left running, where the
    keys cannot be read."""
    from zmq.auth.thread import ThreadAuthenticator

    keys = ClientKeys(keys_dir)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=keys)
    return auth
