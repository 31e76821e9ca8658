"""The cached input path's loader: batches gathered from an ImageCache memmap on a background thread
into (pinned, on CUDA) host buffers, copied to the device without blocking, and augmented there by
GpuAugment. Used by `fit()` whenever the cache fits the disk (`xrai.train.trainer.make_sources`). Rows, batches,
order and augmentation are those of the classic path (`xrai.data.batches`)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from xrai.data.augment import GpuAugment
from xrai.data.batches import (
    AUGMENT_STREAM,
    EpochPlan,
    drop_bad_images,
    epoch_generator,
    ready_batch,
)
from xrai.data.cache import ImageCache
from xrai.env import get_device

__all__ = ["CachedBatches"]


class CachedBatches:
    """BatchSource over an ImageCache: gather rows from the memmap on a background thread into pinned
    host memory, copy them to the device without blocking, and augment there with GpuAugment.

    The next batches are read while the current one trains (a prefetch thread; numpy's gather and the
    page-ins release the GIL). Rows, batches, their order and the augmentation's random stream are
    those `xrai.data.batches` fixes for both paths, so a resumed run replays epoch k exactly and the
    classic path on the same manifest gives the same batches. With world_size > 1 (torchrun) this is
    rank `rank`'s shard of every global batch of `batch_size`. Files in the cache's bad list (or not in
    the cache) are dropped with one BadImageWarning and listed in `bad`; `manifest` holds the rows that
    are served, in order.
    """

    prefetch = 2  # batches read ahead of the one training
    reuse_buffers = False  # on the CPU too (always on CUDA); lets the CPU-only tests cover the ring

    def __init__(self, cache: ImageCache, manifest: pd.DataFrame, *, image_size: int, batch_size: int,
                 train: bool, seed: int, device: torch.device | str, channels_last: bool = False,
                 max_batches: int = 0, rank: int = 0, world_size: int = 1, augment: dict | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        rows = cache.rows(manifest["path"])
        keep = rows >= 0
        if not keep.any():
            raise ValueError(f"none of the {len(manifest)} manifest images is usable in the cache at {cache.path}; "
                             "build the cache from this manifest with build_cache(manifest, size=...)")
        reasons = dict(zip(cache.bad["path"], cache.bad["reason"]))
        missing = [str(p) for p in manifest["path"][~keep]]
        self.bad = pd.DataFrame({"path": missing, "reason": [reasons.get(os.path.abspath(p), "not in the cache")
                                                             for p in missing]}, dtype=str)
        self.cache, self.manifest = cache, drop_bad_images(manifest, self.bad, listed_in=str(cache.path / "bad.csv"))
        self._rows = rows[keep]
        self._labels = torch.as_tensor(self.manifest["label"].to_numpy(dtype=np.float32))
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.device = get_device(device) if isinstance(device, str) else torch.device(device)
        self.channels_last = channels_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.plan = EpochPlan(len(self._rows), self.batch_size, self.train, self.seed, int(max_batches), self.rank,
                              self.world_size)
        self.augment = GpuAugment(image_size, train=train, **(augment or {})).to(self.device)

    def __len__(self) -> int:
        return len(self.plan)

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """Positions (into `manifest`) of every batch of the epoch (this rank's shards), in order."""
        return self.plan.positions(epoch)

    def host_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The host side alone: uint8 (B,1,S,S) and float32 (B,) batches as shipped to the device (pinned on
        CUDA). The tensors may be reused buffers, valid until the next-but-one batch is asked for."""
        with _Prefetcher(self, epoch) as batches:
            for slot, x, y in batches:
                yield x, y
                batches.release(slot)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x float32 (B,3,H,W) normalised, y float32 (B,)) on the device, for one epoch."""
        generator = epoch_generator(self.seed, epoch, AUGMENT_STREAM, self.rank)
        cuda = self.device.type == "cuda"
        with _Prefetcher(self, epoch) as batches:
            for slot, x, y in batches:
                if cuda:
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()  # the slot may be refilled once the copy out of it has run on the GPU
                    batches.release(slot, event)
                x = ready_batch(self.augment, x, generator=generator, channels_last=self.channels_last)
                if not cuda and slot is not None:  # a reused buffer: nothing the caller keeps may point into it
                    y = y.clone()
                    batches.release(slot)
                yield x, y


class _Prefetcher:
    """Background thread filling a ring of host buffers with the batches of one epoch, in order."""

    def __init__(self, source: CachedBatches, epoch: int) -> None:
        self.source = source
        self.positions = source.batch_positions(epoch)
        side, bs = source.cache.size, -(-source.batch_size // source.world_size)  # this rank's share
        self.slots: list[tuple[Tensor, Tensor]] = []
        # Reused pinned buffers on CUDA (pinning fresh memory every batch costs more than the copy); on
        # the CPU fresh arrays are as cheap, unless a test asks for the ring (reuse_buffers=True).
        pin = source.device.type == "cuda"
        if pin or source.reuse_buffers:
            self.slots = [(torch.empty((bs, 1, side, side), dtype=torch.uint8, pin_memory=pin),
                           torch.empty(bs, dtype=torch.float32, pin_memory=pin)) for _ in range(source.prefetch + 2)]
        self.free: queue.Queue = queue.Queue()
        for i in range(len(self.slots)):
            self.free.put((i, None))
        self.ready: queue.Queue = queue.Queue(maxsize=source.prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="xrai-cache-prefetch", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _wait(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            array, rows, labels = self.source.cache.array, self.source._rows, self.source._labels
            for positions in self.positions:
                slot = None
                if self.slots:
                    got = self._wait(self.free)
                    if got is None:
                        return
                    slot, event = got
                    if event is not None:
                        event.synchronize()
                b = len(positions)
                if slot is None:
                    x, y = torch.empty((b, 1, array.shape[1], array.shape[2]), dtype=torch.uint8), torch.empty(b)
                else:
                    x, y = self.slots[slot][0][:b], self.slots[slot][1][:b]
                out = x.numpy()[:, 0]
                # Gather in ascending rows (sequential disk reads), then put each row back in its place: the
                # batch keeps the order epoch_batches gave it, which pairs every image with the same
                # augmentation parameters as on the classic path.
                srt = np.argsort(rows[positions], kind="stable")
                out[srt] = np.take(array, rows[positions][srt], axis=0, mode="clip")
                y.copy_(labels[torch.from_numpy(positions)])
                if not self._put((slot, x, y)):
                    return
            self._put(None)
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put(e)

    def __iter__(self):
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, slot: int | None, event=None) -> None:
        if slot is not None:
            self.free.put((slot, event))
