"""TensorRT engines: the on-disk cache refuses or rebuilds stale and foreign engines (tested
everywhere), and where TensorRT and a GPU exist, engines match ONNX Runtime and the fp16 gate
holds. TensorRT cannot be installed on our CI machines: those tests skip with that reason."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.export.trt_engines import EngineKey, engine_paths, read_key, save_engine, stale_reason

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
NEEDS_TRT = pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU (not installable here)")

KEY = EngineKey(graph="step", graph_sha256="sha256:abc", precision="fp16", gpu="NVIDIA H100 80GB HBM3",
                compute_capability="9.0", tensorrt="10.7.0", max_batch=8)


def test_an_engine_serves_only_the_graph_precision_gpu_and_version_it_was_built_for():
    from dataclasses import asdict

    stored = asdict(KEY)
    assert stale_reason(stored, KEY) is None
    assert stale_reason(stored, replace(KEY, max_batch=4)) is None  # a wider profile serves smaller batches
    assert "max_batch 8 (need >= 16)" in stale_reason(stored, replace(KEY, max_batch=16))
    assert "tensorrt '10.7.0' (need '10.8.0')" in stale_reason(stored, replace(KEY, tensorrt="10.8.0"))
    assert "compute_capability '9.0' (need '8.7')" in stale_reason(stored, replace(KEY, compute_capability="8.7"))
    assert "graph_sha256" in stale_reason(stored, replace(KEY, graph_sha256="sha256:def"))
    assert "precision 'fp16' (need 'fp32')" in stale_reason(stored, replace(KEY, precision="fp32"))
    assert "no readable key file" in stale_reason(None, KEY)


def test_engines_and_keys_are_written_atomically_and_read_back(tmp_path):
    path = save_engine(tmp_path, KEY, b"engine-bytes")
    engine, sidecar = engine_paths(tmp_path, KEY)
    assert path == engine and engine.read_bytes() == b"engine-bytes"
    assert engine.name == "step-fp16-sm90-trt10.7.0.engine"
    assert stale_reason(read_key(sidecar), KEY) is None
    sidecar.write_text("{truncated")
    assert read_key(sidecar) is None
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@NEEDS_TRT
def test_trt_engines_match_onnx_runtime_and_are_reused(tmp_path):
    from polcache.export.exporter import export_policy
    from polcache.export.ort_backend import OrtBackend
    from polcache.export.trt_backend import TrtBackend

    p = tiny_policy(n_layers=2, width=32, obs_dim=8, action_dim=2)
    export_policy(p, tmp_path / "art", cache="uniform:3", sampler="ddpm", steps=8)
    ort, trt = OrtBackend(tmp_path / "art"), TrtBackend(tmp_path / "art", device="cuda")
    assert trt.deviation_from(ort)["max_abs"] < 1e-3
    built = sorted((tmp_path / "art" / "engines").glob("*.engine"))
    again = TrtBackend(tmp_path / "art", device="cuda")  # loads, does not rebuild
    assert sorted((tmp_path / "art" / "engines").glob("*.engine")) == built
    obs = {"state": np.zeros((3, 2, 8), np.float32)}
    assert again.predict(obs, seed=0).shape == (3, p.cfg.n_action_steps, 2)
    half = TrtBackend(tmp_path / "art", device="cuda", precision="fp16", precision_tolerance=1.0)
    assert half.parity["min_cosine"] > 0.9


def test_serve_builds_the_engines_for_its_largest_batch(tmp_path, monkeypatch, capsys):
    """`polcache serve --max-batch 16` batches up to 16 robots: engines built for TrtBackend's default 8
    failed at the ninth (found by reading: serve never passed --max-batch to the engines)."""
    import polcache.export.trt_backend as trt_backend
    from polcache.cli import main
    from polcache.errors import PolcacheError
    from polcache.export.exporter import export_policy

    built = {}

    def recorded(artifact, **options):
        built.update(options)
        raise PolcacheError("recorded")  # no GPU here: stop where the engines would be built

    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_backend, "TrtBackend", recorded)
    export_policy(tiny_policy(n_layers=1, width=16, obs_dim=4, action_dim=2), tmp_path / "art", sampler="ddpm", steps=2)
    assert main(["serve", "--checkpoint", str(tmp_path / "art"), "--backend", "trt", "--device", "cuda",
                 "--max-batch", "16"]) == 2
    assert "recorded" in capsys.readouterr().err
    assert built["max_batch"] == 16
