"""Finding the dataset a checkpoint was trained on, for the commands that need its observations
after training (calibrate's observations, `ptp embed`): where it may still be, and whether the
data found there is it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from polcache.config import ExperimentConfig
from polcache.errors import PolcacheError

if TYPE_CHECKING:
    from polcache.cache.protocol import CacheTarget
    from polcache.data import EpisodeStore


def dataset_candidates(dataset: str, checkpoint: str | Path | None = None) -> list[Path]:
    """Where the training dataset of a checkpoint may still be, those that exist, nearest first. A
    relative path was relative to wherever training ran: the current directory, then each directory
    above the checkpoint (runs/NAME/last sits under the project that holds data/)."""
    if not dataset:
        return []
    path = Path(dataset)
    candidates = [path]
    if not path.is_absolute() and checkpoint is not None:
        candidates += [parent / path for parent in Path(checkpoint).resolve().parents]
    found: dict[Path, Path] = {}  # by where it resolves: the current directory may be one of those above the checkpoint
    for candidate in candidates:
        if candidate.exists():
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def training_data(policy: "CacheTarget", cfg: ExperimentConfig, candidates: list[Path],
                   open_store: Callable[[Path], "EpisodeStore"]) -> tuple[Path | None, "EpisodeStore | None", list[str]]:
    """The first candidate that is the data the checkpoint was trained on (the normaliser refitted on it
    equals the checkpoint's: another recording at that path, or another project's folder above, is
    not), and why each one before it was passed over."""
    from polcache.data.normalize import differing_keys
    from polcache.train.loop import fit_normalizer

    saved, passed = policy.normalizer.state_dict(), []
    for path in candidates:
        try:
            store = open_store(path)
            store.check_observations({k: policy.spec.obs[k] for k in policy.obs_keys}, str(path), "the checkpoint")
            refit = fit_normalizer(store, cfg, str(path)).state_dict()
        except PolcacheError as exc:  # not a dataset, observations of other shapes: not its training data either
            passed.append(f"{path} ({exc})")
            continue
        # the raw data's keys only: a PTP head fine-tuned on stored embeddings also has the embeddings' statistics
        shared = saved.keys() & refit.keys()
        differ = differing_keys({k: refit[k] for k in shared}, {k: saved[k] for k in shared})
        if not differ:
            return path, store, passed
        passed.append(f"{path} (the normaliser statistics of {', '.join(differ)} differ)")
    return None, None, passed
