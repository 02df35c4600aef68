"""polcache.data: demonstrations on disk (zarr), training windows, and normalisation.

Imports are lazy (polcache.lazy): registering the `data` commands, or reading a dataset's
attributes, does not pay for torch."""

from polcache.lazy import lazy_exports

_EXPORTS = {
    "Episode": "polcache.data.store",
    "EpisodeStore": "polcache.data.store",
    "Normalizer": "polcache.data.normalize",
    "SequenceDataset": "polcache.data.sequence",
    "episode_split": "polcache.data.sequence",
    "open_dataset": "polcache.data.lerobot",
    "write_dataset": "polcache.data.store",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
