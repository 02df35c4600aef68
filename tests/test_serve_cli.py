"""`polcache serve`, `keys` and `sim-robot` turn user errors into one line and exit code 2."""

from __future__ import annotations

import re

import pytest

from polcache.cli import main


def test_keys_are_written_once(tmp_path, capsys):
    assert main(["keys", "--dir", str(tmp_path / "k")]) == 0
    assert "server.key_secret" in capsys.readouterr().out
    assert main(["keys", "--dir", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "--dir", str(tmp_path / "k"), "--force"]) == 0


def test_a_key_file_given_for_the_key_folder_is_named_as_such(tmp_path, capsys):
    """It was "server.key_secret not found (create keys with polcache keys --dir <the file>)"."""
    from polcache.errors import PolcacheError
    from polcache.serve.security import apply_server_keys

    assert main(["keys", "--dir", str(tmp_path / "k")]) == 0
    with pytest.raises(PolcacheError, match=r"k/client.key: is a file; expected the folder `polcache keys --dir DIR` "
                                            r"wrote \(the one holding server.key_secret\)"):
        apply_server_keys(None, tmp_path / "k" / "client.key")


def test_serve_refuses_an_open_bind_before_loading_anything(capsys):
    assert main(["serve", "--checkpoint", "/nonexistent", "--bind", "tcp://0.0.0.0:5555"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to bind tcp://0.0.0.0:5555" in err and "--insecure" in err


def test_serve_reports_a_missing_checkpoint(capsys):
    assert main(["serve", "--checkpoint", "/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err


def test_sim_robot_without_a_server(capsys):
    pytest.importorskip("metaworld")
    code = main(["sim-robot", "--task", "reach-v3", "--hz", "50", "--server", "tcp://127.0.0.1:1",
                 "--connect-timeout", "0.3"])
    assert code == 2 and "no answer from a policy server at tcp://127.0.0.1:1" in capsys.readouterr().err


def test_sim_robot_names_a_server_address_without_its_transport(capsys):
    pytest.importorskip("mujoco")
    code = main(["sim-robot", "--task", "cue-reach", "--hz", "20", "--server", "localhost:5555"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("polcache sim-robot: error: cannot connect to 'localhost:5555' (expected e.g. "
                                        "tcp://host:5555)") and len(err.splitlines()) == 1


def test_sim_robot_names_an_instruction_that_is_not_utf8(capsys):
    pytest.importorskip("mujoco")
    code = main(["sim-robot", "--task", "cue-reach", "--hz", "20", "--server", "tcp://127.0.0.1:1",
                 "--connect-timeout", "0.3", "--instruction", "go \udcff"])  # what Python makes of $'go \xff'
    err = capsys.readouterr().err
    assert code == 2 and err == "polcache sim-robot: error: instruction: not encodable as UTF-8 (lone surrogate)\n"


def test_sim_robot_rejects_a_bad_rate(capsys):
    with pytest.raises(SystemExit):
        main(["sim-robot", "--task", "reach-v3", "--hz", "0"])
    assert "expected a rate in [0.01, 10000] Hz, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("name, why", [("", "non-empty"), (" ", "non-empty"), ("arm\n2", "printable"),
                                       ("a" * 5000, "at most 4096 characters")])
def test_sim_robot_refuses_a_name_the_server_would(name, why, capsys):
    with pytest.raises(SystemExit):
        main(["sim-robot", "--task", "reach-v3", "--hz", "50", "--name", name])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --name: expected a name the server accepts" in err and why in err
    assert len(err) < 300  # the name is shortened, not echoed whole


@pytest.mark.parametrize("cap", ["0", "65"])  # 65: a batch larger than the robots a server serves at once
def test_serve_rejects_a_batch_cap_outside_one_to_the_session_limit(cap, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--checkpoint", "/nonexistent", "--max-batch", cap])
    err = capsys.readouterr().err
    assert f"--max-batch: expected a batch size in 1..64 (the most robots a server serves at once), got {cap}" in err


def test_serve_takes_the_sampler_and_steps_eval_takes():
    """The README's export section asks --sampler/--steps given to serve to match an artifact's;
    serve did not take them at all. Both commands now share them with the other backend options."""
    from polcache.cli import build_parser
    from polcache.cli_types import backend_options

    for command in ("serve", "eval"):
        args = build_parser().parse_args([command, "--checkpoint", "x", "--sampler", "ddim", "--steps", "4"])
        assert {k: backend_options(args)[k] for k in ("sampler", "steps")} == {"sampler": "ddim", "steps": 4}


def test_readme_serve_usage_lists_every_serve_flag():
    """README's `polcache serve` usage lacked --deadline-ms and --max-message-bytes; the backend
    options it shares with eval stand there as `[--backend ...] [--device ...] [--precision ...]`."""
    import argparse
    import re
    from pathlib import Path

    from polcache.cli import OneLineParser, build_parser
    from polcache.cli_types import add_backend_options

    shared = OneLineParser(add_help=False)
    add_backend_options(shared)
    backend = {o for a in shared._actions for o in a.option_strings}
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = re.search(r"\n    polcache serve .*?\n(?=    polcache \w)", readme, re.S).group(0)
    assert sorted(f for f in flags - backend if not re.search(re.escape(f) + r"\b", usage)) == []


def test_serve_says_which_backend_sampler_and_cache_plan_serve():
    """The schedule in force was said only in the metrics file: nothing on the console confirmed it."""
    from pathlib import Path

    from polcache.policy.loader import load_backend
    from polcache.serve.cli import _described

    checkpoint = str(Path(__file__).resolve().parents[1] / "polcache" / "assets" / "checkpoints" / "reach-v3")
    assert _described(load_backend(checkpoint, cache="uniform:3").describe()) == (
        "torch on cpu, ddim 16 steps, cache uniform:3: 72 of 192 block evaluations per chunk")
    assert _described(load_backend(checkpoint, cache="threshold:0.1").describe()).endswith(
        "cache threshold:0.1: decided at run time")
    assert _described(load_backend(checkpoint).describe()).endswith(", no cache")
    assert re.fullmatch(r"torch on cpu in bf16 \(checked against fp32: median \|diff\| [\d.e-]+, max [\d.e-]+ over 8 "
                        r"probe observations\), ddim 16 steps, no cache",
                        _described(load_backend(checkpoint, precision="bf16").describe()))  # said nowhere (a probe)
    # self-verification was said only at the end, in its count of chosen chunks (an outside probe)
    ptp = str(Path(checkpoint).parent / "cue-reach-ptp")
    assert _described(load_backend(ptp, candidates=16, min_verified=3).describe()).endswith(
        "no cache, self-verification: the best of 16 candidate chunks, scored at 3 past frames' executed steps")
    assert "verification" not in _described(load_backend(ptp).describe())


def test_serve_says_at_the_end_how_many_chunks_self_verification_chose():
    """`serve --verify` showed its count only in the start-up info line, where it is always 0."""
    import signal
    import subprocess
    import sys

    from fakes import free_port

    proc = subprocess.Popen([sys.executable, "-m", "polcache", "serve", "--checkpoint",
                             "polcache/assets/checkpoints/cue-reach-ptp", "--verify", "2", "--bind",
                             f"tcp://127.0.0.1:{free_port()}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout.readline() == "warming up batches of 1..8 robots\n"
        assert proc.stdout.readline().startswith("serving ")
        policy = proc.stdout.readline()  # read here: communicate() below misses what readline() buffered
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    # robots share an inference, but one whose chunk self-verifies: said at start-up (said nowhere, a probe)
    assert policy.startswith("policy: ") and policy.rstrip().endswith(
        "robots waiting together share one inference, up to 8 (but a robot whose chunk self-verifies has an inference "
        "of its own)")
    assert ("self-verification: 0 chunks chosen among 2 candidates (a chunk is scored once its robot executed actions "
            "at 15 past frames' steps and reported them: protocol version 2)") in out
