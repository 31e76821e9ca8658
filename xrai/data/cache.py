"""Decode once: every manifest image letterboxed into one uint8 memmap on disk, and a loader that feeds it.

The classic path decodes and resizes every JPEG/PNG in every epoch, which on Colab's 2 vCPUs feeds a few
hundred images a second while a T4 wants more. Here each image is decoded once (`build_cache`), stored
as one (N, size, size) uint8 array, and every epoch only gathers rows from it (`CachedBatches`) and
ships uint8 to the device, where `GpuAugment` crops, flips, rotates, jitters and normalises whole
batches.

Images are letterboxed (aspect kept, black padding) rather than resized-and-cropped: X-ray background is
black, so padding adds no false anatomy, and long thin parts (fingers, forearms) are not cut away. The
classic dataset and single-image prediction letterbox the same way (`xrai.data.images.letterbox`).

A cache folder, `<cache_dir>/<size>px-<key>/`, holds images.npy, index.csv (path, file size, mtime, ok;
row i of images.npy is row i here), bad.csv (files that could not be decoded, with the reason) and
meta.json. The key hashes the sorted set of (absolute path, file size, mtime_ns) of the manifest's
images, the size, DECODER_VERSION and the folder format: it is independent of row order and split, so
re-splitting or reshuffling a manifest reuses the cache, and replacing or touching any file rebuilds it.
A complete cache of a superset of the images (all body parts, when one is asked for) is reused too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from xrai.data import images as _images
from xrai.data.augment import GpuAugment, preprocess
from xrai.env import cpu_count, get_device, xrai_home

__all__ = ["CacheSpaceError", "CachedBatches", "GpuAugment", "ImageCache", "build_cache", "cache_fits",
           "default_cache_dir", "preprocess"]

CACHE_FORMAT = 1  # bump when the folder layout changes; part of the key
_MARGIN_BYTES = 1 << 30  # keep 1 GiB (plus 10% of the cache) free for checkpoints and the rest of the run


class CacheSpaceError(OSError):
    """Not enough free disk for the cache; the message says how much is needed and where."""


def default_cache_dir() -> Path:
    return xrai_home() / "cache"


def cache_fits(n_images: int, size: int, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a cache of n_images at size x size fits the free disk under cache_dir, with a margin."""
    return _free_bytes(Path(cache_dir) if cache_dir else default_cache_dir()) > _needed_bytes(n_images, size)


def _needed_bytes(n_images: int, size: int) -> int:
    data = int(n_images) * int(size) ** 2
    return data + data // 10 + _MARGIN_BYTES


def _free_bytes(path: Path) -> int:
    path = path.absolute()
    while not path.exists():  # the cache folder may not exist yet: ask its nearest existing parent
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(kw_only=True)
class ImageCache:
    """A complete cache folder. `array` is the (N, size, size) uint8 memmap, opened read-only: reading
    pages in on demand, never the whole array into RAM (its pages are file-backed and reclaimable)."""

    path: Path
    key: str
    size: int
    paths: list[str]
    bad: pd.DataFrame = field(repr=False)  # columns path, reason
    built: bool = False  # True when this call decoded the images, False when it reused a cache

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageCache:
        """Open a cache folder; FileNotFoundError when it is missing or incomplete (no meta.json)."""
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            raise FileNotFoundError(f"{path} is not a complete xrai image cache (no valid meta.json); "
                                    "build one with xrai.data.cache.build_cache(manifest, size=...)")
        index = pd.read_csv(path / "index.csv", keep_default_na=False)
        bad = pd.read_csv(path / "bad.csv", keep_default_na=False, dtype=str)
        return cls(path=path, key=meta["key"], size=int(meta["size"]), paths=index["path"].tolist(), bad=bad)

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def array(self) -> np.ndarray:
        return np.load(self.path / "images.npy", mmap_mode="r")

    @cached_property
    def _row_of(self) -> dict[str, int]:
        skip = set(self.bad["path"])
        return {p: i for i, p in enumerate(self.paths) if p not in skip}

    def rows(self, paths: Sequence[str] | pd.Series) -> np.ndarray:
        """Row of each path in `array` (int64), -1 where the file is bad or not in this cache."""
        row_of = self._row_of
        return np.fromiter((row_of.get(os.path.abspath(p), -1) for p in paths), dtype=np.int64, count=len(paths))


