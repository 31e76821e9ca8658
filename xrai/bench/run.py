"""`python -m xrai bench`: the input paths side by side in one run, the model's ceiling, one prediction's latency.

Figures (docs/design.md, "bench JSON"), all from one run on one machine:
- ready_img_s: ready-to-train batches on the training device (decoded, resized, augmented, normalised,
  3 channels, channels_last), with nothing consuming them. "cached": rows gathered from the memmap,
  augmented on the device by GpuAugment; "classic" (the project's own): files decoded and letterboxed
  in 2 DataLoader workers, then the same GpuAugment; "seeds": the seed notebooks' loader as a second
  baseline, PIL + torchvision transforms per image (Resize, RandomCrop, RandomHorizontalFlip,
  RandomRotation, ToTensor, Normalize) in 2 workers, then copied to the device.
- feed_img_s: the host side alone, a sub-figure of the above: uint8 batches as the cached path's gather
  thread and the classic path's workers deliver them, before the device and the augmentation.
- train_img_s: forward + backward + optimizer step (AMP on CUDA, channels_last) fed by the cached and
  the classic path, and the ceiling: the same step on one batch already on the device.
- cache_build_img_s: the one-time decode into a fresh cache.
- predict_gradcam_ms: one 512 px image from file to probability and Grad-CAM, median and p90 after warm-up.
- scaling (with nproc): training img/s on 1 and on nproc processes (torchrun) and the scaling
  efficiency, from `xrai.bench.scaling` on the same cache.
- predict_ms: one decoded 512 px image to its probability on the CPU, no Grad-CAM: PyTorch (``preprocess``
  + the model) beside onnxruntime (the numpy contract + the model exported to ONNX, as ``serve --onnx``
  runs it), with the same number of threads; onnxruntime is null where it (or the exporter) is missing.

Each measurement is a function of a `BenchSetup` filling its own keys, so a new figure is one more
function and one more line in `run_bench`. `markdown_table` turns a saved JSON into the README's table
(it and `format_table` live in the torch-free `xrai.bench.report`, re-exported here).

`python -m xrai.bench.run --memory-gb 3.5` is the memory check: it writes a cache of that size and iterates
it, showing that anonymous memory (RssAnon) stays flat while the file's pages come and go.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile
from torch import nn
from torchvision import transforms

from xrai.bench.latency import cpu_predict_latency
from xrai.bench.memcheck import main as memcheck_main
from xrai.bench.memcheck import memory_check
from xrai.bench.report import LOADER_WORKERS, format_table, load_average, markdown_table
from xrai.bench.scaling import measure_scaling
from xrai.bench.timing import noop, rate, sync, timed_ms, train_step
from xrai.config import TrainConfig
from xrai.data import load
from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD, preprocess
from xrai.data.cache import ImageCache, build_cache, default_cache_dir
from xrai.data.dataset import ClassicBatches
from xrai.data.decode.images import TruncatedImageWarning, letterbox, read_image
from xrai.data.loader import CachedBatches
from xrai.env import backend_settings, cpu_count, get_device, list_gpus
from xrai.explain.cam import CamExplainer
from xrai.models.factory import create_model

__all__ = ["BenchSetup", "format_table", "machine_info", "markdown_table", "measure_latency", "measure_ready",
           "measure_training", "memory_check", "run_bench", "seeds_loader", "train_step"]


def machine_info() -> dict:
    """CPU model (from /proc/cpuinfo where there is one), usable cores and the first GPU's name or None."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus = list_gpus()
    return {"cpu": cpu, "cores": cpu_count(), "gpu": gpus[0].name if gpus else None}


# ---- the seeds' loader (the second baseline) ------------------------------------------------------


