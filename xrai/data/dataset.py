"""The classic input path: image files decoded and letterboxed in DataLoader workers, then augmented as a batch.

The workers only do what needs the files: `read_image` + `letterbox` to uint8 (1, R, R), exactly what the
cache stores. The batch then goes through the same `GpuAugment`, with the same per-epoch random streams
and the same batch order, as the cached path (`xrai.data.batches`): the two paths differ only in where
the uint8 pixels come from, so a config trains the same model whichever path `input_path="auto"` picks.

Bad images: every file is decoded once before the first batch (`find_bad_images`, in the workers) and
the unreadable ones are dropped and named in one `BadImageWarning`, as the cached path drops the files
its build listed in bad.csv; so both paths batch the very same rows. Truncated JPEGs (decoded as far as
their data goes) are counted there too and said in one line, or counted into the caller's
`DamagedImages` (training says its run's line).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from xrai.data.augment import GpuAugment
from xrai.data.batches import (
    AUGMENT_STREAM,
    BadImageWarning,
    EpochPlan,
    drop_bad_images,
    epoch_generator,
    ready_batch,
)
from xrai.data.cache import damaged_line
from xrai.data.decode.images import DamagedImages, ImageError, fit_square, read_image

__all__ = ["BadImageWarning", "ClassicBatches", "XrayDataset", "find_bad_images"]

_PROBE_BATCH = 16  # files per worker task while checking: amortises the inter-process hand-over


class XrayDataset(Dataset):
    """Manifest rows -> (uint8 (1, resize_size, resize_size) letterboxed image, float32 label).

    The same pixels the cache holds for the row (`read_image` then `letterbox`); augmentation and
    normalisation happen on the whole batch afterwards (`GpuAugment`).

    Raises (on access):
        ImageError: the file cannot be decoded (ClassicBatches drops such files before batching, so
            this only fires for a file that broke during the run).
    """

    def __init__(self, manifest: pd.DataFrame, *, resize_size: int, resize: str = "letterbox") -> None:
        if resize_size < 1:
            raise ValueError(f"resize_size must be >= 1, got {resize_size}")
        self.paths = [str(p) for p in manifest["path"]]
        self.labels = np.asarray(manifest["label"], dtype=np.float32)
        self.resize_size = int(resize_size)
        self.resize = resize  # "letterbox" or "stretch" (xrai.data.decode.images.fit_square)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # a truncated file was counted and said once, by find_bad_images: no warning per epoch from here
        image = fit_square(read_image(self.paths[index], damaged=DamagedImages()), self.resize_size, self.resize)
        return torch.from_numpy(image)[None], torch.tensor(self.labels[index])


@dataclass
class _Notes:
    """What ``read_image(damaged=)`` needs in a worker: the truncation notes of one file, sent back to be
    counted by the caller (a DamagedImages holds a lock, which does not pickle)."""

    notes: list[str] = field(default_factory=list)

    def add(self, path: str, problem: str, reason: str) -> None:
        self.notes.append(reason)


class _Probe(Dataset):
    """Decode one file; return (index, reason or "", its truncation notes) for find_bad_images."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        truncated = _Notes()
        try:
            read_image(self.paths[index], damaged=truncated)
            reason = ""
        except (ImageError, OSError) as err:  # OSError: missing or unreadable, as the cache build counts it
            reason = str(err)
        return index, reason, truncated.notes


def find_bad_images(paths: Sequence[str], *, num_workers: int = 0, progress: bool = True,
                    damaged: DamagedImages | None = None) -> pd.DataFrame:
    """Decode every file once (in `num_workers` processes) and list those the safe decoder refuses.

    The same test the cache build applies (`read_image` raising ImageError or OSError). Truncated JPEGs
    (which still count as good) are said in ONE warning, naming the first few (each at DEBUG on
    ``xrai.data.decode``: the CLI's -v), or, with ``damaged``, counted into it with the unreadable files
    and not said (the caller says one line).

    Returns:
        DataFrame with columns path, reason, in input order.
    """
    paths = [str(p) for p in paths]
    if not paths:
        return pd.DataFrame({"path": [], "reason": []}, dtype=str)
    loader = DataLoader(_Probe(paths), batch_size=_PROBE_BATCH, num_workers=num_workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))  # never draw a base seed from global RNG
    bad, counted = [], DamagedImages() if damaged is None else damaged
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar:
        for chunk in loader:
            for index, reason, notes in chunk:
                if reason:
                    bad.append((paths[index], reason))
                    if damaged is not None:
                        damaged.add(paths[index], "unreadable", reason)
                for note in notes:
                    counted.add(paths[index], "truncated", note)
            bar.update(len(chunk))
    if damaged is None:
        _say_truncated(counted, len(paths), stacklevel=3)
    return pd.DataFrame(bad, columns=["path", "reason"])