def build_cache(
    manifest: pd.DataFrame | Sequence[str],
    *,
    size: int,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Decode every image of the manifest once into a letterboxed uint8 cache, or reuse a current one.

    Args:
        manifest: the manifest (its `path` column is used) or a list of paths.
        size: side of the cached squares (the config's resize_size; 256 for 224 crops).
        cache_dir: where caches live; default xrai_home()/"cache".
        workers: decoding processes (default: the CPUs this process may use; 1 decodes in-process).
        progress: show a tqdm bar while building.
    Returns:
        The ImageCache; `built` says whether this call decoded anything.
    Raises:
        CacheSpaceError: the disk under cache_dir has too little free space for a new cache.
    """
    if size < 1:
        raise ValueError(f"cache size must be >= 1, got {size}")
    paths = manifest["path"] if isinstance(manifest, pd.DataFrame) else manifest
    entries = _stat_entries(paths)
    if not entries:
        raise ValueError("build_cache got an empty manifest")
    key = _cache_key(entries, size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{size}px-{key[:20]}"
    found = _complete(final, key) or _find_superset(root, entries, size)
    if found is not None:
        return found
    _remove_dead_builds(root)
    if not cache_fits(len(entries), size, root):
        need, free = _needed_bytes(len(entries), size), _free_bytes(root)
        raise CacheSpaceError(
            f"an image cache of {len(entries):,} images at {size} px needs {need / 2**30:.1f} GiB free "
            f"(with margin) under {root}, but only {free / 2**30:.1f} GiB is free; free some disk, pass "
            "cache_dir= on a larger disk, or train with input_path='classic'"
        )
    # Build in a private folder and rename it into place only after meta.json (the completion marker)
    # is written: a build killed at any point leaves only a .build-* folder, which never reads as a cache.
    tmp = root / f".build-{key[:20]}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        bad = _fill(tmp, entries, size, workers=workers or cpu_count(), progress=progress)
        _write_tables(tmp, entries, bad)
        _write_meta(tmp, {"format": CACHE_FORMAT, "key": key, "size": size, "n": len(entries),
                          "n_bad": len(bad), "decoder_version": _images.DECODER_VERSION})
        if final.exists() and _complete(final, key) is None:
            shutil.rmtree(final)  # a damaged folder under our name: replace it
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if _complete(final, key) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = ImageCache.open(final)
    cache.built = True
    if len(cache.bad):
        warnings.warn(f"{len(cache.bad)} of {len(cache)} images could not be decoded; they are listed in "
                      f"{final / 'bad.csv'} and left out of training and evaluation batches", stacklevel=2)
    return cache


# ---- keying and finding caches ----------------------------------------------------------------


def _stat_entries(paths) -> list[tuple[str, int, int]]:
    """Sorted unique (absolute path, size, mtime_ns); (-1, -1) for a missing file (it becomes 'bad')."""
    out = []
    for p in sorted({os.path.abspath(os.fspath(p)) for p in paths}):
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return out


def _cache_key(entries: list[tuple[str, int, int]], size: int) -> str:
    h = hashlib.sha256(f"xrai-cache format={CACHE_FORMAT} size={size} decoder={_images.DECODER_VERSION}\n".encode())
    for p, n, t in entries:
        h.update(f"{p}\t{n}\t{t}\n".encode())
    return h.hexdigest()


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("decoder_version") != _images.DECODER_VERSION:
        return None
    return meta


def _complete(path: Path, key: str) -> ImageCache | None:
    meta = _read_meta(path)
    if meta is None or meta.get("key") != key:
        return None
    cache = ImageCache.open(path)
    if cache.array.shape != (meta["n"], meta["size"], meta["size"]):
        return None
    return cache


def _find_superset(root: Path, entries: list[tuple[str, int, int]], size: int) -> ImageCache | None:
    """A complete cache at this size holding every wanted file unchanged (e.g. all body parts)."""
    for folder in sorted(root.glob(f"{size}px-*")):
        meta = _read_meta(folder)
        if meta is None or meta.get("size") != size or meta.get("n", 0) < len(entries):
            continue
        index = pd.read_csv(folder / "index.csv", keep_default_na=False)
        have = set(zip(index["path"], index["file_size"], index["mtime_ns"]))
        if all(e in have for e in entries):
            return _complete(folder, meta["key"])
    return None


def _remove_dead_builds(root: Path) -> None:
    """Delete .build-* folders whose builder process is gone (killed mid-build)."""
    for folder in root.glob(".build-*"):
        try:
            pid = int(folder.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


# ---- building ---------------------------------------------------------------------------------


def _fill(tmp: Path, entries, size: int, *, workers: int, progress: bool) -> list[tuple[str, str]]:
    """Decode into tmp/images.npy, in parallel over disjoint row ranges; return [(path, reason)] of bad files."""
    from tqdm.auto import tqdm

    npy = tmp / "images.npy"
    n = len(entries)
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
    paths = [e[0] for e in entries]
    step = max(1, min(64, n // (max(workers, 1) * 8)))
    chunks = [(start, paths[start : start + step]) for start in range(0, n, step)]
    bad: list[tuple[str, str]] = []
    caught: list[tuple[type[Warning], str]] = []
    bar = tqdm(total=n, desc=f"caching images at {size} px", unit="img", disable=not progress)
    try:
        workers = min(workers, len(chunks))
        if workers <= 1:
            for start, chunk in chunks:
                b, w = _decode_rows(str(npy), start, chunk, size)
                bad += b
                caught += w
                bar.update(len(chunk))
        else:
            # fork where the OS has it (as torch's DataLoader does): the children only run PIL and
            # numpy, and forking spares each one re-importing torch (~2 s on a 2-vCPU Colab).
            ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(_decode_rows, str(npy), start, chunk, size): len(chunk)
                           for start, chunk in chunks}
                try:
                    for future in as_completed(futures):
                        b, w = future.result()
                        bad += b
                        caught += w
                        bar.update(futures[future])
                except BaseException:  # an error or Ctrl-C: stop at once, not after every queued chunk
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    for category, message in caught:  # the workers' warnings (truncated JPEGs), raised here where they show
        warnings.warn(message, category, stacklevel=3)
    with open(npy, "rb+") as f:  # the pixels are on disk before meta.json says the cache is complete
        os.fsync(f.fileno())
    return sorted(bad)


def _decode_rows(npy: str, start: int, paths: list[str], size: int):
    """Worker: decode `paths` into rows start.. of the memmap; bad files leave a black row."""
    array = np.load(npy, mmap_mode="r+")
    bad, caught = [], []
    for i, p in enumerate(paths):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                array[start + i] = _images.letterbox(_images.read_image(p), size)
            except (_images.ImageError, OSError) as e:  # OSError: missing or unreadable file
                bad.append((p, str(e)))
        caught += [(w.category, str(w.message)) for w in seen]
    array.flush()
    del array
    return bad, caught


def _write_tables(tmp: Path, entries, bad: list[tuple[str, str]]) -> None:
    bad_paths = {p for p, _ in bad}
    index = pd.DataFrame(entries, columns=["path", "file_size", "mtime_ns"])
    index["ok"] = [p not in bad_paths for p in index["path"]]
    index.to_csv(tmp / "index.csv", index=False)
    pd.DataFrame(bad, columns=["path", "reason"]).to_csv(tmp / "bad.csv", index=False)


def _write_meta(tmp: Path, meta: dict) -> None:
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


# ---- the loader -------------------------------------------------------------------------------


class CachedBatches:
    """BatchSource over an ImageCache: gather rows from the memmap on a background thread into pinned
    host memory, copy them to the device without blocking, and augment there with GpuAugment.

    The next batches are read while the current one trains (a prefetch thread; numpy's gather and the
    page-ins release the GIL). All randomness derives from (seed, epoch): the order from one
    torch.Generator, the augmentation from another, so a resumed run replays epoch k exactly. Train
    drops the last partial batch (a batch of one breaks BatchNorm) unless it is the only one; eval
    keeps manifest order and every image. Files in the cache's bad list are left out with a warning;
    `manifest` holds the rows that are served, in order.
    """

    prefetch = 2  # batches read ahead of the one training
    reuse_buffers = False  # on the CPU too (always on CUDA); lets the CPU-only tests cover the ring

    def __init__(self, cache: ImageCache, manifest: pd.DataFrame, *, image_size: int, batch_size: int,
                 train: bool, seed: int, device: torch.device | str, channels_last: bool = False,
                 max_batches: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        rows = cache.rows(manifest["path"])
        keep = rows >= 0
        if not keep.any():
            raise ValueError(f"none of the {len(manifest)} manifest images is usable in the cache at {cache.path}; "
                             "build the cache from this manifest with build_cache(manifest, size=...)")
        if not keep.all():
            dropped = manifest["path"][~keep].tolist()
            warnings.warn(f"{len(dropped)} of {len(manifest)} images are left out of the batches: they could not "
                          f"be decoded or are not in the cache (see {cache.path / 'bad.csv'}); first: {dropped[:3]}",
                          stacklevel=2)
        self.cache, self.manifest = cache, manifest[keep]
        self._rows = rows[keep]
        self._labels = torch.as_tensor(self.manifest["label"].to_numpy(dtype=np.float32))
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.device = get_device(device) if isinstance(device, str) else torch.device(device)
        self.channels_last, self.max_batches = channels_last, int(max_batches)
        self.augment = GpuAugment(image_size, train=train).to(self.device)

    def __len__(self) -> int:
        n, bs = len(self._rows), self.batch_size
        batches = n // bs if self.train and n >= bs else -(-n // bs)
        return min(batches, self.max_batches) if self.max_batches > 0 else batches

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, int(epoch), stream]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))

    def _batch_positions(self, epoch: int) -> list[np.ndarray]:
        n = len(self._rows)
        order = torch.randperm(n, generator=self._generator(epoch, 0)).numpy() if self.train else np.arange(n)
        bs = self.batch_size
        return [order[k * bs : (k + 1) * bs] for k in range(len(self))]

    def host_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The host side alone: uint8 (B,1,S,S) and float32 (B,) batches as shipped to the device (pinned on
        CUDA). The tensors may be reused buffers, valid until the next-but-one batch is asked for."""
        with _Prefetcher(self, epoch) as batches:
            for slot, x, y in batches:
                yield x, y
                batches.release(slot)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x float32 (B,3,H,W) normalised, y float32 (B,)) on the device, for one epoch."""
        generator = self._generator(epoch, 1)
        cuda = self.device.type == "cuda"
        with _Prefetcher(self, epoch) as batches:
            for slot, x, y in batches:
                if cuda:
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()  # the slot may be refilled once the copy out of it has run on the GPU
                    batches.release(slot, event)
                    x = self.augment(x, generator=generator)
                else:
                    x = self.augment(x.to(self.device), generator=generator)
                    if slot is not None:  # a reused buffer: nothing the caller keeps may point into it
                        y = y.clone()
                        batches.release(slot)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y


class _Prefetcher:
    """Background thread filling a ring of host buffers with the batches of one epoch, in order."""

    def __init__(self, source: CachedBatches, epoch: int) -> None:
        self.source = source
        self.positions = source._batch_positions(epoch)
        side, bs = source.cache.size, source.batch_size
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
                srt = np.argsort(rows[positions], kind="stable")  # ascending rows: sequential disk reads
                if self.source.train:
                    positions = positions[srt]  # order inside a training batch does not matter
                if slot is None:
                    x, y = torch.empty((b, 1, array.shape[1], array.shape[2]), dtype=torch.uint8), torch.empty(b)
                else:
                    x, y = self.slots[slot][0][:b], self.slots[slot][1][:b]
                out = x.numpy()[:, 0]
                # mode="clip" (rows are valid by construction) lets numpy write straight into `out`;
                # the default "raise" buffers the whole batch first, 5x slower.
                if self.source.train:
                    np.take(array, rows[positions], axis=0, out=out, mode="clip")
                else:  # eval keeps manifest order: gather sorted, then put each row back in its place
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
