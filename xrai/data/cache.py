"""Decode once: every manifest image letterboxed into one uint8 memmap on disk (fed by xrai.data.loader).

The classic path decodes and resizes every JPEG/PNG in every epoch, which on Colab's 2 vCPUs feeds a few
hundred images a second while a T4 wants more. Here each image is decoded once (`build_cache`), stored
as one (N, size, size) uint8 array, and every epoch only gathers rows from it (`xrai.data.loader.CachedBatches`) and
ships uint8 to the device, where `GpuAugment` crops, flips, rotates, jitters and normalises whole
batches.

Images are letterboxed (aspect kept, black padding) rather than resized-and-cropped: X-ray background is
black, so padding adds no false anatomy, and long thin parts (fingers, forearms) are not cut away. The
classic dataset and single-image prediction letterbox the same way (`xrai.data.decode.images.letterbox`).
A recipe may stretch instead (TrainConfig.resize = "stretch", `xrai.data.decode.images.fit_square`); that is
part of the key and of meta.json, so the two never mix.

A cache folder, `<cache_dir>/<size>px-<key>/`, holds images.npy, index.csv (path, file size, mtime, ok;
row i of images.npy is row i here), bad.csv (files that could not be decoded, with the reason),
damaged.csv (those and the truncated JPEGs decoded as far as their data goes: path, problem, reason) and
meta.json. A build says ONE line about its damaged images, naming damaged.csv; `build_cache(...,
damaged=)` counts them into the caller's `DamagedImages` instead (training says its run's line). The
key hashes the sorted set of (absolute path, file size, mtime_ns) of the manifest's images, the size,
DECODER_VERSION and the folder format: it is independent of row order and split, so re-splitting or
reshuffling a manifest reuses the cache, and replacing or touching any file rebuilds it.
A complete cache of a superset of the images (all body parts, when one is asked for) is reused too.

One process builds a given cache: the builder holds `<cache_dir>/.lock-<folder>` (an OS file lock,
released when the process ends, however it ends), and a second process asking for the same cache
waits for it and then reuses the result. Opening a cache touches its `last_used` file, which
`python -m xrai cache --prune` (`xrai.data.cachedir`) reads to remove caches nobody has used lately.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from xrai.data.decode import images as _images
from xrai.data.decode.images import DamagedImages
from xrai.data.sources import require_columns
from xrai.env import cpu_count, xrai_home
from xrai.errors import UserError
from xrai.fileio import exclusive_lock

__all__ = ["DAMAGED_LIST", "CacheSpaceError", "ImageCache", "build_cache", "build_lock_path", "cache_fits",
           "complete_cache_folder", "damaged_line", "default_cache_dir", "find_cache", "read_meta",
           "remove_dead_builds"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the folder layout changes; part of the key
LAST_USED = "last_used"  # its mtime is when a run last opened the cache (`python -m xrai cache --prune` reads it)
LOCK_PREFIX = ".lock-"  # <cache_dir>/.lock-<folder name>: held by the one process building that cache
DAMAGED_LIST = "damaged.csv"  # in a cache folder: its unreadable and truncated images (path, problem, reason)
_NAMED = 3  # damaged images a line names when there is no list to point at
_MARGIN_BYTES = 1 << 30  # keep 1 GiB (plus 10% of the cache) free for checkpoints and the rest of the run


class CacheSpaceError(UserError, OSError):
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
        """Open a cache folder (and record the use); FileNotFoundError when it is missing or incomplete."""
        path = Path(path)
        meta = read_meta(path)
        if meta is None:
            raise FileNotFoundError(f"{path} is not a complete xrai image cache (no valid meta.json); "
                                    "build one with xrai.data.cache.build_cache(manifest, size=...)")
        index = pd.read_csv(path / "index.csv", keep_default_na=False)
        bad = pd.read_csv(path / "bad.csv", keep_default_na=False, dtype=str)
        _mark_used(path)
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

    @cached_property
    def damaged(self) -> list[tuple[str, str, str]]:
        """(path, problem, reason) of every image the build found damaged: problem "unreadable" (left out
        of the batches, as in bad.csv) or "truncated" (decoded as far as its data goes). A cache built
        before damaged.csv existed knows its unreadable images only."""
        try:
            table = pd.read_csv(self.path / DAMAGED_LIST, keep_default_na=False, dtype=str)
            return list(zip(table["path"], table["problem"], table["reason"]))
        except (OSError, KeyError, ValueError):  # an older cache (or a torn list): bad.csv still says which fail
            return [(p, "unreadable", r) for p, r in zip(self.bad["path"], self.bad["reason"])]

    def count_damaged(self, paths: Sequence[str] | pd.Series, damaged: DamagedImages) -> int:
        """Count the damaged images among `paths` into `damaged` (quietly: its owner says the one line);
        returns how many."""
        given = {os.path.abspath(os.fspath(p)): os.fspath(p) for p in paths}  # counted under the caller's name
        found = [entry for entry in self.damaged if entry[0] in given]
        for path, problem, reason in found:
            damaged.add(given[path], problem, reason)
        return len(found)


def build_cache(
    manifest: pd.DataFrame | Sequence[str],
    *,
    size: int,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    resize: str = "letterbox",
    damaged: DamagedImages | None = None,
) -> ImageCache:
    """Decode every image of the manifest once into a letterboxed uint8 cache, or reuse a current one.

    Args:
        manifest: the manifest (its `path` column is used) or a list of paths.
        size: side of the cached squares (the config's resize_size; 256 for 224 crops).
        cache_dir: where caches live; default xrai_home()/"cache".
        workers: decoding processes (default: the CPUs this process may use; 1 decodes in-process).
        progress: show a tqdm bar while building.
        resize: how images become squares, "letterbox" or "stretch" (`xrai.data.decode.images.fit_square`).
        damaged: where the manifest's truncated and unreadable images are counted (built or reused
            cache), for the caller's one line; None: a build says one line itself (naming damaged.csv).
    Returns:
        The ImageCache; `built` says whether this call decoded anything.
    Raises:
        CacheSpaceError: the disk under cache_dir has too little free space for a new cache.
    """
    if size < 1:
        raise ValueError(f"cache size must be >= 1, got {size}")
    entries = _manifest_entries(manifest)
    if not entries:
        raise ValueError("build_cache got an empty manifest")
    key = _cache_key(entries, size, resize)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{size}px-{key[:20]}"
    cache = _lookup(root, entries, size, key, resize)
    if cache is None:
        cache = _build_once(root, final, entries, key, size, workers=workers, progress=progress, resize=resize)
    if damaged is not None or cache.built:  # a reused cache was announced when it was built
        said = DamagedImages() if damaged is None else damaged  # each one logged at DEBUG (the CLI's -v)
        cache.count_damaged([p for p, _, _ in entries], said)
        if damaged is None and (line := damaged_line(said.entries(), len(entries), listing=cache.path / DAMAGED_LIST)):
            warnings.warn(line, UserWarning, stacklevel=2)  # at the caller's line: no source line of the package
    return cache


def damaged_line(entries: Sequence[tuple[str, str, str]], total: int, *,
                 listing: str | os.PathLike | None = None) -> str | None:
    """The one line about damaged images ((path, problem, reason) as ``DamagedImages.entries``) among
    `total`: how many could not be decoded and how many are truncated, and where they are listed (or,
    without a list, the first few by name). None when there are none."""
    if not entries:
        return None
    unreadable = [p for p, problem, _ in entries if problem == "unreadable"]
    truncated = [p for p, problem, _ in entries if problem != "unreadable"]
    counts = ([f"{len(unreadable)} of {total} images could not be decoded and are left out of training and "
               "evaluation batches"] if unreadable else []) + (
              [f"{len(truncated)} of {total} images are truncated and decoded as far as their data goes"]
              if truncated else [])
    if listing is not None:
        return f"{'; '.join(counts)} (listed in {os.fspath(listing)})"
    named = [*unreadable, *truncated]
    more = f" and {len(named) - _NAMED} more" if len(named) > _NAMED else ""
    return f"{'; '.join(counts)}: {', '.join(named[:_NAMED])}{more}"


def _build_once(root: Path, final: Path, entries, key: str, size: int, *, workers: int | None, progress: bool,
                resize: str) -> ImageCache:
    """Build the cache under its lock, or open the one another process finished while this one waited."""

    def waiting(pid: str) -> None:
        logger.warning("waiting for process %s, which is building the image cache %s; it is reused when done",
                       pid, final)

    # One builder per cache: a second process (another notebook, a second training run) waits here
    # and then finds the finished cache instead of decoding every image again.
    with exclusive_lock(build_lock_path(root, final.name), on_wait=waiting):
        found = _lookup(root, entries, size, key, resize)
        if found is not None:
            return found
        _build(root, final, entries, key, size, workers=workers, progress=progress, resize=resize)
    cache = ImageCache.open(final)
    cache.built = True
    return cache


def _build(root: Path, final: Path, entries, key: str, size: int, *, workers: int | None, progress: bool,
           resize: str = "letterbox") -> None:
    """Decode into a private folder and rename it to ``final`` (the caller holds the build lock)."""
    remove_dead_builds(root)
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
        bad, truncated = _fill(tmp, entries, size, workers=workers or cpu_count(), progress=progress, resize=resize)
        _write_tables(tmp, entries, bad, truncated)
        _write_meta(tmp, {"format": CACHE_FORMAT, "key": key, "size": size, "resize": resize, "n": len(entries),
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


# ---- keying and finding caches ----------------------------------------------------------------


def find_cache(manifest: pd.DataFrame | Sequence[str], *, size: int, cache_dir: str | os.PathLike | None = None,
               resize: str = "letterbox") -> ImageCache | None:
    """The complete, current cache holding every image of the manifest at this size and resize mode (its
    own or a superset's), or None: what build_cache would reuse without decoding anything."""
    entries = _manifest_entries(manifest)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not entries or not root.is_dir():
        return None
    return _lookup(root, entries, size, _cache_key(entries, size, resize), resize)


def _lookup(root: Path, entries: list[tuple[str, int, int]], size: int, key: str,
            resize: str) -> ImageCache | None:
    """The cache keyed `key` if complete, else a complete cache of a superset of `entries`."""
    return _complete(root / f"{size}px-{key[:20]}", key) or _find_superset(root, entries, size, resize)


def _manifest_entries(manifest: pd.DataFrame | Sequence[str]) -> list[tuple[str, int, int]]:
    if isinstance(manifest, pd.DataFrame):
        require_columns(manifest.columns, where="the manifest to cache", needed=("path",))
        return _stat_entries(manifest["path"])
    return _stat_entries(manifest)


def build_lock_path(root: Path, folder_name: str) -> Path:
    """The lock file held while the cache folder ``folder_name`` under ``root`` is being built."""
    return Path(root) / f"{LOCK_PREFIX}{folder_name}"


def _mark_used(path: Path) -> None:
    """Record that the cache was used now (the mtime of path/last_used); read-only copies are left alone."""
    marker = path / LAST_USED
    try:
        marker.touch()  # sets the mtime to now, also when the file is already there
    except OSError:  # a cache on a read-only mount (Kaggle input): its age is not ours to track
        pass


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


def _cache_key(entries: list[tuple[str, int, int]], size: int, resize: str = "letterbox") -> str:
    # letterbox keeps the key it had before resize modes existed, so caches already built stay valid
    mode = "" if resize == "letterbox" else f" resize={resize}"
    h = hashlib.sha256(f"xrai-cache format={CACHE_FORMAT} size={size} decoder={_images.DECODER_VERSION}{mode}\n"
                       .encode())
    for p, n, t in entries:
        h.update(f"{p}\t{n}\t{t}\n".encode())
    return h.hexdigest()


def read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("decoder_version") != _images.DECODER_VERSION:
        return None
    return meta


def _complete(path: Path, key: str) -> ImageCache | None:
    meta = read_meta(path)
    if meta is None or meta.get("key") != key:
        return None
    cache = ImageCache.open(path)
    if cache.array.shape != (meta["n"], meta["size"], meta["size"]):
        return None
    return cache


def _find_superset(root: Path, entries: list[tuple[str, int, int]], size: int,
                   resize: str = "letterbox") -> ImageCache | None:
    """A complete cache at this size and resize mode holding every wanted file unchanged (e.g. all body parts)."""
    for folder in sorted(root.glob(f"{size}px-*")):
        meta = read_meta(folder)
        if meta is None or meta.get("size") != size or meta.get("n", 0) < len(entries):
            continue
        if meta.get("resize", "letterbox") != resize:  # caches from before resize modes are letterboxed
            continue
        index = pd.read_csv(folder / "index.csv", keep_default_na=False)
        have = set(zip(index["path"], index["file_size"], index["mtime_ns"]))
        if all(e in have for e in entries):
            return _complete(folder, meta["key"])
    return None


def remove_dead_builds(root: Path) -> None:
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


def _fill(tmp: Path, entries, size: int, *, workers: int, progress: bool,
          resize: str = "letterbox") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Decode into tmp/images.npy, in parallel over disjoint row ranges.

    Returns:
        ([(path, reason)] of the files that could not be decoded, [(path, note)] of the truncated ones),
        each sorted: counted, never warned about one by one (build_cache says one line).
    """
    npy = tmp / "images.npy"
    n = len(entries)
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
    paths = [e[0] for e in entries]
    step = max(1, min(64, n // (max(workers, 1) * 8)))
    chunks = [(start, paths[start : start + step]) for start in range(0, n, step)]
    bad: list[tuple[str, str]] = []
    truncated: list[tuple[str, str]] = []
    bar = tqdm(total=n, desc=f"caching images at {size} px", unit="img", disable=not progress)
    try:
        workers = min(workers, len(chunks))
        if workers <= 1:
            for start, chunk in chunks:
                b, t = _decode_rows(str(npy), start, chunk, size, resize)
                bad += b
                truncated += t
                bar.update(len(chunk))
        else:
            # fork where the OS has it (as torch's DataLoader does): the children only run PIL and
            # numpy, and forking spares each one re-importing torch (~2 s on a 2-vCPU Colab).
            ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(_decode_rows, str(npy), start, chunk, size, resize): len(chunk)
                           for start, chunk in chunks}
                try:
                    for future in as_completed(futures):
                        b, t = future.result()
                        bad += b
                        truncated += t
                        bar.update(futures[future])
                except BaseException:  # an error or Ctrl-C: stop at once, not after every queued chunk
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    with open(npy, "rb+") as f:  # the pixels are on disk before meta.json says the cache is complete
        os.fsync(f.fileno())
    return sorted(bad), sorted(truncated)


class _Truncated(list):
    """What ``read_image(damaged=)`` needs in a worker: truncated images collected as (path, note), to
    be sent back and counted by the parent (a DamagedImages holds a lock, which does not pickle)."""

    def add(self, path: str, problem: str, reason: str) -> None:
        self.append((os.fspath(path), reason))


def _decode_rows(npy: str, start: int, paths: list[str], size: int, resize: str = "letterbox"):
    """Worker: decode `paths` into rows start.. of the memmap; bad files leave a black row.

    Returns ([(path, reason)] of bad files, [(path, note)] of truncated ones)."""
    array = np.load(npy, mmap_mode="r+")
    bad, truncated = [], _Truncated()
    for i, p in enumerate(paths):
        try:
            array[start + i] = _images.fit_square(_images.read_image(p, damaged=truncated), size, resize)
        except (_images.ImageError, OSError) as e:  # OSError: missing or unreadable file
            bad.append((p, str(e)))
    array.flush()
    del array
    return bad, list(truncated)


def _write_tables(tmp: Path, entries, bad: list[tuple[str, str]], truncated: Sequence[tuple[str, str]] = ()) -> None:
    bad_paths = {p for p, _ in bad}
    index = pd.DataFrame(entries, columns=["path", "file_size", "mtime_ns"])
    index["ok"] = [p not in bad_paths for p in index["path"]]
    index.to_csv(tmp / "index.csv", index=False)
    pd.DataFrame(bad, columns=["path", "reason"]).to_csv(tmp / "bad.csv", index=False)
    damaged = [(p, "unreadable", r) for p, r in bad] + [(p, "truncated", r) for p, r in truncated]
    pd.DataFrame(damaged, columns=["path", "problem", "reason"]).to_csv(tmp / DAMAGED_LIST, index=False)


def _write_meta(tmp: Path, meta: dict) -> None:
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def complete_cache_folder(folder: str | os.PathLike, paths: Sequence[str], *, size: int, key: str) -> ImageCache:
    """Make a folder whose images.npy ((len(paths), size, size) uint8) the caller wrote into a complete
    cache (index.csv with every row good, an empty bad.csv, meta.json last) and open it.

    For tools that write pixels themselves, such as the bench's memory check; the files' sizes and
    times are recorded as 0, so build_cache never mistakes such a folder for a cache of real files.
    """
    folder = Path(folder)
    _write_tables(folder, [(str(p), 0, 0) for p in paths], [])
    _write_meta(folder, {"format": CACHE_FORMAT, "key": key, "size": int(size), "n": len(paths), "n_bad": 0,
                         "decoder_version": _images.DECODER_VERSION})
    return ImageCache.open(folder)
