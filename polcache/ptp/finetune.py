"""Fine-tune a long-context head on stored per-frame embeddings (the encoder never runs).

The result is one ordinary checkpoint: the short-context policy's frozen encoder (and its
normaliser, plus the stored embeddings' per-dimension statistics) with the new head, so `eval`,
`calibrate`, `serve` and `export` take it as any other.
Everything else is `polcache train`'s loop (EMA, validation, checkpoints, resume, DDP)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from polcache.config import ExperimentConfig, validate
from polcache.data import EpisodeStore, Normalizer, open_dataset
from polcache.errors import ConfigError, DatasetError
from polcache.policy.checkpoint import load_policy
from polcache.policy.families import build_policy
from polcache.ptp.embeddings import KEY, embedding_info, encoder_hash
from polcache.train.loop import TrainingSource, dataset_rate, train

EMBEDDING_MIN_STD = 1e-9  # float32 rounding of the features is ~1e-10 and below


def finetune_source(cfg: ExperimentConfig, embeddings: str | Path) -> TrainingSource:
    """The embedding store and a policy with the store's encoder (frozen) and `cfg`'s head.

    The encoder settings (state_hidden, image) and observation keys come from the checkpoint that
    made the store; `cfg.dataset` becomes the store's source dataset (calibration reads it)."""
    store = open_dataset(embeddings)
    info = embedding_info(store, str(embeddings))
    for what in ("checkpoint", "source"):  # stores embedded before paths were made absolute hold them as typed
        if not info[what] or not Path(info[what]).exists():
            raise DatasetError(f"{embeddings} was embedded from {what} {info[what]}, which is not there (a relative "
                               f"path is read from the directory `ptp embed` ran in): run from there, or embed again")
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
    recorded = str(store.attrs.get("task", "")) or base_cfg.task
    if cfg.task and recorded and cfg.task != recorded:  # as train refuses a dataset of another task
        raise ConfigError(f"task is {cfg.task!r} but dataset {source} was recorded on {recorded!r} (embedded in "
                          f"{embeddings}); set task={recorded} (or leave task empty)")
    cfg.policy.state_hidden, cfg.policy.image = base_cfg.policy.state_hidden, base_cfg.policy.image
    cfg.dataset = source
    cfg.task = cfg.task or recorded
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
    return TrainingSource(store, policy, [KEY])


def with_embedding_stats(normalizer: Normalizer, store: EpisodeStore) -> Normalizer:
    """`normalizer` plus per-dimension mean and std of the stored embeddings: the head reads them
    standardised. A frozen encoder's feature scales are whatever its short training left: on
    image cue-reach the camera branch's features varied by 1e-6..1e-5 (the state already told the
    short policy where it was), and a head fed them raw ignored the cue they carry (40% success,
    BENCHMARKS.md). Dims below EMBEDDING_MIN_STD are constant for this purpose."""
    stats = Normalizer.fit({KEY: np.asarray(store.array(KEY))}, mode="gaussian", min_spread=EMBEDDING_MIN_STD)
    return Normalizer({**{k: normalizer.stats(k) for k in normalizer.keys}, KEY: stats.stats(KEY)})


def finetune(cfg: ExperimentConfig, embeddings: str | Path, fresh: bool = False, progress: bool = True,
             device: str = "cpu") -> Path:
    """Train `cfg`'s long-context head from `embeddings`; returns the checkpoint path (OUT/last)."""
    return train(cfg, fresh=fresh, progress=progress, device=device, source=finetune_source(cfg, embeddings))
