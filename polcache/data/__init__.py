"""polcache.data: demonstrations on disk (zarr), training windows, and normalisation."""

from polcache.data.lerobot import open_dataset
from polcache.data.normalize import Normalizer
from polcache.data.sequence import SequenceDataset, episode_split
from polcache.data.store import Episode, EpisodeStore, write_dataset

__all__ = ["Episode", "EpisodeStore", "Normalizer", "SequenceDataset", "episode_split", "open_dataset",
           "write_dataset"]
