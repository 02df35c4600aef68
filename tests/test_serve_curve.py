"""CurveZMQ: the server admits the client keys of its key folder, never its own key pair, and
says in its log when it refused a robot (which itself gets no reply)."""

from __future__ import annotations

import logging

import pytest
import zmq
import zmq.auth

from polcache.errors import PolcacheError
from polcache_client import KeyFolderError, PolicyClient
from polcache_client.connection import ConnectError
from polcache.serve.security import ClientKeys, apply_server_keys, generate_keys, start_authenticator


@pytest.fixture
def keys(tmp_path):
    generate_keys(tmp_path / "keys")
    return tmp_path / "keys"


def pair(keys_dir, name: str) -> tuple[bytes, bytes]:
    return zmq.auth.load_certificate(str(keys_dir / f"{name}.key_secret"))


def test_only_client_keys_are_admitted(keys, tmp_path, caplog):
    zmq.auth.create_certificates(str(tmp_path), "rogue")
    admitted = ClientKeys(keys)
    client, server, rogue = (pair(d, n)[0] for d, n in ((keys, "client"), (keys, "server"), (tmp_path, "rogue")))
    assert admitted.keys == {client}  # server.key is a *.key file of the folder too
    with caplog.at_level(logging.WARNING, logger="polcache.serve"):
        assert admitted.callback("*", client)
        assert not admitted.callback("*", server)
        assert not admitted.callback("*", rogue)
    assert "CurveZMQ authentication refused for the server's own key pair" in caplog.text
    assert f"CurveZMQ authentication refused for an unknown client key ({rogue.decode()})" in caplog.text
    with pytest.raises(PolcacheError, match="polcache keys"):
        ClientKeys(tmp_path / "nokeys")


def test_the_servers_key_pair_is_no_client_credential(keys, tmp_path, caplog):
    """Over real sockets: a robot with the client keys is heard, one with the server's pair (or a
    key from elsewhere) is not, and the server's log says so; the reference client refuses the
    server's pair itself, before it waits on a silent server."""
    zmq.auth.create_certificates(str(tmp_path), "rogue")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    apply_server_keys(router, keys)
    auth = start_authenticator(ctx, keys)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

    def heard(public: bytes, secret: bytes) -> bool:
        dealer = ctx.socket(zmq.DEALER)
        dealer.curve_publickey, dealer.curve_secretkey = public, secret
        dealer.curve_serverkey = pair(keys, "server")[0]
        dealer.connect(endpoint)
        dealer.send(b"hello")
        got = bool(router.poll(1500))
        if got:
            router.recv_multipart()
        dealer.close(linger=0)
        return got

    robot = tmp_path / "robot"  # what a robot given the server's key pair as its own holds
    robot.mkdir()
    (robot / "server.key").write_bytes((keys / "server.key").read_bytes())
    (robot / "client.key_secret").write_bytes((keys / "server.key_secret").read_bytes())
    stranger = tmp_path / "stranger"  # a robot whose key pair this server never saw
    stranger.mkdir()
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    (stranger / "client.key_secret").write_bytes((tmp_path / "rogue.key_secret").read_bytes())
    try:
        with caplog.at_level(logging.WARNING, logger="polcache.serve"):
            assert heard(*pair(keys, "client"))
            assert not heard(*pair(keys, "server"))
            assert not heard(*pair(tmp_path, "rogue"))
            with pytest.raises(ValueError, match="holds the server's key pair, not a client's"):
                PolicyClient(endpoint, {"state": ((3,), "float32")}, 2, hz=50, keys_dir=str(robot)).connect(0.5)
            client = PolicyClient(endpoint, {"state": ((3,), "float32")}, 2, hz=50, keys_dir=str(stranger))
            with pytest.raises(ConnectError, match="no answer .* does not admit this robot's keys: CurveZMQ refuses"):
                client.connect(timeout_s=0.5)  # silence is all a robot sees
            client.close()
    finally:
        router.close(linger=0)
        auth.stop()
        ctx.term()
    assert "authentication refused for the server's own key pair" in caplog.text
    assert "authentication refused for an unknown client key" in caplog.text


