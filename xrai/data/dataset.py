"""The classic input path: a torch Dataset over the manifest, decoded and augmented per image in workers.

Every random number an image sees comes from a seed derived from (seed, epoch, row index), and the
shuffle from (seed, epoch): so epoch k delivers the very same batches whether it runs first, after a
resume, with 0 or with 4 workers. That is what lets `train.fit` resume bit-exactly on a CPU.

Bad images: a file the safe decoder refuses (`ImageError`: empty, not an image, a decompression bomb)
does not stop a run. Its row stays in place (evaluation keeps one prediction per manifest row), the
image becomes black (all zero before normalisation, i.e. the X-ray background) and a
`BadImageWarning` naming the file and the reason is raised. The audit and the cache build list such
files up front; the cached path (`xrai.data.cache`) is the one to use on sets with many of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from xrai.data.images import ImageError, letterbox, read_image

__all__ = ["BadImageWarning", "ClassicBatches", "XrayDataset", "mix_seed"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageWarning(UserWarning):
    """An image could not be decoded; a black image stands in for it."""


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, index...), well mixed by numpy's SeedSequence."""
    entropy = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class XrayDataset(Dataset):
    """Manifest rows -> (image (3, image_size, image_size) float32 normalised, label float32).

    read_image -> letterbox(resize_size) -> train: RandomResizedCrop(scale 0.7-1), flip, rotation +-10
    degrees; eval: CenterCrop -> float in [0, 1] -> 3 channels -> ImageNet normalisation.

    An item key is a row index (epoch 0) or a tuple (epoch, row index); the augmentation of a row is a
    pure function of (seed, epoch, row index), whatever process or worker computes it.

    Args:
        manifest: rows with at least `path` and `label`.
        image_size: side of the crop fed to the model.
        resize_size: side images are letterboxed to before cropping.
        train: random augmentation (True) or a deterministic centre crop (False).
        seed: the run's seed.
    """

    def __init__(
        self, manifest: pd.DataFrame, *, image_size: int, resize_size: int, train: bool, seed: int = 0
    ) -> None:
        if resize_size < image_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        self.paths = [str(p) for p in manifest["path"]]
        self.labels = np.asarray(manifest["label"], dtype=np.float32)
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.train = bool(train)
        self.seed = int(seed)
        if self.train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(self.image_size, scale=(0.7, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.RandomRotation(10),
                ]
            )
        else:
            self.transform = v2.CenterCrop(self.image_size)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.paths[index]
        try:
            image = read_image(path)
        except ImageError as err:
            warnings.warn(f"{err}; a black image stands in for it", BadImageWarning, stacklevel=2)
            image = np.zeros((self.resize_size, self.resize_size), dtype=np.uint8)
        x = torch.from_numpy(letterbox(image, self.resize_size))[None]  # (1, R, R) uint8
        if self.train:
            # v2 draws from torch's global CPU generator; fork it so the augmentation depends on
            # (seed, epoch, index) alone and training's own draws (dropout) are left untouched.
            with torch.random.fork_rng(devices=[]):
                generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1, index))
                torch.set_rng_state(generator.get_state())
                x = self.transform(x)
        else:
            x = self.transform(x)
        x = x.to(torch.float32).div_(255.0)
        x = (x - self._mean) / self._std  # broadcasting the grey channel to 3
        return x, torch.tensor(self.labels[index])


class _EpochBatchSampler(Sampler):
    """Batches of (epoch, row index) keys: shuffled from (seed, epoch) in training, in order otherwise."""

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int, max_batches: int):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.max_batches = drop_last, max_batches
        self.epoch = 0

    def __len__(self) -> int:
        batches = self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches > 0 else batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        for b in range(len(self)):
            yield [(self.epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


class ClassicBatches:
    """BatchSource over image files: a DataLoader of `XrayDataset`, batches moved to the device.

    Training shuffles from (seed, epoch) and drops the last partial batch (a batch of one would break
    BatchNorm); evaluation keeps manifest order and every row. Workers are persistent (started once per
    source, not per epoch); their own seeds do not matter because every item reseeds from its key.

    Args:
        manifest: the rows to serve (one split).
        image_size, resize_size: as `XrayDataset`.
        batch_size: images per batch.
        train: shuffle + augment, or keep order + centre crop.
        seed: the run's seed.
        num_workers: DataLoader worker processes (0: decode in this process).
        device: where batches go (pinned memory and non-blocking copies on CUDA).
        channels_last: hand batches over in channels_last memory format.
        max_batches: cap on batches per epoch (0: no cap), for smoke runs.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        image_size: int,
        resize_size: int,
        batch_size: int,
        train: bool,
        seed: int,
        num_workers: int,
        device: torch.device | str,
        channels_last: bool = False,
        max_batches: int = 0,
    ) -> None:
        if len(manifest) == 0:
            raise ValueError("ClassicBatches got an empty manifest; check the split and body-part filter")
        self.dataset = XrayDataset(manifest, image_size=image_size, resize_size=resize_size, train=train, seed=seed)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.seed = seed
        drop_last = train and len(manifest) >= batch_size
        self.sampler = _EpochBatchSampler(
            len(manifest), batch_size=batch_size, shuffle=train, drop_last=drop_last, seed=seed, max_batches=max_batches
        )
        self._generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            generator=self._generator,  # without it the loader would draw its base seed from global RNG
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch `epoch` as (x (B,3,H,W) float32, y (B,) float32) on the device."""
        self.sampler.epoch = int(epoch)
        self._generator.manual_seed(mix_seed(self.seed, epoch, 2))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield x, y.to(self.device, non_blocking=True)
