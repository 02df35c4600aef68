"""Long-context policies: the strided token layout, past-token loss masking, and the same
windows (padding included) in training data and at run time (the server's history, which the
evaluator uses too)."""

import re

import numpy as np
import pytest
import torch
from helpers import tiny_policy

from polcache.config import ExperimentConfig, PolicyConfig, validate
from polcache.data import Episode, SequenceDataset, open_dataset, write_dataset
from polcache.errors import ConfigError
from polcache.policy.spec import action_offsets, frame_offsets
from polcache.serve.history import ObservationHistory


def test_token_layout_past_actions_at_the_frames_stride_then_dense_future():
    assert frame_offsets(4, 3) == (-9, -6, -3, 0)
    assert frame_offsets(4, 3, "mixed") == (-7, -4, -1, 0)  # older half strided, newest half dense
    assert frame_offsets(5, 2, "mixed") == (-6, -4, -2, -1, 0)
    assert action_offsets(4, 6, 3, "mixed") == (-7, -4, -1, 0, 1, 2)
    assert action_offsets(4, 8, 3) == (-9, -6, -3, 0, 1, 2, 3, 4)  # token K-1 is the current action
    assert action_offsets(2, 16, 1) == tuple(range(-1, 15))  # short context: Chi et al.'s layout


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    eps = [Episode(obs={"state": np.arange(T, dtype=np.float32)[:, None] * [1, -1] + 100 * e},
                   action=rng.normal(size=(T, 2)).astype(np.float32), task="toy") for e, T in enumerate((23, 9))]
    path = tmp_path_factory.mktemp("lc") / "toy.zarr"
    write_dataset(path, eps)
    return open_dataset(path)


@pytest.mark.parametrize("K,s,mode", [(4, 3, "strided"), (3, 1, "strided"), (5, 2, "strided"), (5, 3, "mixed"),
                                      (4, 2, "mixed")])
def test_training_windows_equal_the_runtime_windows_padding_included(store, K, s, mode):
    ds = SequenceDataset(store, horizon=K + 3, n_obs_steps=K, keys=["state"], obs_stride=s, frame_mode=mode)
    offsets = frame_offsets(K, s, mode)
    states = store.array("state")
    start = 0
    for length in np.diff(np.concatenate([[0], store.episode_ends])):
        server = ObservationHistory(K, s, mode)  # the evaluator keeps its window with the same class
        for t in range(length):
            server.push(t, {"state": states[start + t]})
            seqs, window = server.window()
            assert np.array_equal(window["state"][0], ds[start + t]["obs"]["state"].numpy()), (K, s, t)
            assert seqs == [max(0, t + off) for off in offsets]
        start += length


