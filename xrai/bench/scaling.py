"""`python -m xrai bench --nproc N`: training images/s on 1 and on N processes, and the scaling efficiency.

Both figures come from the same loop: the cached input path (CachedBatches, this rank's shard of every
global batch) feeding the bench's training step (AdamW, AMP on CUDA, channels_last), wrapped in
DistributedDataParallel with SyncBatchNorm as fit() trains. Each process keeps the bench's batch: the
N-process run's global batch is N x batch_size (weak scaling, the usual reading of "efficiency"), so
the work per device is the same in both runs. 1 process runs here; N processes run under torchrun
(``python -m xrai.train.launcher ... -m xrai.bench.scaling``), each timing the same steps, and rank 0 reports every
rank's images over the slowest rank's seconds.

    efficiency = N-process img/s / (N x 1-process img/s)

On one GPU per process this says how much of the extra hardware turns into speed (gradient all-reduce,
SyncBatchNorm, the host feeding N devices). On a CPU one core stands for one device (one thread per
process, in both runs), and the processes share the machine with everything else, so the figure is
reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from xrai.bench.report import scaling_lines
from xrai.bench.timing import timed_images, train_step
from xrai.data.cache import ImageCache
from xrai.data.loader import CachedBatches
from xrai.env import backend_settings
from xrai.models.factory import create_model
from xrai.train import distributed
from xrai.train.launcher import run_torchrun, torchrun_command

__all__ = ["measure_scaling", "scaling_lines", "train_rate"]


def train_rate(cache_path: str | os.PathLike, rows: pd.DataFrame, *, model: str, img_size: int, batch_size: int,
               n_batches: int, device: str, warmup: int = 2) -> dict:
    """Images/s of the training loop on this process's share (all ranks' images / the slowest rank's time).

    Under torchrun every rank calls it alike; alone it is the 1-process figure.

    Args:
        cache_path: an ImageCache folder holding `rows`.
        rows: path and label of the images to train on.
        batch_size: images per process and step.
        n_batches: timed steps after `warmup` untimed ones.
    """
    ctx = distributed.init(device)
    source = CachedBatches(ImageCache.open(cache_path), rows, image_size=img_size,
                           batch_size=batch_size * ctx.world_size, train=True, seed=0, device=ctx.device,
                           channels_last=True, rank=ctx.rank, world_size=ctx.world_size)
    torch.manual_seed(0)
    net = create_model(model, pretrained=False).to(ctx.device).to(memory_format=torch.channels_last).train()
    step = train_step(ctx.wrap(net), ctx.device)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu":
        # One core stands for one device: one thread in every process, the 1-process run included (as
        # torchrun gives its CPU workers). Two threads in one process on shared cores can also stall at
        # every convolution (1 img/s against 61 with one thread, measured on the 2-core development machine).
        torch.set_num_threads(1)
    try:
        with backend_settings(ctx.device):  # cuDNN autotuning, as fit() and the rest of the bench train
            images, seconds = timed_images(source.epoch, n_batches, step, ctx.device, warmup)
    finally:  # the 1-process run is the caller's own process: give its threads back, whatever happened
        torch.set_num_threads(threads)
    totals = ctx.reduce_train_stats({"train_loss": 0.0, "images": images, "seconds": seconds})
    return {"img_s": totals["images"] / totals["seconds"], "images": totals["images"], "seconds": totals["seconds"],
            "processes": ctx.world_size}


def measure_scaling(cache_path: str | os.PathLike, rows: pd.DataFrame, *, nproc: int, model: str, img_size: int,
                    batch_size: int, n_batches: int, device: str) -> dict:
    """train_rate on 1 process (here) and on `nproc` (torchrun), and the efficiency.

    Returns:
        {"nproc", "per_process_batch", "img_s_1", "img_s_n", "efficiency"}.
    Raises:
        LaunchError: the torchrun run failed (one line).
    """
    one = train_rate(cache_path, rows, model=model, img_size=img_size, batch_size=batch_size, n_batches=n_batches,
                     device=device)
    with tempfile.TemporaryDirectory(prefix="xrai-scaling-") as tmp:
        rows_csv, out = Path(tmp) / "rows.csv", Path(tmp) / "rate.json"
        rows[["path", "label"]].to_csv(rows_csv, index=False)
        run_torchrun(torchrun_command(nproc, ["-m", "xrai.bench.scaling", "--cache", str(cache_path), "--rows",
                                              str(rows_csv), "--model", model, "--img-size", str(img_size),
                                              "--batch-size", str(batch_size), "--n-batches", str(n_batches),
                                              "--device", device, "--json", str(out)]))
        many = json.loads(out.read_text())
    return {"nproc": nproc, "per_process_batch": batch_size, "img_s_1": one["img_s"], "img_s_n": many["img_s"],
            "efficiency": many["img_s"] / (nproc * one["img_s"])}


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m xrai.bench.scaling", description="one rank of the scaling bench")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--n-batches", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    rows = pd.read_csv(args.rows, dtype={"path": str})
    rate = train_rate(args.cache, rows, model=args.model, img_size=args.img_size, batch_size=args.batch_size,
                      n_batches=args.n_batches, device=args.device)
    if distributed.init(args.device).is_main:  # the context train_rate ran in (torchrun's RANK, checked)
        Path(args.json).write_text(json.dumps(rate))
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
