"""The bench's timing pieces, shared by ``xrai.bench.run``, ``xrai.bench.scaling`` and ``xrai.bench.latency``:
batches over as many epochs as it takes, images/s of a step over them, the training step the bench times,
and median / p90 milliseconds of a call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from xrai.env import autocast_dtype

__all__ = ["batches", "noop", "rate", "sync", "timed_images", "timed_ms", "train_step"]


def batches(make_epoch: Callable[[int], Iterator], n: int) -> Iterator:
    """n batches, running through as many epochs as that takes."""
    epoch, count = 0, 0
    while count < n:
        got = False
        for batch in make_epoch(epoch):
            got = True
            yield batch
            count += 1
            if count == n:
                return
        if not got:
            raise ValueError("the benchmark's data gives no batch; use a smaller batch_size")
        epoch += 1


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_images(make_epoch: Callable[[int], Iterator], n: int, step: Callable, device: torch.device,
                 warmup: int) -> tuple[int, float]:
    """(images, seconds) of `step` over n batches after `warmup` untimed ones (worker start-up, allocator,
    autotuning)."""
    images, start = 0, None
    for i, (x, y) in enumerate(batches(make_epoch, warmup + n)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step(x, y)
        if i >= warmup:
            images += len(y)
    sync(device)
    if start is None or images == 0:
        raise ValueError("too few batches to time; lower batch_size or raise n_batches")
    return images, time.perf_counter() - start


def rate(make_epoch: Callable[[int], Iterator], n: int, step: Callable, device: torch.device, warmup: int) -> float:
    """Images/s over n batches after `warmup` untimed ones."""
    images, seconds = timed_images(make_epoch, n, step, device, warmup)
    return images / seconds


def noop(x: torch.Tensor, y: torch.Tensor) -> None:
    """Consume nothing: the loader's rate alone."""


def train_step(model: nn.Module, device: torch.device) -> Callable:
    """step(x, y): one AdamW step of `model` on a batch (AMP on CUDA), as the bench times training."""
    dtype = autocast_dtype(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.BCEWithLogitsLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x).reshape(-1).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed_ms(predict: Callable[[], float], runs: int) -> dict:
    """Median and p90 ms of ``predict()`` after 3 warm-up calls; checks it returns a probability."""
    times = []
    for i in range(3 + runs):
        start = time.perf_counter()
        probability = predict()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
    if not 0.0 <= probability <= 1.0:
        raise RuntimeError(f"the latency probe gave a probability of {probability}")
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90))}