def test_past_action_tokens_are_strided_and_padded_with_the_first_action(store):
    ds = SequenceDataset(store, horizon=6, n_obs_steps=3, keys=["state"], obs_stride=2)
    actions = store.array("action")
    np.testing.assert_array_equal(ds[5]["action"].numpy(), actions[[1, 3, 5, 6, 7, 8]])
    np.testing.assert_array_equal(ds[1]["action"].numpy(), actions[[0, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize("past_loss,supervised", [
    ("all", [0, 1, 2]), ("none", [2]), ("recent:1", [1, 2])])
def test_past_loss_supervises_only_the_tokens_it_names(past_loss, supervised):
    """The gradient of the loss reaches the denoiser's prediction at exactly the supervised tokens
    (past tokens are inputs either way: the action tokens attend to them)."""
    p = tiny_policy(n_obs_steps=3, horizon=8, past_loss=past_loss, obs_stride=2).train()
    seen = {}
    p.denoiser.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": {"state": torch.randn(4, 3, 5, generator=g)}, "action": torch.randn(4, 8, 3, generator=g)}
    loss = p.compute_loss(batch, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss, seen["out"])
    reached = [i for i in range(8) if grad[:, i].abs().sum() > 0]
    assert reached == supervised + list(range(3, 8)), past_loss


def test_bad_long_context_settings_are_named():
    for kw, match in ((dict(obs_stride=0), "obs_stride"), (dict(past_loss="recent:5"), "past_loss"),
                      (dict(past_loss="some"), "past_loss"), (dict(frame_mode="sparse"), "frame_mode")):
        with pytest.raises(ConfigError, match=match):
            validate(ExperimentConfig(policy=PolicyConfig(n_obs_steps=3, **kw)))


def test_a_long_context_policy_samples_and_reports_its_stride():
    p = tiny_policy(n_obs_steps=4, horizon=10, obs_stride=3, n_action_steps=4)
    assert p.spec.obs_stride == 3 and p.spec.history_span == 10 and p.spec.frame_offsets == (-9, -6, -3, 0)
    out = p.predict_action({"state": torch.randn(2, 4, 5)}, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (2, 4, 3) and out["action_pred"].shape == (2, 10, 3)
    from polcache.policy.spec import PolicySpec
    assert PolicySpec.from_dict(p.spec.to_dict()).obs_stride == 3
    mixed = tiny_policy(n_obs_steps=4, horizon=10, obs_stride=3, frame_mode="mixed").spec
    assert mixed.frame_offsets == (-7, -4, -1, 0) and mixed.history_span == 8
    assert PolicySpec.from_dict(mixed.to_dict()) == mixed


def test_self_verification_returns_the_candidate_whose_past_matches_what_was_executed():
    from polcache.policy.backend import TorchBackend

    p = tiny_policy(n_obs_steps=3, horizon=8, obs_stride=2, n_action_steps=4)
    b = TorchBackend(p, "ddim", 4, candidates=6)
    obs = {"state": np.random.default_rng(0).normal(size=(1, 3, 5)).astype(np.float32)}
    # the six candidates the backend draws with seed 7, from one encoding broadcast to all six
    with torch.no_grad():
        feats = p.encode({"state": torch.as_tensor(obs["state"])}).expand(6, -1, -1)
        x = p.sample(feats, b.sampler, None, torch.Generator().manual_seed(7))
    preds = p.to_actions(x)
    for pick in (0, 3, 5):
        past = preds["action_pred"][pick, :2].numpy()  # what "the robot executed" = candidate pick's past
        got = b.predict(obs, seed=7, past_actions=past)
        np.testing.assert_allclose(got[0], preds["action"][pick].numpy(), atol=1e-6)
    assert b.predict(obs, seed=7).shape == (1, 4, 3)  # no executed history yet: one candidate
    # a partial history (the oldest past step before the episode began): by default not verified,
    # with min_verified=1 scored on the known token only
    partial = preds["action_pred"][4, :2].numpy().copy()
    partial[0] = np.nan
    unverified = b.predict(obs, seed=7)
    np.testing.assert_allclose(b.predict(obs, seed=7, past_actions=partial), unverified, atol=1e-6)
    early = TorchBackend(p, "ddim", 4, candidates=6, min_verified=1)
    scores = ((x[:, 1] - p.normalizer.normalize("action", torch.as_tensor(partial[1]))) ** 2).mean(dim=1)
    best = int(torch.argmin(scores))
    np.testing.assert_allclose(early.predict(obs, seed=7, past_actions=partial)[0], preds["action"][best].numpy(),
                               atol=1e-6)
    assert (b.describe()["verify_min_past"], early.describe()["verify_min_past"]) == (2, 1)
    for wrong in (np.zeros((3, 3)), np.zeros((1, 3)), np.zeros(3)):  # checked before counting known rows
        with pytest.raises(ValueError, match=r"past_actions: expected shape \(2, 3\)"):
            b.predict(obs, seed=7, past_actions=wrong)


def test_self_verification_scores_only_the_past_tokens_training_learned():
    """A policy trained with past_loss=none predicts nothing learned at its past tokens: --verify was
    accepted and picked among candidates at random; with recent:k the older tokens added their noise."""
    from polcache.policy.backend import TorchBackend

    for past_loss, why in (("none", "was trained with policy.past_loss=none"), ("all", "observes one frame")):
        p = tiny_policy(n_obs_steps=1 if past_loss == "all" else 3, horizon=8, n_action_steps=4, past_loss=past_loss)
        with pytest.raises(ConfigError, match=f"--verify 4: self-verification scores candidates by their predicted "
                                              f"past actions, and it {why}"):
            TorchBackend(p, "ddim", 4, candidates=4)
    p = tiny_policy(n_obs_steps=3, horizon=8, n_action_steps=4, past_loss="recent:1")
    b = TorchBackend(p, "ddim", 4, candidates=6)
    obs = {"state": np.random.default_rng(0).normal(size=(1, 3, 5)).astype(np.float32)}
    with torch.no_grad():
        x = p.sample(p.encode({"state": torch.as_tensor(obs["state"])}).expand(6, -1, -1), b.sampler, None,
                     torch.Generator().manual_seed(7))
    preds = p.to_actions(x)
    past = preds["action_pred"][2, :2].numpy().copy()
    past[0] = preds["action_pred"][5, 0].numpy() + 5.0  # the untrained oldest token: far from every candidate's
    np.testing.assert_allclose(b.predict(obs, seed=7, past_actions=past)[0], preds["action"][2].numpy(), atol=1e-6)


def test_verify_min_past_counts_the_trained_past_tokens_only():
    """With past_loss=recent:k, --verify-min-past took 1..K-1 and counted every executed past step, so
    a policy scoring its newest token only waited by default for all K-1 (and never verified in
    short episodes) and `--verify-min-past 5` verified as 2 did."""
    from polcache.policy.backend import TorchBackend

    p = tiny_policy(n_obs_steps=4, horizon=8, n_action_steps=4, past_loss="recent:1")
    with pytest.raises(ConfigError, match=r"--verify-min-past must be in 1\.\.1 \(the policy's past action tokens its "
                                          r"loss trained, policy.past_loss=recent:1\), got 2"):
        TorchBackend(p, "ddim", 4, candidates=3, min_verified=2)
    b = TorchBackend(p, "ddim", 4, candidates=3)
    assert b.describe()["verify_min_past"] == 1
    past = np.full((3, p.spec.action_dim), np.nan, np.float32)
    past[:2] = 0.0  # the two older steps executed, not the one whose token was trained
    assert not b._verifies(past)
    past[2] = 0.0
    assert b._verifies(past)
    with pytest.raises(ConfigError, match="it was trained with policy.past_loss=recent:0: its past action tokens"):
        TorchBackend(tiny_policy(n_obs_steps=3, horizon=8, n_action_steps=4, past_loss="recent:0"), "ddim", 4,
                     candidates=3)


def _window(frames, t, offsets):
    picks = [max(0, t + off) for off in offsets]
    return {key: x[picks][None] for key, x in frames.items()}, picks


@pytest.mark.parametrize("image", [False, True], ids=["state", "image"])
def test_the_embedding_ring_buffer_gives_the_features_of_re_encoding_every_frame(image):
    from polcache.policy.backend import TorchBackend

    p = tiny_policy(n_obs_steps=4, horizon=10, obs_stride=3, n_action_steps=4, image=image)
    b = TorchBackend(p, "ddim", 4)
    session = b.session()
    rng = np.random.default_rng(0)
    frames = {"state": rng.normal(size=(40, 5)).astype(np.float32)}
    if image:
        frames["image_cam"] = rng.integers(0, 255, size=(40, 24, 24, 3), dtype=np.uint8)
    for t in range(0, 40, 2):  # a chunk every 2 steps
        obs, steps = _window(frames, t, p.spec.frame_offsets)
        window = {key: torch.as_tensor(x) for key, x in obs.items()}
        with torch.no_grad():
            each = torch.cat([p.encode({k: x[:, i:i + 1] for k, x in window.items()}) for i in range(4)], dim=1)
            batched = p.encode(window)
            got = session.ring.features(p, window, steps)
        assert torch.equal(got, each), t  # bit for bit: every frame re-encoded on its own
        torch.testing.assert_close(got, batched, atol=1e-5, rtol=1e-5)  # one batch of K rounds differently
        np.testing.assert_allclose(session.predict(obs, steps, seed=t), b.predict(obs, seed=t), atol=1e-4)
    # each frame encoded once: 20 windows of 4 frames, but only the distinct steps seen
    assert session.ring.encoded == len({max(0, t + off) for t in range(0, 40, 2) for off in p.spec.frame_offsets})


def test_a_gap_in_the_robots_steps_keeps_the_frame_the_window_repeats():
    """A robot that skips steps (a dropped or refused observation): the window repeats the newest
    earlier frame, which may lie beyond the span, and the ring still has it."""
    from polcache.policy.backend import TorchBackend
    from polcache.serve.history import ObservationHistory

    p = tiny_policy(n_obs_steps=2, horizon=8, n_action_steps=4)
    b = TorchBackend(p, "ddim", 4)
    session, history = b.session(), ObservationHistory(2)
    rng = np.random.default_rng(0)
    for seq in (0, 2, 3, 7, 8, 20):
        history.push(seq, {"state": rng.normal(size=5).astype(np.float32)})
        steps, obs = history.window()
        np.testing.assert_allclose(session.predict(obs, steps, seed=seq), b.predict(obs, seed=seq), atol=1e-4)
    assert steps == [8, 20] and set(session.ring._by_step) == {8, 20}  # noqa: SLF001 - nothing older kept


def test_two_robots_sessions_keep_their_own_history():
    from polcache.policy.backend import TorchBackend

    p = tiny_policy(n_obs_steps=3, horizon=8, obs_stride=2, n_action_steps=4)
    b = TorchBackend(p, "ddim", 4)
    a_states = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
    b_states = np.random.default_rng(2).normal(size=(10, 5)).astype(np.float32)
    sa, sb = b.session(), b.session()
    for t in range(10):  # interleaved, same step numbers, different observations
        for session, states in ((sa, a_states), (sb, b_states)):
            obs, steps = _window({"state": states}, t, p.spec.frame_offsets)
            np.testing.assert_allclose(session.predict(obs, steps, seed=t), b.predict(obs, seed=t), atol=1e-4)
    sa.reset()
    assert not sa.ring._by_step and sb.ring._by_step


def test_eval_records_its_self_verification_options_and_says_how_many_chunks_it_chose(tmp_path, capsys):
    """On cue-reach the default (all 15 past frames at stride 3: 45 steps) is never reached in its
    43-step episodes: `--verify 16` verified nothing, said nothing and recorded 16."""
    import json
    from pathlib import Path

    from polcache.cli import main

    shipped = Path(__file__).resolve().parents[1] / "polcache/assets/checkpoints/cue-reach-ptp"
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(shipped), "--episodes", "1", "--no-progress", "--verify", "2", "--json", str(out)]
    assert main(argv) == 0
    extra = json.loads(out.read_text())["extra"]
    assert (extra["verify"], extra["verify_min_past"], extra["verified_chunks"]) == (2, 15, 0)
    assert re.search(r"warning: self-verification: 0 of \d+ chunks chosen among 2 candidates: none had executed "
                     r"actions at 15 past frames .* the oldest of them 45 steps back", capsys.readouterr().err)
    assert main([*argv, "--verify-min-past", "3"]) == 0
    extra = json.loads(out.read_text())["extra"]
    assert extra["verify_min_past"] == 3 and extra["verified_chunks"] > 0
    assert re.search(rf"self-verification: {extra['verified_chunks']} of \d+ chunks", capsys.readouterr().out)
    assert main([*argv[:6], "--json", str(out)]) == 0  # without --verify: no self-verification figures
    assert "verify_min_past" not in json.loads(out.read_text())["extra"]