class _SeedDataset(torch.utils.data.Dataset):
    """The input path as the seed notebooks built it: PIL, RGB, torchvision transforms, per image."""

    def __init__(self, paths: list[str], labels: np.ndarray, img_size: int, resize: int) -> None:
        self.paths, self.labels = paths, labels.astype(np.float32)
        self.transform = transforms.Compose([
            transforms.Resize((resize, resize)), transforms.RandomCrop(img_size), transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(10), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), torch.tensor(self.labels[i])


def _allow_truncated(_worker_id: int) -> None:
    # The seeds set PIL's global switch to read truncated JPEGs (FracAtlas has 30); here it is set in the
    # loader's worker processes only, never in the caller's.
    ImageFile.LOAD_TRUNCATED_IMAGES = True


def seeds_loader(paths: list[str], labels: np.ndarray, *, img_size: int, resize: int,
                 batch_size: int) -> torch.utils.data.DataLoader:
    """The seed notebooks' DataLoader: shuffled, 2 workers, the last partial batch dropped."""
    return torch.utils.data.DataLoader(_SeedDataset(paths, labels, img_size, resize), batch_size=batch_size,
                                       shuffle=True, num_workers=LOADER_WORKERS, worker_init_fn=_allow_truncated,
                                       drop_last=True, persistent_workers=True,
                                       generator=torch.Generator().manual_seed(0))


# ---- the set-up every measurement shares ------------------------------------------------------------


@dataclass(kw_only=True)
class BenchSetup:
    """The data, the three loaders and the model a bench run measures, built once."""

    probe: Path  # one 512 px image file, the latency measurements' input
    cached: Any  # CachedBatches
    classic: Any  # ClassicBatches
    seeds: torch.utils.data.DataLoader
    model: nn.Module
    device: torch.device
    img_size: int
    resize: int
    batch_size: int
    n_train: int
    n_feed: int
    tmp: Path

    def on_device(self, batches: Iterator) -> Iterator:
        """The seeds' batches made ready as the other paths' are: on the device, channels_last."""
        for x, y in batches:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def measure_ready(bench: BenchSetup) -> dict:
    """ready_img_s (cached, classic, seeds) and feed_img_s (cached, classic: host side only)."""
    warm = LOADER_WORKERS + 1  # past the batches the workers decoded while starting up
    n, dev = bench.n_feed, bench.device
    ready = {"cached": rate(bench.cached.epoch, n, noop, dev, warm),
             "classic": rate(bench.classic.epoch, n, noop, dev, warm),
             "seeds": rate(lambda e: bench.on_device(iter(bench.seeds)), n, noop, dev, warm)}
    feed = {"cached": rate(bench.cached.host_batches, n, noop, dev, warm),
            "classic": rate(bench.classic.host_batches, n, noop, dev, warm)}
    return {"ready_img_s": ready, "feed_img_s": feed}


def measure_training(bench: BenchSetup) -> dict:
    """train_img_s: the training step fed by each path, and on one batch already on the device (ceiling)."""
    dev, n = bench.device, bench.n_train
    step = train_step(bench.model.train(), dev)
    fixed = (torch.randn(bench.batch_size, 3, bench.img_size, bench.img_size, device=dev)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, 2, (bench.batch_size,), device=dev).float())
    warm = 2 if dev.type == "cuda" else 1
    step(*fixed)  # one-time costs (allocator, oneDNN / cuDNN set-up) paid before any path is timed
    sources = {"cached": bench.cached.epoch, "classic": bench.classic.epoch,
               "ceiling": lambda e: iter([fixed] * (n + warm))}
    # Two rounds, alternating the paths, best of each: on a shared machine a burst of someone else's load
    # during one measurement would otherwise decide the comparison.
    rates = {name: 0.0 for name in sources}
    for _ in range(2):
        for name, make in sources.items():
            rates[name] = max(rates[name], rate(make, n, step, dev, warm))
    return {"train_img_s": rates}


def measure_latency(bench: BenchSetup, *, runs: int = 20) -> dict:
    """predict_gradcam_ms: the probe image file to probability + Grad-CAM (decode, letterbox, crop, forward,
    backward), median and p90 of `runs` after 3 warm-up runs (allocator, cuDNN autotune, grad-cam's hooks)."""
    model, device, last = bench.model.eval(), bench.device, {}
    with CamExplainer(model) as explainer:

        def once() -> float:
            x = preprocess([read_image(bench.probe)], image_size=bench.img_size, resize_size=bench.resize,
                           device=device)
            last["cam"] = explainer(x, target_class=1)
            probability = float(explainer.probabilities[0])
            sync(device)
            return probability

        sync(device)  # each call ends synced, so every timed call starts with the device idle
        ms = timed_ms(once, runs)
    if last["cam"].shape[0] != 1:
        raise RuntimeError(f"Grad-CAM gave an unexpected result: cam {last['cam'].shape}")
    return {"predict_gradcam_ms": ms}


def measure_cpu_predict(bench: BenchSetup, *, runs: int = 20, onnx: bool = True) -> dict:
    """predict_ms: the probe image to its probability on the CPU, PyTorch and onnxruntime."""
    image = read_image(bench.probe)
    return {"predict_ms": cpu_predict_latency(bench.model, image=image, image_size=bench.img_size,
                                              resize_size=bench.resize, runs=runs, onnx=onnx)}


# ---- the run ------------------------------------------------------------------------------------------


