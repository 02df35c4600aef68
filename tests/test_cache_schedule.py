"""Calibration statistics, schedule files (round trip, mismatch errors) and the --cache grammar."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.cache import CacheError, plan_summary, resolve_plan, solve_acs
from polcache.cache.calibrate import RecordingStore, calibrate
from polcache.cache.schedule import (build_schedule, check_fits, load_schedule, model_hash,
                                     save_schedule)
from polcache.policy.executor import COMPUTE, REUSE

K = 8


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(n_layers=2, width=32)


@pytest.fixture(scope="module")
def sampler(policy):
    return policy.sampler("ddim", K)


@pytest.fixture(scope="module")
def calibration(policy, sampler):
    obs = {"state": torch.randn(5, policy.cfg.n_obs_steps, 5, generator=torch.Generator().manual_seed(0))}
    return calibrate(policy, sampler, obs, "test observations", batch_size=2)


@pytest.fixture
def schedule_file(tmp_path, policy, calibration):
    sched = build_schedule(calibration, "bac", 3, 2, True, model_hash(policy), "ddim")
    return save_schedule(sched, tmp_path / "sched.json"), sched


def test_calibration_shapes_and_invariants(policy, calibration):
    n = len(policy.denoiser.blocks)
    assert calibration.similarity.shape == (n, K, K) and calibration.samples == 5
    assert calibration.block_names == policy.denoiser.block_names
    assert np.allclose(np.diagonal(calibration.similarity, axis1=1, axis2=2), 1.0, atol=1e-5)
    assert np.allclose(calibration.similarity, calibration.similarity.transpose(0, 2, 1), atol=1e-6)
    assert (calibration.l1 > 0).all()
    assert calibration.distance.shape == (n, K, K) and calibration.sensitivity.shape == (n, K)
    assert np.allclose(np.diagonal(calibration.distance, axis1=1, axis2=2), 0.0, atol=1e-6)
    assert (calibration.sensitivity >= 0).all() and calibration.sensitivity[:, -1].min() > 0


def test_calibration_matches_direct_computation(policy, sampler):
    obs = {"state": torch.randn(3, policy.cfg.n_obs_steps, 5, generator=torch.Generator().manual_seed(1))}
    calib = calibrate(policy, sampler, obs, batch_size=3, seed=7)
    store = RecordingStore(len(policy.denoiser.blocks), K)
    policy.sample(policy.encode(obs), sampler, None, torch.Generator().manual_seed(7), store)
    for b in (0, 4):
        x = torch.stack(store.trace[b], 1).double()  # (3, K, D)
        cos = np.array([[[torch.nn.functional.cosine_similarity(x[s, a], x[s, t], dim=0).item() for t in range(K)]
                         for a in range(K)] for s in range(3)]).mean(0)
        l1 = np.mean([(x[s, a] - x[s, t]).abs().mean().item() for s in range(3) for a in range(K) for t in range(K)
                      if a != t])
        dist = np.array([[[((x[s, a] - x[s, t]) ** 2).mean().item() for t in range(K)] for a in range(K)]
                         for s in range(3)]).mean(0)
        np.testing.assert_allclose(calib.similarity[b], cos, atol=1e-5)
        np.testing.assert_allclose(calib.distance[b], dist, rtol=1e-4, atol=1e-9)
        assert calib.l1[b] == pytest.approx(l1, rel=1e-4)


def test_build_schedule_methods(policy, calibration):
    h = model_hash(policy)
    blockwise = build_schedule(calibration, "blockwise", 3, 0, False, h, "ddim")
    for i, name in enumerate(calibration.block_names):
        assert blockwise.update_steps[name] == solve_acs(calibration.similarity[i], 3)
    unified = build_schedule(calibration, "unified", 3, 0, True, h, "ddim")
    assert len({tuple(s) for s in unified.update_steps.values()}) == 1
    assert list(unified.update_steps.values())[0] == solve_acs(calibration.similarity.mean(0), 3, force_last=True)
    bac = build_schedule(calibration, "bac", 3, 2, False, h, "ddim")
    assert len(bac.bu_selected) == 2 and bac.block_evals >= blockwise.block_evals
    with pytest.raises(CacheError, match="method"):
        build_schedule(calibration, "fancy", 3, 0, False, h, "ddim")


def test_schedule_file_round_trip(schedule_file, policy, sampler):
    path, sched = schedule_file
    back = load_schedule(path)
    assert back.update_steps == sched.update_steps and back.bu_selected == sched.bu_selected
    assert (back.method, back.model_hash, back.sampler, back.steps, back.budget, back.bu_blocks, back.force_last) == \
           (sched.method, sched.model_hash, sched.sampler, sched.steps, sched.budget, sched.bu_blocks, True)
    np.testing.assert_allclose(back.calibration.similarity, sched.calibration.similarity, atol=1e-6)
    for key in ("distance", "sensitivity"):  # stored to 5 significant digits
        np.testing.assert_allclose(getattr(back.calibration, key), getattr(sched.calibration, key), rtol=1e-4)
    assert back.objective == sched.objective == "similarity"
    assert back.calibration.source == "test observations" and back.calibration.samples == 5
    # blocks are stored by layer and kind as the model's Blocks say (not re-parsed from names)
    assert back.calibration.layer_kind == [(b.layer, b.kind) for b in policy.denoiser.blocks]
    doc = json.loads(path.read_text())
    assert doc["model"]["kinds"][:3] == ["sa", "ca", "ffn"] and doc["model"]["layers"][:3] == [0, 0, 0]
    check_fits(back, policy, sampler)
    plan = back.to_plan()
    for k in range(K):
        assert plan[k] == tuple(COMPUTE if k in s else REUSE for s in back.update_steps.values())


def test_schedule_for_another_model_or_k_is_an_error(schedule_file, policy):
    path, _ = schedule_file
    sched = load_schedule(path)
    with pytest.raises(CacheError, match="calibrated for model"):
        check_fits(sched, tiny_policy(n_layers=2, width=32, seed=1), policy.sampler("ddim", K))
    with pytest.raises(CacheError, match="K=8.*K=10"):
        check_fits(sched, policy, policy.sampler("ddim", 10))
    with pytest.raises(CacheError, match="ddpm"):
        check_fits(sched, policy, policy.sampler("ddpm", K))
    with pytest.raises(CacheError, match="calibrated for model"):
        resolve_plan(str(path), tiny_policy(n_layers=2, width=32, seed=1), policy.sampler("ddim", K))


def test_version_1_files_read_as_the_similarity_objective(tmp_path, schedule_file, policy, sampler):
    path, sched = schedule_file
    doc = json.loads(path.read_text())
    doc["version"] = 1
    del doc["objective"], doc["calibration"]["distance"], doc["calibration"]["sensitivity"]
    del doc["model"]["layers"], doc["model"]["kinds"]  # older files: layers and kinds come from the names
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    old = load_schedule(tmp_path / "v1.json")
    assert old.objective == "similarity" and old.calibration.sensitivity is None
    assert old.calibration.layer_kind == sched.calibration.layer_kind
    assert old.to_plan().ops == sched.to_plan().ops
    with pytest.raises(CacheError, match="recalibrate"):
        resolve_plan(f"bac:3:2:error-bound@{tmp_path / 'v1.json'}", policy, sampler)


def test_bad_schedule_files_are_clear_errors(tmp_path, schedule_file):
    path, _ = schedule_file
    with pytest.raises(CacheError, match="not found"):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:100])
    with pytest.raises(CacheError, match="not valid JSON"):
        load_schedule(tmp_path / "cut.json")
    doc = json.loads(path.read_text())
    for change, match in (({"format": "x"}, "not a polcache"), ({"version": 99}, "version 99"),
                          ({"update_steps": {}}, "malformed")):
        (tmp_path / "bad.json").write_text(json.dumps(doc | change))
        with pytest.raises(CacheError, match=match):
            load_schedule(tmp_path / "bad.json")
    steps = doc["update_steps"]
    block = next(iter(steps))
    hand_edits = (({"update_steps": steps | {block: ["0", "1"]}}, f"update_steps.{block} must be an integer, got '0'"),
                  ({"update_steps": steps | {block: [0, True]}}, "must be an integer, got True"),
                  ({"update_steps": steps | {block: [0.0, 1.7]}}, "must be an integer, got 0.0"),
                  ({"update_steps": steps | {"layers.99.sa": [0]}}, "unlike model.blocks"),
                  ({"budget": 999}, "budget 999 must be in 1..K"),
                  ({"method": "frobnicate"}, "unknown method 'frobnicate'"),
                  ({"update_steps": {k: v for k, v in steps.items() if k != block}}, rf"\['{block}'\] unlike model"),
                  ({"update_steps": list(steps.values())}, r"\(update_steps must be a JSON object\)"),
                  ({"calibration": 5}, r"\(calibration must be a JSON object\)"),
                  ({"model": {}}, r"\(missing entry 'blocks'\)"),
                  ({"calibration": doc["calibration"] | {"similarity": [[[float("nan")]]]}},
                   r"calibration.similarity must hold one row of finite scores per block"),
                  ({"calibration": doc["calibration"] | {"similarity": "x"}},  # was "could not convert string"
                   r"calibration.similarity must hold one row of finite scores per block"),
                  ({"calibration": doc["calibration"] | {"l1": {}}}, r"calibration.l1 lacks block"),
                  ({"sampler": doc["sampler"] | {"kind": "euler"}}, r"unknown sampler.kind 'euler' \(expected one of"),
                  ({"block_evaluations": 12}, r"block_evaluations 12 disagrees with update_steps \(\d+\): edited"))
    for change, match in hand_edits:  # refused in the file's words, not coerced into a plan nobody wrote
        (tmp_path / "bad.json").write_text(json.dumps(doc | change))
        with pytest.raises(CacheError, match=match):
            load_schedule(tmp_path / "bad.json")
    doc["update_steps"]["layers.0.sa"] = [1, 3]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="start at 0"):
        load_schedule(tmp_path / "bad.json")


def test_damaged_schedule_files_name_the_field_in_one_short_line(tmp_path, schedule_file):
    path, _ = schedule_file
    bad = tmp_path / "bad.json"
    bad.write_text("[" * 100000 + "]" * 100000)  # a RecursionError traceback before
    with pytest.raises(CacheError, match="not valid JSON"):
        load_schedule(bad)
    doc = json.loads(path.read_text())
    block = next(iter(doc["update_steps"]))
    for change, match in (
            ({"sampler": doc["sampler"] | {"steps": 10**400}},
             r"sampler.steps 10000000000000000000\.\.\.00000000 \(401 characters\) disagrees with the "
             r"calibration's 8 steps"),
            ({"budget": 10**400}, r"budget .* \(401 characters\)"),
            ({"extra": 1}, "unknown field 'extra', not one `polcache calibrate` writes"),
            ({"model": doc["model"] | {"hsah": "x"}}, "unknown field 'model.hsah'"),
            ({"force_last": "false"}, "force_last must be true or false, got 'false'"),
            ({"force_last": 0}, "force_last must be true or false, got 0"),
            ({"bu_selected": "layers.0.sa"}, "bu_selected must be a list of block names"),
            ({"bu_selected": []}, "bu_selected must name 2 distinct blocks"),
            ({"update_steps": {n: [0] for n in doc["update_steps"]}},
             rf"update_steps.{block} has 1 update steps, expected 4 \(budget 3 \+ the forced last step 7\)"),
            ({"update_steps": {n: [0, 1, 2, 3] for n in doc["update_steps"]}},
             rf"update_steps.{block} lacks the last step 7, which force_last recomputes"),

            ({"force_last": False, "update_steps": {n: [0] for n in doc["update_steps"]}},
             rf"update_steps.{block} has 1 update steps, expected 3 \(budget 3\)"),
            ({"method": "blockwise"}, "a blockwise schedule widens no blocks"),
            ({"model": doc["model"] | {"layers": doc["model"]["layers"][:-1]}},  # was zip()'s own words
             r"model.layers must list one entry per block of model.blocks \(6\)")):
        bad.write_text(json.dumps(doc | change))
        with pytest.raises(CacheError, match=match) as exc:
            load_schedule(bad)
        assert len(str(exc.value)) < 300, str(exc.value)


def test_a_block_widened_by_bubbling_union_keeps_the_updates_of_the_ffn_blocks_after_it(tmp_path, calibration):
    import dataclasses

    first = dataclasses.replace(calibration, l1=np.arange(len(calibration.l1), 0, -1.0))  # widens layers.0.sa
    sched = build_schedule(first, "bac", 3, 1, True, "sha256:x", "ddim")
    assert sched.bu_selected == ["layers.0.sa"]
    widened = sched.update_steps["layers.0.sa"]
    other = [0] + [k for k in range(1, K - 1) if k not in widened][:2] + [K - 1]  # same count, not a subset
    sched.update_steps["layers.1.ffn"] = other
    with pytest.raises(CacheError, match=r"update_steps.layers.0.sa \(widened by Bubbling Union\) lacks updates "
                                         r"of layers.1.ffn \(an FFN block at layer 1 >= 0\)"):
        load_schedule(save_schedule(sched, tmp_path / "s.json"))


@pytest.mark.parametrize("method", ["bac", "blockwise", "unified"])
def test_every_schedule_build_schedule_writes_loads(tmp_path, calibration, method):
    """The update-step checks refuse hand edits only: every budget, force_last and Bubbling Union size."""
    n = len(calibration.block_names)
    for budget in range(1, K + 1):
        for force_last in (True, False):
            for bu in (range(n + 1) if method == "bac" else [0]):
                sched = build_schedule(calibration, method, budget, bu, force_last, "sha256:x", "ddim")
                back = load_schedule(save_schedule(sched, tmp_path / "s.json"))
                assert back.update_steps == sched.update_steps


def test_resolve_plan_grammar(schedule_file, policy, sampler):
    path, sched = schedule_file
    n = len(policy.denoiser.blocks)
    s = plan_summary(resolve_plan("none", policy, sampler))
    assert (s["method"], s["block_evals"], s["compute_limit"]) == ("none", K * n, 1.0)
    s = plan_summary(resolve_plan("uniform:4", policy, sampler))
    assert (s["method"], s["block_evals"], s["compute_limit"], s["source"]) == ("uniform", 2 * n, 4.0, "uniform:4")
    s = plan_summary(resolve_plan("threshold:0.2", policy, sampler))
    assert s["dynamic"] and s["block_evals"] is None and s["threshold"] == 0.2
    s = plan_summary(resolve_plan(str(path), policy, sampler))
    assert (s["method"], s["block_evals"]) == ("bac", sched.block_evals)
    assert resolve_plan(f"bac:3:2@{path}", policy, sampler).ops == sched.to_plan().ops
    assert resolve_plan(f"bac:3:2:similarity@{path}", policy, sampler).ops == sched.to_plan().ops
    bound = build_schedule(sched.calibration, "bac", 3, 2, True, sched.model_hash, "ddim", "error-bound")
    assert resolve_plan(f"bac:3:2:error-bound@{path}", policy, sampler).ops == bound.to_plan().ops
    assert resolve_plan(f"{path}+forecast", policy, sampler).method == "bac+forecast"
    assert resolve_plan("uniform:2+forecast", policy, sampler).method == "uniform+forecast"
    blockwise = resolve_plan(f"blockwise:2@{path}", policy, sampler)
    assert blockwise.method == "blockwise" and plan_summary(blockwise)["block_evals"] == 3 * n  # 2 + forced last
    unified = resolve_plan(f"unified:2@{path}", policy, sampler)
    assert len({row.count(COMPUTE) for row in unified}) == 2  # all or nothing per step


def test_a_schedule_path_is_read_as_calibrate_writes_it(tmp_path, schedule_file, policy, sampler):
    """calibrate takes --out A.JSON (any case) and names with '@'; --cache reads them the same."""
    import shutil

    from polcache.cache.spec import parse_cache_spec

    path, sched = schedule_file
    for name in ("A.JSON", "x@y.json", "bac:3:2@z.json"):  # the last: an existing file wins over the grammar
        shutil.copy(path, tmp_path / name)
        spec = parse_cache_spec(str(tmp_path / name))
        assert (spec.method, spec.path) == ("schedule", str(tmp_path / name))
        assert resolve_plan(str(tmp_path / name), policy, sampler).ops == sched.to_plan().ops
    assert resolve_plan(f"unified:3@{tmp_path / 'A.JSON'}", policy, sampler).method == "unified"
    assert parse_cache_spec(f"bac:3:2@{tmp_path / 'none.json'}").method == "bac"  # the grammar, no such file
    assert parse_cache_spec(str(tmp_path / "A.JSON+forecast")).forecast
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(CacheError, match=r"dir.json is a folder"):
        resolve_plan(str(tmp_path / "dir.json"), policy, sampler)


@pytest.mark.parametrize("spec,match", [
    ("fast", "unknown cache spec"), ("uniform:x", "integer"), ("uniform:0", r"in 1\.\.8"), ("threshold:-1", ">= 0"),
    ("uniform:9", r"in 1\.\.8 \(the sampler's steps K\), got 9"), ("threshold:inf", "finite number >= 0"),
    ("", "cache spec is empty"), ("  ", "cache spec is empty"),
    ("bac:10:5", "needs a calibration"), ("bac:10@x.json", "bac:S:n"), ("bac:3:2:best@{path}", "OBJECTIVE"),
    ("none+forecast", "nothing to forecast"),
    ("threshold:0.1+forecast", "static"), ("missing.json", "not found"), ("unified:99@{path}", "budget"),
])
def test_bad_specs_are_clear_errors(spec, match, schedule_file, policy, sampler):
    with pytest.raises(CacheError, match=match):
        resolve_plan(spec.format(path=schedule_file[0]), policy, sampler)
