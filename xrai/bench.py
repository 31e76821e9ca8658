"""`python -m xrai bench`: the cached input path against the classic one, the model's ceiling, and the
latency of one prediction with its Grad-CAM, measured side by side in one run.

Figures (DESIGN.md, "bench JSON"):
- feed_img_s: images/s the host delivers as batches ready for the device. Cached: rows gathered from the
  memmap into (pinned) uint8 batches; augmentation then runs on the device. Classic: the seeds' loader,
  PIL open + convert("RGB") + Resize + ToTensor + Normalize in a DataLoader with 2 workers, as on Colab.
- train_img_s: forward + backward + optimizer step (AMP on CUDA, channels_last) fed by each path, and
  the ceiling: the same step on a batch already on the device.
- cache_build_img_s: the one-time decode into a fresh cache.
- predict_gradcam_ms: one 512 px image from file to probability and Grad-CAM, median and p90 after
  warm-up.
- predict_ms: one decoded 512 px image to its probability on the CPU, no Grad-CAM: PyTorch
  (``preprocess`` + the model) beside onnxruntime (the numpy contract + the model exported to ONNX,
  as ``serve --onnx`` runs it), with the same number of threads; onnxruntime is null where it (or
  the exporter) is not installed.

`python -m xrai.bench --memory-gb 3.5` is the memory check: it writes a cache of that size and iterates
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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xrai.env import autocast_dtype, cpu_count, get_device, list_gpus

__all__ = ["machine_info", "memory_check", "run_bench"]

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


class _SeedDataset(torch.utils.data.Dataset):
    """The classic path exactly as the seed notebooks built it: PIL, torchvision transforms, per image."""

    def __init__(self, paths: list[str], labels: np.ndarray, img_size: int) -> None:
        from torchvision import transforms

        self.paths, self.labels = paths, labels.astype(np.float32)
        self.transform = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor(),
                                             transforms.Normalize(_MEAN, _STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), torch.tensor(self.labels[i])


def _allow_truncated(_worker_id: int) -> None:
    # The seeds set PIL's global switch to read truncated JPEGs (FracAtlas has 30); here it is set in the
    # loader's worker processes only, never in the caller's.
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True


def _seed_loader(paths, labels, img_size: int, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_SeedDataset(paths, labels, img_size), batch_size=batch_size, shuffle=True,
                                       num_workers=2, worker_init_fn=_allow_truncated, drop_last=True,
                                       generator=torch.Generator().manual_seed(0))


def _batches(make_epoch: Callable[[int], Iterator], n: int) -> Iterator:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(batches: Iterator, n: int, step: Callable, device: torch.device, warmup: int = 1) -> float:
    """Images/s over n batches after `warmup` untimed ones; step(x, y) consumes one batch."""
    images, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        step(x, y)
        if i >= warmup:
            images += len(y)
        if i + 1 >= warmup + n:
            break
    _sync(device)
    if start is None or images == 0:
        raise ValueError("too few batches to time; lower batch_size or raise n_batches")
    return images / (time.perf_counter() - start)


def _train_step(model: nn.Module, device: torch.device, channels_last: bool) -> Callable:
    dtype = autocast_dtype(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.BCEWithLogitsLoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x).reshape(-1).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def run_bench(
    *,
    data: str = "synthetic",
    root: str | os.PathLike | None = None,
    model: str = "mobilenet_v2",
    img_size: int = 224,
    device: str = "auto",
    batch_size: int = 64,
    n_batches: int | None = None,
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    latency_runs: int = 20,
    onnx: bool = True,
) -> dict:
    """Measure both input paths, the model's ceiling and one prediction with Grad-CAM; print a table.

    Args:
        data, root: the dataset, as xrai.data.load takes them.
        model: a registered model name (built without pretrained weights: speed does not depend on them).
        img_size: the crop side fed to the model; the cache holds 8/7 of it, as training does.
        device: "auto", "cpu" or "cuda".
        batch_size: images per batch for every path.
        n_batches: timed batches per training measurement (default 30 on CUDA, 3 on a CPU, where
            mobilenet_v2 trains at a few tens of img/s at 224), best of two rounds; feed rates time at
            least 20.
        json_path: also write the result there.
        progress: progress bars for loading and the cache build.
        cache_dir: where the freshly built (and afterwards removed) cache goes; default under xrai_home().
        latency_runs: timed repetitions of the predict + Grad-CAM latency.
        onnx: time onnxruntime beside PyTorch (exports the model to ONNX; needs ``xrai[onnx]``).
    Returns:
        The dict of DESIGN.md's bench JSON.
    """
    from xrai.config import TrainConfig
    from xrai.data import load
    from xrai.data.cache import default_cache_dir

    dev = get_device(device)
    resize = TrainConfig(data=data, img_size=img_size).resize_size
    n_train = n_batches or (30 if dev.type == "cuda" else 3)
    manifest = load(data, root=root, progress=progress)
    result: dict = {"machine": machine_info(), "model": model, "img_size": img_size, "device": dev.type,
                    "data": f"{data}:{manifest.attrs.get('root', root)}"}
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    old_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as fit() trains; put back afterwards
    try:
        augmented = _measure(result, manifest, model=model, img_size=img_size, resize=resize, dev=dev,
                             batch_size=batch_size, n_train=n_train, base=base, progress=progress,
                             latency_runs=latency_runs, onnx=onnx)
    finally:
        torch.backends.cudnn.benchmark = old_benchmark
    print(format_table(result, n_images=len(manifest), batch_size=batch_size, augmented=augmented))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure(result: dict, manifest, *, model: str, img_size: int, resize: int, dev: torch.device,
             batch_size: int, n_train: int, base: Path, progress: bool, latency_runs: int, onnx: bool) -> float:
    """Fill `result` with the figures; return the cached feed rate including augmentation (table only)."""
    from xrai.data.cache import build_cache
    from xrai.data.loader import CachedBatches
    from xrai.data.images import TruncatedImageWarning, read_image
    from xrai.models import create_model

    n_feed = max(n_train, 20)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=base) as tmp, warnings.catch_warnings():
        # Expected here and counted in the cache's own tables; they would only bury the figures.
        warnings.simplefilter("ignore", TruncatedImageWarning)
        start = time.perf_counter()
        cache = build_cache(manifest, size=resize, cache_dir=tmp, progress=progress)
        result["cache_build_img_s"] = len(cache) / (time.perf_counter() - start)
        ok = manifest[~manifest["path"].isin(set(cache.bad["path"]))]
        cached = CachedBatches(cache, ok, image_size=img_size, batch_size=batch_size, train=True, seed=0,
                               device=dev, channels_last=True)
        classic = _seed_loader(ok["path"].tolist(), ok["label"].to_numpy(), img_size, batch_size)
        noop = lambda x, y: None  # noqa: E731 - the feed rate is the loader alone
        result["feed_img_s"] = {"cached": _rate(_batches(cached.host_batches, n_feed + 1), n_feed, noop, dev),
                                "classic": _rate(_batches(lambda e: iter(classic), n_feed + 1), n_feed, noop, dev)}
        # Not in the JSON (DESIGN.md fixes its keys), only in the table: the cached path including its
        # augmentation on the device, i.e. what a training step is actually fed at on this device.
        augmented = _rate(_batches(cached.epoch, n_feed + 1), n_feed, noop, dev)
        net = create_model(model, pretrained=False).to(dev).to(memory_format=torch.channels_last).train()
        step = _train_step(net, dev, channels_last=True)
        fixed_x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
        fixed = (fixed_x.contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 2, (batch_size,), device=dev).float())
        warm = 2 if dev.type == "cuda" else 1
        step(*fixed)  # one-time costs (allocator, oneDNN / cuDNN set-up) paid before any path is timed
        sources = {"cached": cached.epoch, "classic": lambda e: iter(classic),
                   "ceiling": lambda e: iter([fixed] * (n_train + warm))}
        # Two rounds, alternating the paths, best of each: on a shared machine a burst of someone else's
        # load during one measurement would otherwise decide the comparison.
        result["train_img_s"] = {name: 0.0 for name in sources}
        for _ in range(2):
            for name, make in sources.items():
                rate = _rate(_batches(make, n_train + warm), n_train, step, dev, warm)
                result["train_img_s"][name] = max(result["train_img_s"][name], rate)
        result["predict_gradcam_ms"] = _latency(net.eval(), paths=ok["path"].tolist(), image_size=img_size,
                                                resize_size=resize, device=dev, runs=latency_runs, tmp=Path(tmp))
        result["predict_ms"] = cpu_predict_latency(net, image=read_image(Path(tmp) / "probe512.png"),
                                                   image_size=img_size, resize_size=resize, runs=latency_runs,
                                                   onnx=onnx)
        del cached, cache  # the memmap must be closed before its folder goes
    return augmented


def _latency(model: nn.Module, *, paths: list[str], image_size: int, resize_size: int, device: torch.device,
             runs: int, tmp: Path) -> dict:
    """ms from a 512 px image file to probability + Grad-CAM (decode, letterbox, crop, forward, backward)."""
    from PIL import Image

    from xrai.data.augment import preprocess
    from xrai.data.images import letterbox, read_image
    from xrai.explain import CamExplainer

    probe = tmp / "probe512.png"
    Image.fromarray(letterbox(read_image(paths[0]), 512)).save(probe)
    times = []
    with CamExplainer(model) as explainer:
        for i in range(3 + runs):  # 3 warm-up runs (allocator, cuDNN autotune, grad-cam's hooks)
            _sync(device)
            start = time.perf_counter()
            x = preprocess([read_image(probe)], image_size=image_size, resize_size=resize_size, device=device)
            cam = explainer(x, target_class=1)
            probability = float(explainer.probabilities[0])
            _sync(device)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1000)
    if cam.shape[0] != 1 or not 0.0 <= probability <= 1.0:
        raise RuntimeError(f"Grad-CAM gave an unexpected result: cam {cam.shape}, probability {probability}")
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90))}


def cpu_predict_latency(model: nn.Module, *, image: np.ndarray, image_size: int, resize_size: int, runs: int,
                        onnx: bool = True, session=None) -> dict:
    """ms from a decoded image to its probability on the CPU: PyTorch, and onnxruntime on the same model.

    Args:
        model: the one-logit model (copied to the CPU; the original is left where it is).
        image: a decoded uint8 (H, W) image.
        image_size, resize_size: the preprocessing.
        runs: timed calls after 3 warm-up calls.
        onnx: also time onnxruntime (when installed); the model is exported to ONNX for it.
        session: an onnxruntime session of this very model (an export made elsewhere) instead.
    Returns:
        {"torch_cpu": {"median", "p90"}, "onnxruntime_cpu": {"median", "p90"} or None}.
    """
    import copy

    from xrai.data.augment import preprocess
    from xrai.data.contract import InputContract, prepare
    from xrai.export import CalibratedModel, example_batch, onnx_available, onnx_bytes

    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    wrapped = CalibratedModel(cpu_model).eval()

    def torch_once() -> float:
        x = preprocess([image], image_size=image_size, resize_size=resize_size)
        with torch.inference_mode():
            return float(wrapped(x)[1][0])

    out = {"torch_cpu": _timed(torch_once, runs), "onnxruntime_cpu": None}
    contract = InputContract(image_size=image_size, resize_size=resize_size)
    if session is None and onnx and onnx_available():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # like for like with PyTorch's threads
        session = ort.InferenceSession(onnx_bytes(wrapped, example_batch(contract, batch=2)), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    if session is not None:

        def onnx_once() -> float:
            return float(session.run(["probability"], {"input": prepare([image], contract)})[0][0])

        out["onnxruntime_cpu"] = _timed(onnx_once, runs)
    return out


def _timed(predict: Callable[[], float], runs: int) -> dict:
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


def format_table(result: dict, *, n_images: int | None = None, batch_size: int | None = None,
                 augmented: float | None = None) -> str:
    """The bench's small table."""
    m, feed, train = result["machine"], result["feed_img_s"], result["train_img_s"]
    head = f"{result['data']}" + (f" ({n_images:,} images)" if n_images else "")
    head += f", {result['model']} at {result['img_size']} px" + (f", batch {batch_size}" if batch_size else "")
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    lines = [head, f"device {result['device']}: {m['cpu']}, {m['cores']} cores{load}, GPU {m['gpu'] or 'none'}",
             f"{'images/s':<28}{'cached':>10}{'classic':>10}{'ratio':>8}",
             f"{'host feed (batches ready)':<28}{feed['cached']:>10,.0f}{feed['classic']:>10,.0f}"
             f"{feed['cached'] / feed['classic']:>7.1f}x",
             *([f"{'  + augment on ' + result['device']:<28}{augmented:>10,.0f}{'':>10}"
                f"{augmented / feed['classic']:>7.1f}x"] if augmented else []),
             f"{'training step fed by it':<28}{train['cached']:>10,.1f}{train['classic']:>10,.1f}"
             f"{train['cached'] / train['classic']:>7.1f}x",
             f"{'model-only ceiling':<28}{train['ceiling']:>10,.1f}"
             f"   (cached = {100 * train['cached'] / train['ceiling']:.0f}% of it)",
             f"{'cache build (one-time)':<28}{result['cache_build_img_s']:>10,.0f}",
             f"predict + Grad-CAM, one 512 px image: median {result['predict_gradcam_ms']['median']:.0f} ms, "
             f"p90 {result['predict_gradcam_ms']['p90']:.0f} ms"]
    cpu = result.get("predict_ms")
    if cpu:
        onnx = cpu.get("onnxruntime_cpu")
        lines.append(f"predict, one image, CPU: PyTorch median {cpu['torch_cpu']['median']:.1f} ms, onnxruntime "
                     + (f"median {onnx['median']:.1f} ms" if onnx else 'not timed (run_bench(onnx=False), or pip install "xrai[onnx]")'))
    return "\n".join(lines)