def run_bench(*, data: str = "synthetic", root: str | os.PathLike | None = None, model: str = "mobilenet_v2",
              img_size: int = 224, device: str = "auto", batch_size: int = 64, n_batches: int | None = None,
              json_path: str | os.PathLike | None = None, progress: bool = True,
              cache_dir: str | os.PathLike | None = None, latency_runs: int = 20, feed_batches: int = 20,
              onnx: bool = True, nproc: int | None = None) -> dict:
    """Measure the three loaders, the training step, the cache build and one prediction; print a table.

    Args:
        data, root: the dataset, as xrai.data.load takes them.
        model: a registered model name (built without pretrained weights: speed does not depend on them).
        img_size: the crop side fed to the model; the cache holds 8/7 of it, as training does.
        device: "auto", "cpu" or "cuda".
        batch_size: images per batch for every path.
        n_batches: timed batches per training measurement (default 30 on CUDA, 3 on a CPU, where
            mobilenet_v2 trains at a few tens of img/s at 224), best of two rounds.
        json_path: also write the result there.
        progress: progress bars for loading and the cache build.
        cache_dir: where the freshly built (and afterwards removed) cache goes; default under xrai_home().
        latency_runs: timed repetitions of the predict + Grad-CAM latency.
        feed_batches: timed batches per loader measurement (at least n_batches).
        onnx: time onnxruntime beside PyTorch in predict_ms (exports the model; needs ``xrai[onnx]``).
        nproc: also time training on 1 and on nproc processes (torchrun) and their scaling efficiency
            (`xrai.bench.scaling.measure_scaling`); the JSON then holds "scaling".
    Returns:
        The dict of docs/design.md's bench JSON.
    """
    dev = get_device(device)
    resize = TrainConfig(data=data, img_size=img_size).resize_size
    n_train = n_batches or (30 if dev.type == "cuda" else 3)
    manifest = load(data, root=root, progress=progress)
    result: dict = {"machine": machine_info(), "model": model, "img_size": img_size, "device": dev.type,
                    "data": f"{data}:{manifest.attrs.get('root', root)}", "batch_size": batch_size,
                    "images": len(manifest), "load_average": {"start": load_average()}}
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix="bench-", dir=base) as tmp, warnings.catch_warnings(),
          backend_settings(dev)):  # cuDNN autotuning as fit() trains
        # Expected here and counted in the cache's own tables; they would only bury the figures.
        warnings.simplefilter("ignore", TruncatedImageWarning)
        start = time.perf_counter()
        cache = build_cache(manifest, size=resize, cache_dir=tmp, progress=progress)
        result["cache_build_img_s"] = len(cache) / (time.perf_counter() - start)
        rows = manifest[~manifest["path"].isin(set(cache.bad["path"]))]  # every loader serves these
        bench = _setup(cache, rows, Path(tmp), model=model, device=dev, img_size=img_size, resize=resize,
                       batch_size=batch_size, n_train=n_train, n_feed=max(n_train, feed_batches), progress=progress)
        result.update(measure_ready(bench))
        result.update(measure_training(bench))
        result.update(measure_latency(bench, runs=latency_runs))
        result.update(measure_cpu_predict(bench, runs=latency_runs, onnx=onnx))
        if nproc:  # several processes, on the same cache
            result["scaling"] = measure_scaling(cache.path, rows, nproc=nproc, model=model, img_size=img_size,
                                                batch_size=batch_size, n_batches=n_train, device=dev.type)
        del bench, cache  # the memmap must be closed before its folder goes
    result["load_average"]["end"] = load_average()  # other jobs on the machine: the figures' context
    print(format_table(result))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _setup(cache: ImageCache, rows: pd.DataFrame, tmp: Path, *, model: str, device: torch.device, img_size: int,
           resize: int, batch_size: int, n_train: int, n_feed: int, progress: bool) -> BenchSetup:
    """The three loaders over `rows`, the model and the probe image (the first image, letterboxed to 512 px)."""
    probe = tmp / "probe512.png"  # the latency measurements' input
    Image.fromarray(letterbox(read_image(rows["path"].iloc[0]), 512)).save(probe)
    common = dict(image_size=img_size, batch_size=batch_size, train=True, seed=0, device=device, channels_last=True)
    return BenchSetup(
        probe=probe, cached=CachedBatches(cache, rows, **common),
        classic=ClassicBatches(rows, resize_size=resize, num_workers=LOADER_WORKERS, progress=progress, **common),
        seeds=seeds_loader(rows["path"].tolist(), rows["label"].to_numpy(), img_size=img_size, resize=resize,
                           batch_size=batch_size),
        model=create_model(model, pretrained=False).to(device).to(memory_format=torch.channels_last),
        device=device, img_size=img_size, resize=resize, batch_size=batch_size, n_train=n_train, n_feed=n_feed,
        tmp=tmp)


if __name__ == "__main__":  # the memory check (no timed test): python -m xrai.bench.run --memory-gb 3.5
    memcheck_main()
