"""ONNX export: graphs pass the checker, ONNX Runtime matches torch per step and per chunk (with
and without a cache plan, any batch size), and a bad artifact or mismatched request is refused."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from helpers import tiny_policy, tiny_vla
from test_cli_errors import _err

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from polcache.cache.calibrate import calibrate  # noqa: E402
from polcache.cache.errors import CacheError  # noqa: E402
from polcache.cache.schedule import build_schedule, load_schedule, model_hash, save_schedule  # noqa: E402
from polcache.cli import main  # noqa: E402
from polcache.config import ExperimentConfig  # noqa: E402
from polcache.errors import BackendUnavailableError, ExportError  # noqa: E402
from polcache.export.exporter import export_policy, plan_table, torch_reference  # noqa: E402
from polcache.export.ort_backend import OrtBackend  # noqa: E402
from polcache.policy import load_backend, save_checkpoint  # noqa: E402
from polcache.policy.executor import DeltaStore  # noqa: E402

K = 8
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(n_layers=2, width=32, obs_dim=8, action_dim=2)


@pytest.fixture(scope="module")
def schedule(policy, tmp_path_factory):
    """A BAC schedule calibrated on random states (DDPM, K=8, S=3, Bubbling Union over 2 blocks)."""
    smp = policy.sampler("ddpm", K)
    obs = {"state": torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(0))}
    calib = calibrate(policy, smp, obs, "random states", batch_size=6, sensitivity_samples=2)
    sched = build_schedule(calib, "bac", 3, 2, True, model_hash(policy), "ddpm", "error-bound")
    return str(save_schedule(sched, tmp_path_factory.mktemp("sched") / "bac.json"))


@pytest.fixture(scope="module")
def checkpoint(policy, tmp_path_factory):
    cfg = ExperimentConfig(task="cue-reach", policy=policy.cfg)
    return str(save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", cfg, policy))


def _obs(spec, batch, seed=0):
    """Random pixels and states; an instruction as text (random bytes are none, and are refused)."""
    rng = np.random.default_rng(seed)
    obs = {k: (rng.integers(0, 256, (batch, spec.n_obs_steps, *s.shape)) if s.dtype == "uint8"
               else rng.normal(size=(batch, spec.n_obs_steps, *s.shape))).astype(s.dtype)
           for k, s in spec.obs.items()}
    if "instruction" in obs:
        obs["instruction"] = spec.placeholder_observations(batch)["instruction"]
    return obs


def _artifact(policy, tmp_path, cache=None, kind="ddpm", mode="if"):
    out = tmp_path / f"art-{mode}"
    m = export_policy(policy, out, cache=cache, sampler=kind, steps=K, step_mode=mode)
    for g in m.graphs.values():
        onnx.checker.check_model(onnx.load(str(out / g.file)), full_check=True)
        for io in g.inputs + g.outputs:  # numbers, and "B" for the batch only (not the tracer's names)
            assert all(d == "B" or type(d) is int for d in io["shape"]), (g.file, io)
    assert not policy.training  # tracing never leaves the policy in training mode
    return out


@pytest.mark.parametrize("cache", [None, "uniform:3", "bac"])
def test_step_graph_matches_torch_step_and_update(policy, schedule, tmp_path, cache):
    cache = schedule if cache == "bac" else cache
    art = _artifact(policy, tmp_path, cache)
    backend = OrtBackend(art, threads=1)
    smp = policy.sampler("ddpm", K)
    plan, compute = plan_table(policy, smp, cache)
    n, B = len(policy.denoiser.blocks), 3
    obs = _obs(backend.spec, B)
    obs_kv = backend.encoder.run(None, obs)[0]
    with torch.no_grad():
        ctx = policy.denoiser.prepare_chunk(policy.encode({k: torch.as_tensor(v) for k, v in obs.items()}),
                                            smp.timesteps)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(B, 16, 2, generator=g), torch.randn(B, 16, 2, generator=g)
    deltas = torch.randn(n, B, 16, 32, generator=g) * 0.1
    for k in range(K):
        store = DeltaStore(n)
        for i in range(n):
            store.put(i, 0, deltas[i])
        with torch.no_grad():
            want = smp.update(k, x, policy.denoiser.step(x, k, ctx, None if plan is None else plan[k], store),
                              noise)
        got, d_out = backend._steps[0].run(None, {"x": x.numpy(), "k": np.array(k), "obs_kv": obs_kv,
                                                  "deltas": deltas.numpy(), "noise": noise.numpy()})
        assert np.abs(got - want.numpy()).max() < 1e-4, k
        for i in range(n):  # computed blocks hand out their new delta, reused ones the stored one
            assert np.abs(d_out[i] - store.last[i].numpy()).max() < 1e-4
            assert compute[k, i] or np.array_equal(d_out[i], deltas[i].numpy())


@pytest.mark.parametrize("kind,cache,mode", [("ddpm", None, "if"), ("ddpm", "uniform:3", "if"),
                                             ("ddim", "uniform:2", "if"), ("flow", "uniform:3", "if"),
                                             ("ddpm", "bac", "patterns")])
def test_chunk_matches_torch_with_the_same_noise_at_any_batch(policy, schedule, tmp_path, kind, cache, mode):
    cache = schedule if cache == "bac" else cache  # calibrated for DDPM
    if kind == "flow":  # a flow sampler reads a velocity: the same tiny policy trained for flow matching
        policy = tiny_policy(n_layers=2, width=32, obs_dim=8, action_dim=2, objective="flow")
    art = _artifact(policy, tmp_path, cache, kind, mode)
    backend = load_backend(str(art))
    smp = policy.sampler(kind, K)
    plan, _ = plan_table(policy, smp, cache)
    for batch in (1, 3):
        obs = _obs(backend.spec, batch, seed=batch)
        x, noise = policy.initial_noise(batch, smp, torch.Generator().manual_seed(batch))
        x, noise = x.numpy(), None if noise is None else noise.numpy()
        got = backend.sample(obs, x, noise)
        ref = torch_reference(policy, obs, smp, plan, x, noise)
        assert np.abs(got - ref).max() < 1e-3
        want = policy.normalizer.unnormalize("action", torch.as_tensor(ref))[:, 1:1 + policy.cfg.n_action_steps]
        assert np.abs(backend.decode(got)["action"] - want.numpy()).max() < 1e-3
        assert backend.predict(obs, seed=0).shape == (batch, policy.cfg.n_action_steps, 2)
    assert np.array_equal(backend.predict(obs, seed=5), backend.predict(obs, seed=5))
    what = backend.describe()
    assert what["backend"] == "ort" and what["steps"] == K and what["step_mode"] == mode
    assert (what["cache"] is None) == (cache is None)
    if plan is not None:  # the plan table itself, as the torch backend describes it (dashboards draw it)
        assert what["cache"]["plan"] == [[int(op) for op in row] for row in plan]
        assert what["cache"]["ops"] == ["compute", "reuse", "forecast", "gate"]  # the codes named, ops[code]
        assert what["cache"]["block_names"] == [b.name for b in policy.cache_blocks]


@pytest.mark.parametrize("family", ["dp-t", "vla"])
def test_image_policy_exports(tmp_path, family):
    """DP-T and the VLA (prefix transformer over image, state and instruction tokens, flow expert)."""
    policy = tiny_policy(n_layers=1, width=32, image=True) if family == "dp-t" else tiny_vla(image=True)
    kind = "ddim" if family == "dp-t" else "flow"
    art = _artifact(policy, tmp_path, "uniform:2", kind=kind)
    backend = OrtBackend(art)
    smp = policy.sampler(kind, K)
    plan, _ = plan_table(policy, smp, "uniform:2")
    obs = _obs(backend.spec, 2)
    x = np.random.default_rng(0).standard_normal((2, 16, 3), dtype=np.float32)
    assert np.abs(backend.sample(obs, x) - torch_reference(policy, obs, smp, plan, x, None)).max() < 1e-3


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.__setitem__("normalizer", None), r"normalizer must be a JSON object, got null"),
    (lambda m: m["normalizer"]["action"].__setitem__("scale", [1.0] * 7), r"normalizer.action.scale must be \d finite"),
    (lambda m: m["normalizer"]["action"].__setitem__("offset", "abc"), r"normalizer.action.offset must be \d finite"),
    (lambda m: m["spec"]["obs"]["state"].__setitem__("shape", [40]), r"spec.obs.state \[40\] does not match the encoder"),
    (lambda m: m.__setitem__("comment", "mine"), r"unknown field\(s\) comment"),
    (lambda m: m.pop("sampler"), r"missing field sampler"),
    (lambda m: m["graphs"]["step"].pop("sha256"), r"missing field graphs.step.sha256"),
    (lambda m: m["cache"].__setitem__("table", 5), r"cache.table must be 8 rows of \d+ entries"),
    (lambda m: m.__setitem__("pattern_of_step", {}), r"pattern_of_step must be a JSON array, got object"),
    (lambda m: m.__setitem__("seal", 0), r"seal must be a JSON string, got number"),
    (lambda m: m["graphs"]["step"].__setitem__("file", ["step.onnx"]), r"graphs.step.file must be a JSON string"),
], ids=["normalizer-null", "scale-length", "offset-text", "obs-shape", "unknown", "missing", "graph-missing",
        "table", "pattern-type", "seal-number", "file-list"])
def test_a_hand_edited_manifest_is_refused_at_load(policy, tmp_path, edit, named):
    """Not at the first chunk (a broadcast error) or as ONNX Runtime's invalid dimensions."""
    art = _artifact(policy, tmp_path)
    doc = json.loads((art / "manifest.json").read_text())
    edit(doc)
    (art / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=named):
        load_backend(str(art))