def test_a_robots_key_folder_without_its_keys_says_to_copy_them(keys, tmp_path):
    """A robot without keys was told to run `polcache keys`: a robot does not have polcache, and keys
    made there would not be admitted by the server. The advice is to copy them."""
    robot = tmp_path / "robot"
    robot.mkdir()
    spec = {"state": ((3,), "float32")}
    for present, missing in (((), "client.key_secret and server.key"), (("client.key_secret",), "server.key")):
        for name in present:
            (robot / name).write_bytes((keys / name).read_bytes())
        with pytest.raises(KeyFolderError, match=f"key folder {robot}: {missing} not found \\(copy client.key_secret "
                                                 f"and server.key from the folder `polcache keys` wrote"):
            PolicyClient("tcp://127.0.0.1:5555", spec, 2, hz=50, keys_dir=str(robot))
    (robot / "server.key").write_text("not a key\n")
    with pytest.raises(KeyFolderError, match=f"key folder {robot}: "):
        PolicyClient("tcp://127.0.0.1:5555", spec, 2, hz=50, keys_dir=str(robot))


@pytest.mark.parametrize("robot_keys", ["refused", "none"])
def test_the_servers_disconnect_line_names_missing_or_refused_keys_as_a_cause(keys, tmp_path, caplog, robot_keys):
    """A robot with keys the server does not admit, or with no keys at all, is dropped before any
    handshake: the disconnect line the server logs names both causes; only refused keys were logged
    before it (the line said "logged before" of a robot without keys too, of which nothing was)."""
    from fakes import FakeBackend, wait_for
    from polcache.serve.server import PolicyServer

    zmq.auth.create_certificates(str(tmp_path), "rogue")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    (stranger / "client.key_secret").write_bytes((tmp_path / "rogue.key_secret").read_bytes())
    with caplog.at_level(logging.INFO, logger="polcache.serve"), \
            PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", keys_dir=str(keys)) as server:
        client = PolicyClient(server.endpoint, {"state": ((3,), "float32")}, 2, hz=50,
                              keys_dir=str(stranger) if robot_keys == "refused" else None)
        with pytest.raises(ConnectError):
            client.connect(timeout_s=0.5)
        client.close()
        assert wait_for(lambda: "a connection closed before any handshake" in caplog.text, 3)
    assert ("a robot that exited, a robot without CurveZMQ keys or with keys refused (logged before if so)"
            in caplog.text)
    refusal = caplog.text.find("authentication refused for an unknown client key")
    assert (0 <= refusal < caplog.text.index("closed before")) if robot_keys == "refused" else refusal == -1


def test_a_damaged_server_key_is_named_as_the_keys_problem(keys):
    """It read "cannot serve on ADDR: No public key found in DIR/server.key", as if the address were at fault."""
    from polcache.serve.server import PolicyServer

    from fakes import FakeBackend

    server_key = keys / "server.key"
    server_key.write_bytes(server_key.read_bytes()[:10])
    with pytest.raises(PolcacheError, match=rf"the server's keys in {keys}: No public key found in {server_key} "
                                            rf"\(damaged\? create new ones with `polcache keys --dir {keys} --force`"):
        PolicyServer(FakeBackend(), "tcp://127.0.0.1:0", keys_dir=str(keys))


def test_a_server_key_it_may_not_read_says_to_fix_its_owner_not_to_make_new_keys():
    """A key folder made by root for a service running as another user: the advice was to create new
    keys, which locks out every robot given the old ones."""
    from polcache.serve.security import keys_error

    said = str(keys_error("/opt/polcache/keys", PermissionError(13, "Permission denied", "server.key_secret")))
    assert "check their owner and mode" in said and "--force" not in said


def test_polcache_keys_says_which_keys_go_to_the_robots(tmp_path, capsys):
    """It printed only the four paths: which to copy where was in the README alone (a probe's key folder,
    secrets included, sat untracked in its clone, a `git add -A` from a commit)."""
    from polcache.cli import main

    assert main(["keys", "--dir", str(tmp_path / "k")]) == 0
    k = tmp_path / "k"
    assert (f"copy {k / 'client.key_secret'} and {k / 'server.key'} to each robot; {k / 'server.key_secret'} stays "
            f"on this computer") in capsys.readouterr().out
