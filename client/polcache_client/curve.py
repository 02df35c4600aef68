"""CurveZMQ key files: one directory holding the server and client key pairs written by
`polcache keys`. The robot needs client.key_secret and server.key, never server.key_secret; the
server needs server.key_secret and admits the public keys of the other `*.key` files beside it
(polcache.serve.security.ClientKeys), not its own server.key. A robot with keys the server does
not admit gets no reply at all: the CurveZMQ handshake fails without a message to the robot; the
server's own pair given as the robot's is therefore refused here, before connecting."""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth

SERVER_NAME = "server"
CLIENT_NAME = "client"


def key_path(keys_dir: str | Path, name: str, secret: bool) -> Path:
    return Path(keys_dir) / (f"{name}.key_secret" if secret else f"{name}.key")


class KeyFolderError(ValueError):
    """A robot's CurveZMQ key folder lacks client.key_secret or server.key, or holds keys the server
    never admits: raised before connecting, since the server would answer such a robot with silence."""


def load_keypair(keys_dir: str | Path, name: str) -> tuple[bytes, bytes]:
    path = key_path(keys_dir, name, secret=True)
    if Path(keys_dir).is_file():  # a key file given for the folder: "create keys there" could not be done
        raise FileNotFoundError(f"CurveZMQ keys {keys_dir}: is a file; expected the folder `polcache keys --dir DIR` "
                                f"wrote (the one holding {path.name})")
    if not path.is_file():
        raise FileNotFoundError(f"CurveZMQ key {path} not found (create keys with `polcache keys --dir {keys_dir}`)")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def apply_client_keys(socket: zmq.Socket, keys_dir: str | Path) -> None:
    """The robot's keys on `socket`; a KeyFolderError names what is wrong with the folder. Keys made
    anew on the robot (`polcache keys`, which a robot does not even have) are no cure: the server
    admits only the client keys beside its own, so the advice is to copy them."""
    client_path = key_path(keys_dir, CLIENT_NAME, secret=True)
    server_path = key_path(keys_dir, SERVER_NAME, secret=False)
    missing = [path.name for path in (client_path, server_path) if not path.is_file()]
    if missing:
        raise KeyFolderError(f"CurveZMQ key folder {keys_dir}: {' and '.join(missing)} not found (copy "
                             f"client.key_secret and server.key from the folder `polcache keys` wrote, on the "
                             f"machine that ran it)")
    try:
        public, secret = load_keypair(keys_dir, CLIENT_NAME)
        server_public = zmq.auth.load_certificate(str(server_path))[0]
    except (OSError, ValueError) as exc:  # unreadable, or not a key file
        raise KeyFolderError(f"CurveZMQ key folder {keys_dir}: {exc}") from None
    if public == server_public:  # server.key_secret copied as client.key_secret: the server refuses it, silently
        raise KeyFolderError(f"{client_path} holds the server's key pair, not a client's (the server admits no "
                             f"robot with it): copy client.key_secret from the folder `polcache keys` wrote")
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public
