"""The cached path's memory check: iterate a cache far larger than a batch and watch anonymous memory.

`python -m xrai.bench.run --memory-gb 3.5` (or `python -m xrai.bench.memcheck`) writes a cache of that size and
iterates it with CachedBatches on the CPU: the memmap's pages are file-backed (RssFile, which the kernel
drops under pressure), while RssAnon (the heap: batches, tensors) must stay flat whatever the cache's size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from xrai.data.cache import complete_cache_folder, default_cache_dir
from xrai.data.loader import CachedBatches

__all__ = ["memory_check"]


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

    The start figures are taken after the first batch, once one-time allocations (the prefetch thread,
    the first buffers) are made; the growth after that is what a larger cache could make worse.

    Returns:
        cache_gb, images, batches, and RssAnon / RssFile in MiB: start, peak, growth.
    """
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
        cache = complete_cache_folder(folder, paths, size=size, key="memcheck")
        manifest = pd.DataFrame({"path": paths, "label": np.arange(n) % 2})
        source = CachedBatches(cache, manifest, image_size=image_size, batch_size=batch_size, train=True, seed=0,
                               device="cpu", max_batches=max_batches)
        start: dict[str, float] = {}
        peak: dict[str, float] = {}
        for i, _ in enumerate(tqdm(source.epoch(0), total=len(source), desc="iterating", disable=not progress)):
            now = _status_mb()
            if i == 0:
                start, peak = now, dict(now)
            for key, value in now.items():
                peak[key] = max(peak[key], value)
        batches = len(source)
        del source, cache  # the memmap must be closed before its folder goes
    growth = peak["RssAnon"] - start["RssAnon"] if "RssAnon" in start else None
    return {"cache_gb": n * size * size / 1e9, "images": n, "batches": batches,
            "rss_anon_mb_start": start.get("RssAnon"), "rss_anon_mb_peak": peak.get("RssAnon"),
            "rss_anon_mb_growth": growth, "rss_file_mb_start": start.get("RssFile"),
            "rss_file_mb_peak": peak.get("RssFile"), "vm_hwm_mb": peak.get("VmHWM")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xrai.bench.run", description=memory_check.__doc__.split("\n")[0])
    parser.add_argument("--memory-gb", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-batches", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(memory_check(gb=args.memory_gb, size=args.size, image_size=args.image_size,
                                  max_batches=args.max_batches), indent=2))


if __name__ == "__main__":
    main()
