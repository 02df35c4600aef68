"""The suite runner: record -> train -> evaluate per task, resumable, local processes or Ray."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from polcache.errors import PolcacheError
from polcache.sim import suite
from polcache.sim.suite import SuiteRun, resolve_tasks, run_suite, run_task

pytestmark = pytest.mark.slow

TINY = ("policy.n_layers=1", "policy.width=32", "policy.state_hidden=32", "policy.sampler.inference_steps=2",
        "train.batch_size=16", "train.warmup_steps=2", "train.steps=6", "train.checkpoint_every=3",
        "train.val_windows=4")


def _run(**kw) -> SuiteRun:
    return SuiteRun(config="configs/metaworld_small.yaml", overrides=TINY, demos=2, demo_seed=0, episodes=2,
                    eval_seed=100, max_steps=16, **kw)


def test_resolve_tasks():
    assert resolve_tasks("mt10")[0] == "reach-v3" and len(resolve_tasks("MT10")) == 10
    assert resolve_tasks("push-v3, reach-v3") == ["push-v3", "reach-v3"]
    with pytest.raises(PolcacheError, match="unknown"):
        resolve_tasks("push-v9")


def test_task_result_is_stored_and_reused(tmp_path, monkeypatch):
    first = run_task("reach-v3", _run(), tmp_path)
    assert first.episodes == 2 and first.train_steps == 6 and first.demos == 2
    assert first.extra["max_steps"] == 16 and all(e["length"] <= 16 for e in first.extra["per_episode"])
    stored = json.loads((tmp_path / "reach-v3" / "result.json").read_text())
    assert stored["successes"] == first.successes

    import polcache.train.loop as loop
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a finished task must not train again"))
    assert run_task("reach-v3", _run(), tmp_path).successes == first.successes
    # A different request is not served from the stored result.
    monkeypatch.undo()
    again = run_task("reach-v3", _run(action_steps=4), tmp_path)
    assert again.run["action_steps"] == 4
    assert again.extra["checkpoint"] == first.extra["checkpoint"]  # evaluation settings: the same trained run
    # another training recipe trains a run of its own: it had resumed the old one ("nothing left to train")
    # and recorded the old weights under the new overrides
    other = run_task("reach-v3", replace(_run(), overrides=(*TINY, "train.lr=1e-3")), tmp_path)
    assert other.extra["checkpoint"] != first.extra["checkpoint"] and other.train_steps == 6
    assert "lr: 0.001" in (Path(other.extra["checkpoint"]) / "config.yaml").read_text()


def test_untrained_row_and_parallel_workers(tmp_path):
    results = run_suite(["reach-v3", "drawer-close-v3"], _run(untrained=True), tmp_path, workers=2)
    assert [r.task for r in results] == ["reach-v3", "drawer-close-v3"]
    assert all(r.train_steps == 0 and r.train_seconds == 0 and r.episodes == 2 for r in results)
    assert (tmp_path / "drawer-close-v3" / "untrained.json").exists()


def test_ray_local_instance_gives_the_same_table(tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install -e '.[cluster]')")
    local = run_suite(["reach-v3"], _run(untrained=True), tmp_path / "local")
    on_ray = run_suite(["reach-v3"], _run(untrained=True), tmp_path / "ray", ray_address="local")
    assert [(r.task, r.successes, r.mean_episode_length) for r in on_ray] == \
           [(r.task, r.successes, r.mean_episode_length) for r in local]
    assert (tmp_path / "ray" / "reach-v3" / "untrained.json").exists()
    assert suite._stored(tmp_path / "ray" / "reach-v3" / "untrained.json", _run(untrained=True)) is not None


def test_ray_without_a_cluster_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install -e '.[cluster]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PolcacheError, match=r"--ray auto: no Ray cluster to join.*--ray local"):
        run_suite(["reach-v3"], _run(untrained=True), tmp_path, ray_address="auto")


def _bench_suite():
    """benchmarks/bench_suite.py as a module (it puts benchmarks/ on sys.path for its `common`)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_suite.py"
    spec = importlib.util.spec_from_file_location("bench_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag, value", [("--episodes", "0"), ("--episodes", "-1"), ("--demos", "0"), ("--demos", "-2"),
                                         ("--threads", "0"), ("--max-steps", "0"), ("--workers", "0"),
                                         ("--steps", "0"), ("--action-steps", "0"), ("--ensemble", "nan"),
                                         ("--demo-seed", "-1"), ("--eval-seed", "-1")])
def test_bench_suite_refuses_bad_numbers_before_any_work_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        _bench_suite().build_parser().parse_args([flag, value])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"argument {flag}: expected" in err and f"got {value}" in err


def test_bench_suite_within_column_follows_the_cap_used():
    from polcache.sim.suite import TaskResult

    bench = _bench_suite()

    def result(cap: int, lengths: list[int]) -> TaskResult:
        episodes = [{"success": True, "length": n} for n in lengths]
        return TaskResult("reach-v3", {}, 1.0, len(lengths), len(lengths), [0.5, 1.0], 10.0, {"p50": 1.0}, 0.0, 0, 2,
                          {"max_steps": cap, "per_episode": episodes})

    assert bench.short_cap([result(500, [150, 250])]) == 200  # LeRobot's cap, below ours
    assert bench.row(result(500, [150, 250]), 200)["within 200 steps"] == "50%"
    capped = [result(60, [30, 60])]
    assert bench.short_cap(capped) == 60 and "within 60 steps" in bench.columns(60)
    assert bench.mean_row(capped, 60)["within 60 steps"] == "100.0%"


def test_training_time_counts_on_across_resumes_and_an_old_result_is_run_again(tmp_path):
    """elapsed_s counts on from the checkpoint a run resumed: summing segments counted the time
    before that checkpoint twice. A stored result of another version's fields was a traceback."""
    log = [{"step": s, "elapsed_s": e} for s, e in ((10, 10.0), (20, 20.0), (30, 30.0), (25, 25.0), (35, 35.0))]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert suite._train_seconds(tmp_path) == 35.0
    run = SuiteRun(config="configs/default.yaml")
    (tmp_path / "result.json").write_text(json.dumps({"run": run.key(), "a_field_of_old": 1}))
    assert suite._stored(tmp_path / "result.json", run) is None
