"""The order training windows are drawn in: epoch after epoch, each epoch shuffled from its own
seed (the run's seed and the epoch's number), so the batches from any step on are known from the
step alone. A resumed run starts at its step's batch and trains on the batches the uninterrupted
run would have (a DataLoader's shuffle drew each epoch's order from the global random state,
which a resumed run cannot rebuild: it trained on other batches and ended with other weights)."""

from __future__ import annotations

from typing import Iterator

import numpy as np


class EpochBatches:
    """Batch sampler (DataLoader's `batch_sampler`) over `n` windows, without end (no len()): batches of
    `batch_size` window indices, starting at batch `start` of the run. With `world` processes each
    takes every world-th window of the epoch's order (rank `rank`), as DistributedSampler shares
    them. An epoch holds `per_epoch` batches: the whole ones (drop_last), or a single batch of all
    windows where there are fewer than a batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world
        shared = n // world  # each process's windows per epoch (the epoch order's last n % world sit it out)
        self.per_epoch = max(1, shared // batch_size)
        self._size = batch_size if shared >= batch_size else shared

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            mine = order[:self.n // self.world * self.world][self.rank::self.world]
            for b in range(skip, self.per_epoch):
                yield mine[b * self._size:(b + 1) * self._size].tolist()
            epoch, skip = epoch + 1, 0
