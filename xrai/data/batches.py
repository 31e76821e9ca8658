"""What the two input paths share, so that they differ only in where the uint8 pixels come from.

Both batch sources (`xrai.data.dataset.ClassicBatches`: decode files in workers; `xrai.data.loader.
CachedBatches`: gather rows from a memmap) serve the same rows in the same batches, in the same order,
and hand every batch to the same `GpuAugment` with the same random stream:

- `epoch_batches`: the positions of each batch of one epoch. Training shuffles from (seed, epoch) and
  drops the last partial batch (a batch of one breaks BatchNorm) unless it is the only one; evaluation
  keeps manifest order and every row. `EpochPlan` fixes its arguments for one source (and checks that
  a training set can be shared among the ranks), so both sources count and order their batches alike.
- `epoch_generator(seed, epoch, AUGMENT_STREAM)`: the CPU generator GpuAugment draws its parameters
  from, batch after batch.
- `drop_bad_images`: unreadable images are dropped before batching (never replaced by a black image)
  and named in one `BadImageWarning`.
- `ready_batch`: augment on the device, then the model's memory format.

Everything random derives from (seed, epoch) alone, so epoch k delivers the very same batches whether
it runs first or after a resume, on either path; `train.fit` relies on that for exact resume.

Several processes (torchrun, `xrai.train.distributed`): the epoch's order and its global batches of
`batch_size` are the same on every rank, and rank r takes the r-th of `world_size` contiguous shards
of each batch, so the ranks together cover every training image of the epoch exactly once (the last
partial global batch is dropped, as with one process: every rank takes the same number of steps of
batch_size / world_size images). Evaluation shards the same way and keeps every row; a shard left
empty by the last batch is skipped. Each rank augments from its own stream, (seed, epoch, rank); rank
0's is the single process's, so world size 1 is unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = [
    "AUGMENT_STREAM",
    "ORDER_STREAM",
    "BadImageWarning",
    "EpochPlan",
    "batch_count",
    "check_shardable",
    "drop_bad_images",
    "epoch_batches",
    "epoch_generator",
    "per_rank_batch",
    "ready_batch",
]

ORDER_STREAM, AUGMENT_STREAM = 0, 1  # the two random streams of an epoch: the shuffle, the augmentation
_NAMED = 10  # bad files named in the warning; the rest are counted (all are in the source's `bad` table)


class BadImageWarning(UserWarning):
    """Images could not be decoded; they were left out of the batches."""


def epoch_generator(seed: int, epoch: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, epoch, stream[, rank]), well mixed by numpy's SeedSequence.

    Rank 0 (and a single process) draws from (seed, epoch, stream); rank r > 0 from (seed, epoch, stream, r).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    entropy = [int(seed), int(epoch), int(stream)] + ([int(rank)] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def batch_count(n: int, batch_size: int, *, train: bool, max_batches: int = 0) -> int:
    """Batches per epoch: training drops the last partial batch unless it is the only one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = n // batch_size if train and n >= batch_size else -(-n // batch_size)
    return min(batches, max_batches) if max_batches > 0 else batches


def epoch_batches(n: int, batch_size: int, *, train: bool, seed: int, epoch: int, max_batches: int = 0,
                  rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """The row positions (0..n-1) of every batch of one epoch, in the order they are served.

    With world_size > 1: this rank's shard of every global batch of `batch_size` (see the module
    docstring); training then needs batch_size to be a multiple of world_size and n >= batch_size.

    Raises:
        ValueError: a training batch that cannot be shared out evenly among the ranks.
    """
    if train:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, ORDER_STREAM)).numpy()
    else:
        order = np.arange(n)
    count = batch_count(n, batch_size, train=train, max_batches=max_batches)
    batches = [order[k * batch_size : (k + 1) * batch_size] for k in range(count)]
    if world_size == 1:
        return batches
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if train:
        check_shardable(n, batch_size, world_size)
    shards = [np.array_split(batch, world_size)[rank] for batch in batches]
    return [shard for shard in shards if len(shard)]


@dataclass(frozen=True)
class EpochPlan:
    """The batches of every epoch of one batch source: `epoch_batches` with all but the epoch fixed.

    Raises:
        ValueError: a training set whose global batches cannot be shared out among world_size ranks.
    """

    n: int
    batch_size: int
    train: bool
    seed: int
    max_batches: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.train and self.world_size > 1:
            check_shardable(self.n, self.batch_size, self.world_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same every epoch)."""
        if self.world_size > 1 and not self.train:  # the last batch's shard may be empty on some ranks
            return len(self.positions(0))
        return batch_count(self.n, self.batch_size, train=self.train, max_batches=self.max_batches)

    def positions(self, epoch: int) -> list[np.ndarray]:
        """Positions (0..n-1) of every batch of the epoch (this rank's shards), in order."""
        return epoch_batches(self.n, self.batch_size, train=self.train, seed=self.seed, epoch=epoch,
                             max_batches=self.max_batches, rank=self.rank, world_size=self.world_size)


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """batch_size / world_size: the images each rank trains on per step (batch_size is the global batch).

    Raises:
        ValueError: batch_size is not a multiple of world_size.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not divide among {world_size} processes (it is the global "
                         f"batch: each process takes batch_size / {world_size}); use a multiple of {world_size}")
    return batch_size // world_size


def check_shardable(n: int, batch_size: int, world_size: int) -> None:
    """Raise ValueError unless n training images make global batches that split evenly among world_size ranks."""
    per_rank_batch(batch_size, world_size)
    if n < batch_size:
        raise ValueError(f"{n} training images make no full batch of {batch_size} to share among {world_size} "
                         "processes; lower batch_size")


def drop_bad_images(manifest: pd.DataFrame, bad: pd.DataFrame, *, listed_in: str, stacklevel: int = 3) -> pd.DataFrame:
    """The manifest without the rows whose path is in `bad` (columns path, reason), warning once.

    Args:
        manifest: the rows a batch source was given.
        bad: the unreadable files among them (absolute or as in the manifest) with the decoder's reason.
        listed_in: where the full list lives, for the warning ("bad.csv in the cache folder", ...).
    Returns:
        The rows that are served, in manifest order.
    """
    if len(bad) == 0:
        return manifest
    bad_paths = set(bad["path"])
    drop = manifest["path"].map(lambda p: str(p) in bad_paths).to_numpy(dtype=bool)
    if not drop.any():
        return manifest
    names = manifest["path"][drop].astype(str).tolist()
    shown = "; ".join(names[:_NAMED]) + (f"; and {len(names) - _NAMED} more" if len(names) > _NAMED else "")
    warnings.warn(f"{len(names)} of {len(manifest)} images could not be decoded and are left out of the batches "
                  f"(listed in {listed_in}): {shown}", BadImageWarning, stacklevel=stacklevel)
    return manifest[~drop]


def ready_batch(augment, x: Tensor, *, generator: torch.Generator, channels_last: bool) -> Tensor:
    """A uint8 (B,1,S,S) batch already on the device -> the augmented, normalised float batch the model takes."""
    x = augment(x, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