@pytest.mark.parametrize("edit", [
    lambda m: m["normalizer"]["action"].__setitem__("scale", [10.0] * len(m["normalizer"]["action"]["scale"])),
    lambda m: m["spec"].__setitem__("obs_stride", m["spec"]["obs_stride"] + 1),
    lambda m: m["cache"].__setitem__("table", [[1] * len(row) for row in m["cache"]["table"]]),
    lambda m: m["graphs"]["step"].__setitem__("sha256", "sha256:" + "0" * 64),
    lambda m: m["spec"].__setitem__("n_action_steps", m["spec"]["n_action_steps"] - 1),
], ids=["action-scale", "obs-stride", "cache-table", "graph-hash", "n-action-steps"])
def test_a_well_formed_edit_of_the_manifest_is_refused_by_its_seal(policy, tmp_path, edit):
    """Edits that pass every field check ran before: 10x smaller actions, a history at another
    stride, a plan shown that is not the one the graph runs, a graph swapped with its hash."""
    art = _artifact(policy, tmp_path, "uniform:3")
    text = (art / "manifest.json").read_text()
    load_backend(str(art))  # sealed at export: the file as written is accepted
    doc = json.loads(text)
    edit(doc)
    (art / "manifest.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(ExportError, match="edited after export .*export again"):
        load_backend(str(art))
    (art / "manifest.json").write_text(json.dumps(json.loads(text)))  # reformatted only: still the same content
    load_backend(str(art))
    del doc["seal"]  # the edit with the seal taken away: that turned the check off, with a warning only
    (art / "manifest.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(ExportError, match="its seal is missing, so edits to it cannot be ruled out"):
        load_backend(str(art))
    doc["version"] = 1  # and the version lowered to the one from before seals: so did that
    (art / "manifest.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(ExportError, match="its seal is missing, so edits to it cannot be ruled out"):
        load_backend(str(art))


def test_an_artifact_takes_its_schedule_from_any_path_with_the_same_content(policy, schedule, tmp_path,
                                                                           monkeypatch):
    """Exported with /abs/bac.json, served with ./bac.json or a copy on another machine: the file's
    content (sha256 in the manifest) decides, not its path."""
    import shutil

    art = _artifact(policy, tmp_path, schedule)
    monkeypatch.chdir(tmp_path)
    shutil.copy(schedule, tmp_path / "copy.json")
    assert load_backend(str(art), cache="copy.json").K == K
    again = json.loads((tmp_path / "copy.json").read_text())  # calibrated again, identically: only its stamps differ
    (tmp_path / "again.json").write_text(json.dumps(again | {"created": "2027-01-01T00:00:00", "code_version": "x"},
                                                    indent=3))
    assert load_backend(str(art), cache="again.json").K == K
    (tmp_path / "noted.json").write_text(json.dumps(again | {"note": "mine"}))  # the same plan, a key added by hand:
    with pytest.raises(CacheError, match="unknown field 'note', not one `polcache calibrate` writes"):  # said so,
        load_backend(str(art), cache="noted.json")  # not refused as another schedule than the exported one
    calibration = load_schedule(schedule).calibration  # another schedule at the same name: S=4
    save_schedule(build_schedule(calibration, "bac", 4, 2, True, model_hash(policy), "ddpm", "error-bound"),
                  tmp_path / "copy.json")
    with pytest.raises(ExportError, match="exported with --cache .*bac.json, not copy.json"):
        load_backend(str(art), cache="copy.json")
    with pytest.raises(ExportError, match="not uniform:3"):
        load_backend(str(art), cache="uniform:3")


def test_bad_artifacts_and_requests_are_refused(policy, schedule, checkpoint, tmp_path, capsys):
    art = _artifact(policy, tmp_path, "uniform:3")
    with pytest.raises(ExportError, match=r"exported with --cache uniform:3, not uniform:2"):
        load_backend(str(art), cache="uniform:2")
    with pytest.raises(ExportError, match=r"not threshold:0.2: .* cannot be exported: run it on the checkpoint, "
                                          r"--backend torch"):  # it said to export again, which export refuses
        load_backend(str(art), cache="threshold:0.2")
    with pytest.raises(ExportError, match="schedule file not found: .*gone.json"):  # it read as another plan
        load_backend(str(art), cache=str(tmp_path / "gone.json"))
    with pytest.raises(ExportError, match="K=8 steps, not 10"):
        load_backend(str(art), steps=10)
    with pytest.raises(ExportError, match="sampler ddpm, not ddim"):
        load_backend(str(art), sampler="ddim")
    assert load_backend(str(art), cache="uniform:3", sampler="ddpm", steps=K).K == K
    with pytest.raises(ExportError, match="GATE"):
        export_policy(policy, tmp_path / "gate", cache="threshold:0.1", sampler="ddpm", steps=K)
    with pytest.raises(ExportError, match="forecast"):
        export_policy(policy, tmp_path / "fc", cache="uniform:3+forecast", sampler="ddpm", steps=K)
    assert not (tmp_path / "gate").exists()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an exported policy .*refusing to overwrite it"):
        export_policy(policy, precious, sampler="ddpm", steps=K)
    assert (precious / "notes.txt").read_text() == "mine"
    (precious / "manifest.json").write_text('{"name": "my web app"}')  # a manifest, but not ours
    with pytest.raises(ExportError, match="exists and is not an exported policy .*refusing to overwrite it"):
        export_policy(policy, precious, sampler="ddpm", steps=K)
    assert (precious / "notes.txt").read_text() == "mine"
    assert export_policy(policy, art, cache="uniform:2", sampler="ddpm", steps=K).cache["spec"] == "uniform:2"
    assert export_policy(policy, art, cache="uniform:3", sampler="ddpm", steps=K).cache["spec"] == "uniform:3"
    with pytest.raises(ExportError, match="is a checkpoint, not an exported policy"):
        load_backend(checkpoint, backend="ort")
    with pytest.raises(ExportError, match="--backend ort"):
        load_backend(str(art), backend="torch")
    if not HAVE_TRT:
        with pytest.raises(BackendUnavailableError, match="TensorRT backend: the tensorrt Python package is not"):
            load_backend(str(art), backend="trt")

    step = art / "step.onnx"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="step.onnx: sha256 .* does not match the manifest"):
        load_backend(str(art))
    assert "does not match the manifest" in _err(capsys, ["eval", "--checkpoint", str(art), "--backend", "ort",
                                                          "--episodes", "1"])
    manifest = art / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(ExportError, match="not valid JSON"):
        load_backend(str(art))
    doc = art / "manifest.json"
    doc.write_text(json.dumps({"format": "polcache-export", "version": 1, "graphs": {}}))
    with pytest.raises(ExportError, match="malformed manifest"):
        load_backend(str(art))
    doc.unlink()  # not a checkpoint missing config.yaml etc., but an export missing its manifest
    with pytest.raises(ExportError, match="holds ONNX graphs but no manifest.json"):
        load_backend(str(art))

    base = ["export", "--checkpoint", checkpoint, "--format", "onnx", "--sampler", "ddpm", "--steps", str(K)]
    assert "GATE" in _err(capsys, [*base, "--cache", "threshold:0.1", "--out", str(tmp_path / "g")])
    if not HAVE_TRT:
        missing = "TensorRT backend: the tensorrt Python package is not installed"
        assert missing in _err(capsys, ["eval", "--checkpoint", checkpoint, "--backend", "trt", "--episodes", "1"])
        err = _err(capsys, ["serve", "--checkpoint", checkpoint, "--backend", "trt"])
        assert missing in err and "it runs an artifact from `polcache export`" in err  # ort would be refused too


def test_an_export_of_a_multi_task_checkpoint_names_its_tasks_where_a_task_is_asked_for(checkpoint, tmp_path, capsys):
    """`eval` of an exported multi-task VLA without --task said only "pass --task": the checkpoint's
    refusal lists its tasks (meta.json), the export's did not (no meta.json)."""
    import shutil

    from polcache.policy.checkpoint import no_task_hint

    multi = tmp_path / "multi"
    shutil.copytree(checkpoint, multi)
    meta = json.loads((multi / "meta.json").read_text())
    (multi / "meta.json").write_text(json.dumps({**meta, "tasks": ["push-v3", "reach-v3"]}))
    assert main(["export", "--checkpoint", str(multi), "--out", str(tmp_path / "art"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["model"]["tasks"] == ["push-v3", "reach-v3"]
    assert no_task_hint(tmp_path / "art") == no_task_hint(multi) == " (it was trained on push-v3, reach-v3)"
    assert no_task_hint(checkpoint) == ""


def test_export_cli_then_eval_with_the_ort_backend(checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    argv = ["export", "--checkpoint", checkpoint, "--cache", "uniform:2", "--sampler", "ddim", "--steps", str(K),
            "--format", "onnx", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "verified: |ONNX Runtime - torch| = " in printed and "on the median of 8 probe" in printed
    assert "step mode if" in printed
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["cache"]["spec"] == "uniform:2" and doc["sampler"]["kind"] == "ddim" and doc["model"]["hash"]
    assert doc["graphs"]["step"]["inputs"][0] == {"name": "x", "shape": ["B", 16, 2], "dtype": "float32"}
    err = _err(capsys, ["eval", "--checkpoint", str(out), "--backend", "ort", "--steps", "4", "--episodes", "1"])
    assert "K=8 steps, not 4" in err
    err = _err(capsys, ["eval", "--checkpoint", str(out), "--precision", "bf16", "--episodes", "1"])
    assert "--precision bf16: the ONNX Runtime backend runs the exported fp32 graphs" in err
    err = _err(capsys, ["export", "--checkpoint", str(out), "--out", str(tmp_path / "again")])
    assert err.endswith("it is an exported policy, which eval and serve run (--backend ort); here, pass the "
                        "checkpoint it was exported from") and not (tmp_path / "again").exists()
    json_out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out), "--backend", "ort", "--episodes", "1", "--max-steps", "12",
                 "--no-progress", "--json", str(json_out)]) == 0
    result = json.loads(json_out.read_text())
    assert result["extra"]["backend"] == "ort" and result["extra"]["cache"]["method"] == "uniform"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--cache", "uniform:2", "--episodes", "1", "--max-steps", "12",
                 "--no-progress"]) == 0  # the speedup eval --cache reports on a checkpoint: said to be missing
    assert "cache uniform:2: no speedup timed: the artifact holds only the cached graphs" in capsys.readouterr().out


def test_export_refuses_an_artifact_beyond_the_parity_tolerance(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "art"
    argv = ["export", "--checkpoint", checkpoint, "--sampler", "ddpm", "--steps", str(K), "--out", str(out)]
    assert main(argv) == 0  # the default tolerance passes an honest export
    kept = (out / "manifest.json").read_text()
    sample = OrtBackend.sample
    # graphs that disagree with torch by 0.2 everywhere, as a wrong op or plan table would
    monkeypatch.setattr(OrtBackend, "sample", lambda self, obs, x, noise=None: sample(self, obs, x, noise) + 0.2)
    err = _err(capsys, [*argv, "--cache", "uniform:3"])
    assert "the exported policy (ONNX Runtime) disagrees with torch by 0.2 on the median of 8 probe" in err
    assert f"above the tolerance 0.05: nothing was written to {out}" in err
    assert (out / "manifest.json").read_text() == kept  # the earlier artifact stays, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # and no temp directory is left
    assert main([*argv, "--cache", "uniform:3", "--tolerance", "0.5"]) == 0  # raised knowingly
    assert "(normalised actions, same noise; tolerance 0.5)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["cache"]["spec"] == "uniform:3"


def test_export_policy_runs_the_clis_parity_check_unless_told_not_to(policy, tmp_path, monkeypatch):
    import re

    out, deviation = tmp_path / "art", {}
    policy.train()  # as fresh from training: checked with dropout off, and left in training mode
    try:
        export_policy(policy, out, sampler="ddpm", steps=K, deviation=deviation)
        assert policy.training
    finally:
        policy.eval()
    assert deviation["probes"] == 8 and deviation["median_abs"] <= 0.05
    kept = (out / "manifest.json").read_text()
    sample = OrtBackend.sample
    monkeypatch.setattr(OrtBackend, "sample", lambda self, obs, x, noise=None: sample(self, obs, x, noise) + 0.2)
    with pytest.raises(ExportError, match=re.escape(f"above the tolerance 0.05: nothing was written to {out}")):
        export_policy(policy, out, cache="uniform:3", sampler="ddpm", steps=K)
    assert (out / "manifest.json").read_text() == kept
    assert export_policy(policy, out, cache="uniform:3", sampler="ddpm", steps=K, tolerance=None).cache["spec"] == \
        "uniform:3"  # skipped when asked


def test_blocks_the_plan_computes_together_share_one_if(policy, tmp_path):
    from polcache.export.onnx_graphs import block_groups

    table = np.array([[1, 1, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]], dtype=bool)
    assert block_groups(table) == [[0, 1], [2], [3]]
    art = _artifact(policy, tmp_path, "uniform:3")
    ifs = [node for node in onnx.load(str(art / "step.onnx")).graph.node if node.op_type == "If"]
    assert len(ifs) == 1 and len(ifs[0].output) == len(policy.denoiser.blocks)


def test_ort_and_torch_backends_sample_the_same_chunk_for_the_same_seed(policy, tmp_path):
    """With torch installed the exported backend draws the torch backend's noise, so the two
    backends act alike on the same evaluation seeds (same episodes, not just the same statistics)."""
    from polcache.policy.backend import TorchBackend

    art = _artifact(policy, tmp_path, cache="uniform:3")
    ort, torch_b = OrtBackend(art), TorchBackend(policy, "ddpm", K, plan_table(policy, policy.sampler("ddpm", K),
                                                                               "uniform:3")[0])
    obs = _obs(policy.spec, 1, seed=4)
    for seed in (0, 7):
        np.testing.assert_allclose(ort.predict(obs, seed=seed), torch_b.predict(obs, seed=seed), atol=1e-5)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 + 5, 1.5, "3", True, np.float32(2.0)])
def test_ort_and_torch_backends_refuse_the_same_bad_seeds_alike(policy, tmp_path, seed):
    """ONNX Runtime truncated 1.5 to 1 and took -1, "3" and True (torch refused them), and 2**64+5 came
    back as a raw ValueError: one check now refuses them on both, and batched, only in that row."""
    from polcache.errors import ObservationError
    from polcache.policy.backend import TorchBackend
    from polcache.policy.batching import SessionRequest

    ort, torch_b = OrtBackend(_artifact(policy, tmp_path)), TorchBackend(policy, "ddpm", K)
    obs, seqs = _obs(policy.spec, 1, seed=4), list(range(policy.spec.n_obs_steps))
    for backend in (ort, torch_b):
        with pytest.raises(ObservationError, match=r"^seed: expected an integer in 0\.\.2\^63-1 or None, got "):
            backend.predict(obs, seed=seed)
        good, bad = backend.predict_sessions([SessionRequest(backend.session(), obs, seqs, 3),
                                              SessionRequest(backend.session(), obs, seqs, seed)])
        assert isinstance(bad, ObservationError)
        np.testing.assert_allclose(good, backend.predict(obs, seed=3), atol=1e-5)


def test_ort_and_torch_backends_refuse_the_same_absurd_state_alike(policy, tmp_path):
    """1e20 overflowed to NaN on torch but gave a chunk on ONNX Runtime: the artifact carries the
    policy's normaliser in its spec, and both refuse such a state before inference, in the same words."""
    from polcache.errors import ObservationError
    from polcache.policy.backend import TorchBackend

    ort, torch_b = OrtBackend(_artifact(policy, tmp_path)), TorchBackend(policy, "ddpm", K)
    assert ort.spec.obs_normalizer == policy.spec.obs_normalizer and "state" in ort.spec.obs_normalizer
    for value in (1e3, 1e20):
        obs = _obs(policy.spec, 1, seed=4)
        obs["state"][0, -1, 3] = value
        refusals = []
        for backend in (ort, torch_b):
            with pytest.raises(ObservationError, match=r"observation 'state'\[3\] is .* a sensor fault") as info:
                backend.predict(obs, seed=0)
            refusals.append(str(info.value))
        assert refusals[0] == refusals[1]


def test_an_artifact_loads_and_predicts_without_torch(policy, tmp_path):
    """A robot computer with ONNX Runtime and numpy only: load_backend must not import torch."""
    import subprocess
    import sys

    art = _artifact(policy, tmp_path)
    script = ("import sys; sys.modules['torch'] = None\n"
              "import numpy as np\nfrom polcache.policy import load_backend\n"
              f"b = load_backend({str(art)!r})\n"
              "obs = {k: np.zeros((1, b.spec.n_obs_steps, *s.shape), s.dtype) for k, s in b.spec.obs.items()}\n"
              "print(type(b).__name__, *b.predict(obs, seed=0).shape)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    want = ["OrtBackend", "1", str(policy.spec.n_action_steps), str(policy.spec.action_dim)]
    assert out.returncode == 0 and out.stdout.split() == want, out.stderr


def test_robots_share_one_graph_run_each_with_its_own_chunk(policy, schedule, tmp_path):
    """predict_sessions on an artifact: rows run together (at most max_batch per run), each equal to
    its own session's predict with its seed; a bad row and a real-time-chunking row fail alone."""
    from polcache.policy.batching import SessionRequest, batching_blocker
    from polcache.policy.spec import CommittedActions

    b = OrtBackend(_artifact(policy, tmp_path, cache=schedule))
    assert batching_blocker(b) is None
    obs = [_obs(policy.spec, 1, seed=s) for s in range(4)]
    seqs = list(range(policy.spec.n_obs_steps))
    bad = {k: v[:, :1] for k, v in obs[0].items()}  # one frame short
    requests = [SessionRequest(b.session(), obs[0], seqs, 3), SessionRequest(b.session(), bad, seqs, 4),
                SessionRequest(b.session(), obs[1], seqs, 5),
                SessionRequest(b.session(), obs[2], seqs, 6, committed=CommittedActions(np.zeros((2, 2)), 1)),
                SessionRequest(b.session(), obs[3], seqs, 7)]
    calls = []
    sample = b.sample
    b.sample = lambda o, x, noise=None: calls.append(len(x)) or sample(o, x, noise)
    for max_batch, runs in ((None, [3]), (2, [2, 1])):
        b.max_batch, calls[:] = max_batch, []
        got = b.predict_sessions(requests)
        assert calls == runs
        assert "expected shape" in str(got[1]) and "real-time chunking" in str(got[3])
        for i, o, seed in ((0, obs[0], 3), (2, obs[1], 5), (4, obs[3], 7)):
            np.testing.assert_allclose(got[i], b.predict(o, seed=seed), atol=1e-5)
    assert not np.allclose(got[0], got[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a CPU policy stays on the CPU anyway")
def test_exporting_leaves_the_callers_policy_on_its_device(tmp_path):
    """export_policy moved the caller's policy to the CPU for good (a module's .cpu() is in place)."""
    policy = tiny_policy(n_layers=2, width=32, obs_dim=8, action_dim=2).cuda().train()
    export_policy(policy, tmp_path / "art")
    assert next(policy.parameters()).device.type == "cuda" and policy.training
