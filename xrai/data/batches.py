"""What the two input paths share, so that they differ only in where the uint8 pixels come from.

Both batch sources (`xrai.data.dataset.ClassicBatches`: decode files in workers; `xrai.data.loader.
CachedBatches`: gather rows from a memmap) serve the same rows in the same batches, in the same order,
and hand every batch to the same `GpuAugment` with the same random stream:

- `epoch_batches`: the positions of each batch of one epoch. Training shuffles from (seed, epoch) and
  drops the last partial batch (a batch of one breaks BatchNorm) unless it is the only one; evaluation
  keeps manifest order and every row.
- `epoch_generator(seed, epoch, AUGMENT_STREAM)`: the CPU generator GpuAugment draws its parameters
  from, batch after batch.
- `drop_bad_images`: unreadable images are dropped before batching (never replaced by a black image)
  and named in one `BadImageWarning`.
- `ready_batch`: augment on the device, then the model's memory format.

Everything random derives from (seed, epoch) alone, so epoch k delivers the very same batches whether
it runs first or after a resume, on either path; `train.fit` relies on that for exact resume.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = [
    "AUGMENT_STREAM",
    "ORDER_STREAM",
    "BadImageWarning",
    "batch_count",
    "drop_bad_images",
    "epoch_batches",
    "epoch_generator",
    "ready_batch",
]

ORDER_STREAM, AUGMENT_STREAM = 0, 1  # the two random streams of an epoch: the shuffle, the augmentation
_NAMED = 10  # bad files named in the warning; the rest are counted (all are in the source's `bad` table)


class BadImageWarning(UserWarning):
    """Images could not be decoded; they were left out of the batches."""


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, epoch, stream), well mixed by numpy's SeedSequence."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def batch_count(n: int, batch_size: int, *, train: bool, max_batches: int = 0) -> int:
    """Batches per epoch: training drops the last partial batch unless it is the only one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = n // batch_size if train and n >= batch_size else -(-n // batch_size)
    return min(batches, max_batches) if max_batches > 0 else batches


def epoch_batches(n: int, batch_size: int, *, train: bool, seed: int, epoch: int,
                  max_batches: int = 0) -> list[np.ndarray]:
    """The row positions (0..n-1) of every batch of one epoch, in the order they are served."""
    if train:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, ORDER_STREAM)).numpy()
    else:
        order = np.arange(n)
    count = batch_count(n, batch_size, train=train, max_batches=max_batches)
    return [order[k * batch_size : (k + 1) * batch_size] for k in range(count)]


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
