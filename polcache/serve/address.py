"""ZeroMQ addresses as the server, `polcache launch` and their checks read them: one parser, so a
port that ZeroMQ would wrap around (tcp://HOST:99999 serves on 34463) is refused everywhere."""

from __future__ import annotations

import fcntl
import re
import socket
import struct

from polcache.errors import PolcacheError

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def tcp_port(address: str, name: str = "--bind", error: type[PolcacheError] = PolcacheError) -> tuple[str, int] | None:
    """(host, port) of a tcp:// address (port 0: ZeroMQ picks a free one); None for ipc:// and
    inproc://; anything else, or a port above 65535, raises `error` naming `name`."""
    if address.startswith(("ipc://", "inproc://")):
        return None
    match = re.fullmatch(r"tcp://(.+):(\d+)", address)
    if match is None:
        raise error(f"{name}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {address!r}")
    port = int(match.group(2))
    if port > 65535:
        raise error(f"{name}: port {port} of {address} is not a port number (0..65535)")
    host = match.group(1).strip("[]")
    return ("0.0.0.0" if host == "*" else host), port


def interface_address(host: str) -> str | None:
    """The IPv4 address of the network interface named `host` (ZeroMQ binds tcp://eth0:PORT there, a
    robot network's usual bind), else None: not an interface's name, or one without an IPv4 address."""
    if host not in {name for _, name in socket.if_nameindex()}:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", host[:15].encode()))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(answer[20:24])