def _say_truncated(damaged: DamagedImages, total: int, *, stacklevel: int) -> None:
    """One warning naming the truncated images among `total` (the unreadable ones have their own)."""
    truncated = [entry for entry in damaged.entries() if entry[1] == "truncated"]
    if line := damaged_line(truncated, total):
        warnings.warn(line, UserWarning, stacklevel=stacklevel)


class _EpochBatchSampler(Sampler):
    """The row positions of each batch of epoch `epoch` (set before each pass), as `plan` fixes them."""

    def __init__(self, plan: EpochPlan) -> None:
        self.plan = plan
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[int]]:
        for positions in self.plan.positions(self.epoch):
            yield positions.tolist()


class ClassicBatches:
    """BatchSource over image files: workers decode + letterbox, the batch is augmented on the device.

    Same rows, batches, order and augmentation as `CachedBatches` on the same manifest and seed (see
    `xrai.data.batches`). Workers are persistent (started once per source, not per epoch); their seeds
    do not matter because nothing random happens in them.

    Args:
        manifest: the rows to serve (one split); unreadable files are dropped (`bad` lists them).
        image_size: side of the crop fed to the model.
        resize_size: side images are letterboxed to before cropping (the cache's size).
        batch_size: images per batch.
        train: shuffle + random augmentation, or manifest order + centre crop.
        seed: the run's seed.
        num_workers: DataLoader worker processes (0: decode in this process).
        device: where batches go (pinned memory and non-blocking copies on CUDA).
        channels_last: hand batches over in channels_last memory format.
        max_batches: cap on batches per epoch (0: no cap), for smoke runs.
        progress: a progress bar while the files are checked.
        rank, world_size: serve rank `rank`'s shard of every global batch of `batch_size` (torchrun).
        resize: how files become squares, "letterbox" or "stretch" (as the cache; TrainConfig.resize).
        augment: GpuAugment's training ranges (``xrai.data.augment.augment_options``); None: its defaults.
        damaged: where the unreadable and truncated files are counted for the caller's one line (the
            unreadable ones are still named in the BadImageWarning); None: the truncated ones are said
            in one warning of their own.
    Raises:
        ValueError: an empty manifest, resize_size < image_size, or no readable image.
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
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        resize: str = "letterbox",
        augment: dict | None = None,
        damaged: DamagedImages | None = None,
    ) -> None:
        if len(manifest) == 0:
            raise ValueError("ClassicBatches got an empty manifest; check the split and body-part filter")
        if resize_size < image_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        counted = DamagedImages() if damaged is None else damaged
        self.bad = find_bad_images(manifest["path"], num_workers=num_workers, progress=progress, damaged=counted)
        if len(self.bad) == len(manifest):
            raise ValueError(f"none of the {len(manifest)} images can be decoded (first: {self.bad['reason'].iloc[0]}); "
                             "check the dataset folder")
        self.manifest = drop_bad_images(manifest, self.bad, listed_in="this source's `bad` table")
        if damaged is None:  # the truncated ones (still served) in one line too; with `damaged`, the caller's
            _say_truncated(counted, len(manifest), stacklevel=3)
        self.plan = EpochPlan(len(self.manifest), batch_size, bool(train), int(seed), max_batches, int(rank),
                              int(world_size))
        self.dataset = XrayDataset(self.manifest, resize_size=resize_size, resize=resize)
        self.device = torch.device(device)
        self.channels_last, self.seed, self.train = channels_last, int(seed), bool(train)
        self.rank, self.world_size = int(rank), int(world_size)
        self.augment = GpuAugment(image_size, train=train, **(augment or {})).to(self.device)
        self.sampler = _EpochBatchSampler(self.plan)
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(0),  # without one the loader draws a base seed from global RNG
        )

    def __len__(self) -> int:
        return len(self.plan)

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """Positions (into `manifest`) of every batch of the epoch (this rank's shards), in order."""
        return self.plan.positions(epoch)

    def host_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The host side alone: uint8 (B,1,R,R) and float32 (B,) batches as the workers deliver them."""
        self.sampler.epoch = int(epoch)
        yield from self.loader

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x float32 (B,3,H,W) normalised, y float32 (B,)) on the device, for one epoch."""
        generator = epoch_generator(self.seed, epoch, AUGMENT_STREAM, self.rank)
        for x, y in self.host_batches(epoch):
            x = x.to(self.device, non_blocking=True)
            yield (ready_batch(self.augment, x, generator=generator, channels_last=self.channels_last),
                   y.to(self.device, non_blocking=True))