def _status_mb() -> dict[str, float]:
    """RssAnon, RssFile and VmHWM of this process in MiB (Linux /proc; empty elsewhere)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def memory_check(*, gb: float = 3.5, size: int = 256, image_size: int = 224, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, max_batches: int = 0, progress: bool = True) -> dict:
    """Iterate a cache of `gb` GB (written here, zeros, real blocks on disk) with CachedBatches on the CPU
    and sample this process's memory after every batch.

    The memmap's pages are file-backed: they count in RssFile and the kernel drops them under pressure,
    while RssAnon (the heap: batches, tensors, the model) must stay flat whatever the cache's size.

    Returns:
        cache_gb, images, batches, and the RssAnon / RssFile figures in MiB (start and peak).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from xrai.data.cache import CACHE_FORMAT, ImageCache, _write_meta, _write_tables, default_cache_dir
    from xrai.data.loader import CachedBatches
    from xrai.data.images import DECODER_VERSION

    n = int(gb * 1e9) // (size * size)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memcheck-", dir=base) as tmp:
        folder = Path(tmp)
        header = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        offset = header.offset
        del header
        chunk = np.zeros(64 * size * size, dtype=np.uint8).tobytes()
        with open(folder / "images.npy", "r+b") as f:  # real zero blocks, not a sparse hole
            f.seek(offset)
            for start in tqdm(range(0, n, 64), desc="writing a test cache", unit="batch", disable=not progress):
                f.write(chunk[: min(64, n - start) * size * size])
        paths = [f"/memcheck/{i:07d}.png" for i in range(n)]
        _write_tables(folder, [(p, 0, 0) for p in paths], [])
        _write_meta(folder, {"format": CACHE_FORMAT, "key": "memcheck", "size": size, "n": n, "n_bad": 0,
                             "decoder_version": DECODER_VERSION})
        cache = ImageCache.open(folder)
        manifest = pd.DataFrame({"path": paths, "label": np.arange(n) % 2})
        source = CachedBatches(cache, manifest, image_size=image_size, batch_size=batch_size, train=True, seed=0,
                               device="cpu", max_batches=max_batches)
        before = _status_mb()
        peak = dict(before)
        for _x, _y in tqdm(source.epoch(0), total=len(source), desc="iterating", disable=not progress):
            for key, value in _status_mb().items():
                peak[key] = max(peak.get(key, 0.0), value)
        del source, cache
    return {"cache_gb": n * size * size / 1e9, "images": n, "batches": int(np.ceil(n / batch_size)),
            "rss_anon_mb_start": before.get("RssAnon"), "rss_anon_mb_peak": peak.get("RssAnon"),
            "rss_file_mb_start": before.get("RssFile"), "rss_file_mb_peak": peak.get("RssFile"),
            "vm_hwm_mb": peak.get("VmHWM")}


if __name__ == "__main__":  # the memory check, which is no timed test: python -m xrai.bench --memory-gb 3.5
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xrai.bench", description=memory_check.__doc__.split("\n")[0])
    parser.add_argument("--memory-gb", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-batches", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(memory_check(gb=args.memory_gb, size=args.size, image_size=args.image_size,
                                  max_batches=args.max_batches), indent=2))
