"""Fine-tune a long-context head on stored per-frame embeddings (the encoder never runs).

The result is one ordinary checkpoint: the short-context policy's frozen encoder (and its
normaliser, plus the stored embeddings' per-dimension statistics) with the new head, so `eval`,
`calibrate`, `serve` and `export` take it as any other.
Everything else is `polcache train`'s loop (EMA, validation, checkpoints, resume, DDP)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from polcache.config import ExperimentConfig, validate
from polcache.data import EpisodeStore, Normalizer, open_dataset
from polcache.errors import ConfigError, DatasetError
from polcache.policy.checkpoint import load_policy
from polcache.policy.families import build_policy
from polcache.ptp.embeddings import KEY, embedding_info, encoder_hash
from polcache.train.loop import TrainingSource, dataset_rate, run_task, train

EMBEDDING_MIN_STD = 1e-9  # float32 rounding of the features is ~1e-10 and below
# What the checkpoint that made the store fixes: its encoder's settings (the stored embeddings are their
# output) and its normalisation (state is normalised before it is encoded; its action statistics are kept).
ENCODER_SETTINGS = ("policy.state_hidden", "policy.image", "train.state_norm", "train.action_norm")


def finetune_source(cfg: ExperimentConfig, embeddings: str | Path, overrides: Sequence[str] = ()) -> TrainingSource:
    """The embedding store and a policy with the store's encoder (frozen) and `cfg`'s head.

    ENCODER_SETTINGS and the observation keys come from the checkpoint that made the store: a config
    file's other values are replaced (said), one of the command's `overrides` is refused (it had been
    replaced in silence while config.yaml recorded it); `cfg.dataset` becomes the store's source
    dataset (calibration reads it)."""
    store = open_dataset(embeddings)
    info = embedding_info(store, str(embeddings))
    for what in ("checkpoint", "source"):  # stores embedded before paths were made absolute hold them as typed
        if not info[what] or not Path(info[what]).exists():
            raise DatasetError(f"{embeddings} was embedded from {what} {info[what]}, which is not there (a relative "
                               f"path is read from the directory `ptp embed` ran in): run from there, or embed again")
    encoder = Path(info["checkpoint"]).resolve()
    if cfg.out and encoder.is_relative_to(Path(cfg.out).resolve()):  # OUT/last, OUT/best: replaced by training
        raise ConfigError(f"out={cfg.out} holds {info['checkpoint']}, the checkpoint whose encoder made {embeddings}: "
                          f"fine-tuning there would replace it (or move it aside), and the store would name another "
                          f"encoder; give the fine-tuned run its own out")
    base, base_cfg, _ = load_policy(info["checkpoint"])
    if encoder_hash(base) != info["encoder_hash"]:
        raise DatasetError(f"{embeddings} was embedded by another encoder than the one now in {info['checkpoint']} "
                           "(encoder hash differs): run `polcache ptp embed` again")
    if list(cfg.obs_keys) != list(info["obs_keys"]):
        raise ConfigError(f"obs_keys {cfg.obs_keys} disagree with the embedding store's encoder, which takes "
                          f"{info['obs_keys']}")
    source = info["source"]
    if cfg.dataset and Path(cfg.dataset).resolve() != Path(source).resolve():  # not silently replaced
        raise ConfigError(f"dataset is {cfg.dataset} but {embeddings} embeds {source}; leave dataset empty "
                          "(ptp finetune trains on the store, whose source dataset calibration reads)")
    # as train refuses a dataset of another task (the store carries its source's task attributes); a store
    # naming none (an imported source) takes the encoder's
    task = run_task(cfg.task, store.attrs, f"{source} (embedded in {embeddings})")
    if not task and not store.attrs.get("tasks_recorded"):
        task = base_cfg.task
    replaced, given_keys = [], [o.partition("=")[0].strip() for o in overrides]
    for setting in ENCODER_SETTINGS:
        group, name = setting.split(".")
        given, fixed = getattr(getattr(cfg, group), name), getattr(getattr(base_cfg, group), name)
        if given == fixed:
            continue
        if any(key == setting or key.startswith(f"{setting}.") for key in given_keys):
            raise ConfigError(f"{setting}: ptp finetune takes it from the checkpoint that made the embeddings, "
                              f"{info['checkpoint']} ({fixed!r}; its encoder and normalisation are frozen): leave it "
                              f"out, or train the short policy with it and embed again")
        replaced.append(f"{setting} {given!r} -> {fixed!r}")
    if replaced:  # the config file's own values: said, and config.yaml records what the checkpoint holds
        print(f"note: the embeddings' encoder fixes {'; '.join(replaced)} (from {info['checkpoint']})")
    cfg.policy.state_hidden, cfg.policy.image = base_cfg.policy.state_hidden, base_cfg.policy.image
    cfg.train.state_norm, cfg.train.action_norm = base_cfg.train.state_norm, base_cfg.train.action_norm
    cfg.dataset = source
    cfg.task = task
    validate(cfg)
    policy = build_policy(cfg.policy, base.spec.obs, base.obs_keys, base.action_dim,
                          with_embedding_stats(base.normalizer, store), cfg.task)
    # the store's fps (copied from its source); a store embedded before that was copied: the checkpoint's
    hz = dataset_rate(store, str(embeddings))
    policy.spec = replace(policy.spec, control_hz=hz if hz is not None else base.spec.control_hz)
    policy.encoder.load_state_dict(base.encoder.state_dict())
    policy.encoder.requires_grad_(False)
    if store.obs_spec()[KEY].shape != (policy.encoder.feature_dim,):
        raise DatasetError(f"{embeddings}: embeddings of size {store.obs_spec()[KEY].shape} but the encoder makes "
                           f"{policy.encoder.feature_dim}")
    # which store and encoder made the head's inputs: a resume after the short run trained on needs to know
    provenance = {"embeddings": {"store": str(Path(embeddings).resolve()), "encoder_checkpoint": info["checkpoint"],
                                 "encoder_hash": info["encoder_hash"]}}
    return TrainingSource(store, policy, [KEY], provenance)


def with_embedding_stats(normalizer: Normalizer, store: EpisodeStore) -> Normalizer:
    """`normalizer` plus per-dimension mean and std of the stored embeddings: the head reads them
    standardised. A frozen encoder's feature scales are whatever its short training left: on
    image cue-reach the camera branch's features varied by 1e-6..1e-5 (the state already told the
    short policy where it was), and a head fed them raw ignored the cue they carry (40% success,
    BENCHMARKS.md). Dims below EMBEDDING_MIN_STD are constant for this purpose."""
    stats = Normalizer.fit({KEY: np.asarray(store.array(KEY))}, mode="gaussian", min_spread=EMBEDDING_MIN_STD)
    return Normalizer({**{k: normalizer.stats(k) for k in normalizer.keys}, KEY: stats.stats(KEY)})


def finetune(cfg: ExperimentConfig, embeddings: str | Path, fresh: bool = False, progress: bool = True,
             device: str = "cpu", overrides: Sequence[str] = ()) -> Path:
    """Train `cfg`'s long-context head from `embeddings`; returns the checkpoint path (OUT/last).
    `overrides`: the command's, which must not change what the store's encoder fixes."""
    return train(cfg, fresh=fresh, progress=progress, device=device,
                 source=finetune_source(cfg, embeddings, overrides))
