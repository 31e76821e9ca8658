"""List and prune the decoded-image caches (`python -m xrai cache [--prune]`).

Each cache is a folder `<cache_dir>/<size>px-<key>/` (see ``xrai.data.cache``). A cache is "last used"
when a run last opened it (its `last_used` file's mtime; meta.json's for caches older than that
file). Pruning removes, in this order: caches a newer xrai can no longer read (other format or
decoder version: never reused), caches not used for ``older_than_days``, then the least recently
used until the total fits ``max_gb``. It never removes a cache while another process is building
it (the build lock is tried first) nor a build in progress (only `.build-*` folders of dead
processes go, as ``build_cache`` itself does).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from xrai.data.cache import (
    LAST_USED,
    LOCK_PREFIX,
    build_lock_path,
    default_cache_dir,
    read_meta,
    remove_dead_builds,
)
from xrai.fileio import try_lock

__all__ = ["DEFAULT_PRUNE_DAYS", "CacheInfo", "list_caches", "prune_caches"]

DEFAULT_PRUNE_DAYS = 30.0


@dataclass(kw_only=True)
class CacheInfo:
    """One cache folder as listed: where, how big, how many images, when last used, whether current."""

    path: Path
    size_px: int | None  # side of the cached squares; None when meta.json cannot be read
    images: int | None
    bytes: int
    last_used: float  # seconds since the epoch
    current: bool  # readable by this xrai (format and decoder version match)

    @property
    def days_unused(self) -> float:
        return max(0.0, (time.time() - self.last_used) / 86400)


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[CacheInfo]:
    """Every cache folder under ``cache_dir`` (default: xrai_home()/cache), most recently used first."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return []
    caches = []
    for folder in root.glob("*px-*"):
        if not folder.is_dir():
            continue
        meta = read_meta(folder)
        caches.append(CacheInfo(
            path=folder,
            size_px=int(meta["size"]) if meta else None,
            images=int(meta["n"]) if meta else None,
            bytes=_folder_bytes(folder),
            last_used=_last_used(folder),
            current=meta is not None,
        ))
    return sorted(caches, key=lambda c: c.last_used, reverse=True)


def prune_caches(cache_dir: str | os.PathLike | None = None, *, older_than_days: float | None = DEFAULT_PRUNE_DAYS,
                 max_gb: float | None = None, dry_run: bool = False) -> list[CacheInfo]:
    """Remove stale, unused and over-cap caches; return the ones removed (or, with dry_run, to remove).

    Args:
        cache_dir: where the caches live (default: xrai_home()/cache).
        older_than_days: remove caches not used for this many days (None: no age limit).
        max_gb: then remove the least recently used until the rest fits in this many GB (10**9 bytes).
        dry_run: only say what would go.
    Raises:
        ValueError: a negative age or size cap.
    """
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    if max_gb is not None and max_gb < 0:
        raise ValueError(f"max_gb must be >= 0, got {max_gb}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    caches = list_caches(root)
    doomed = [c for c in caches if not c.current
              or (older_than_days is not None and c.days_unused > older_than_days)]
    if max_gb is not None:
        kept = [c for c in caches if c not in doomed]
        total = sum(c.bytes for c in kept)
        for cache in sorted(kept, key=lambda c: c.last_used):  # least recently used first
            if total <= max_gb * 1e9:
                break
            doomed.append(cache)
            total -= cache.bytes
    if dry_run or not root.is_dir():
        return doomed
    removed = [cache for cache in doomed if _remove(root, cache)]
    remove_dead_builds(root)
    _remove_free_locks(root)
    return removed


def _remove(root: Path, cache: CacheInfo) -> bool:
    """Delete one cache folder unless a process holds its build lock; True when it was removed."""
    lock = build_lock_path(root, cache.path.name)
    if not lock.exists():
        shutil.rmtree(cache.path, ignore_errors=True)
        return not cache.path.exists()
    with open(lock, "a+b") as handle:
        try:
            if not try_lock(handle):
                return False  # being (re)built right now
        except OSError:
            pass  # no locking on this file system: go ahead, as before locks existed
        shutil.rmtree(cache.path, ignore_errors=True)
    return not cache.path.exists()


def _remove_free_locks(root: Path, *, min_age_s: float = 86400.0) -> None:
    """Delete lock files whose cache is gone, that nobody holds and that nobody touched for a day.

    A process that opened such a file a moment ago and is about to lock it would then lock a deleted
    file while a third process locks a new one: at worst both decode, and the atomic rename at the end
    of a build keeps the cache whole. The age limit makes even that unlikely.
    """
    for lock in root.glob(f"{LOCK_PREFIX}*"):
        try:
            if (root / lock.name[len(LOCK_PREFIX):]).exists() or time.time() - lock.stat().st_mtime < min_age_s:
                continue
            with open(lock, "a+b") as handle:
                if try_lock(handle):
                    lock.unlink(missing_ok=True)
        except OSError:
            continue


def _folder_bytes(folder: Path) -> int:
    total = 0
    for entry in folder.iterdir():
        try:
            total += entry.stat().st_size
        except OSError:
            continue
    return total


def _last_used(folder: Path) -> float:
    for name in (LAST_USED, "meta.json"):
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            continue
    return folder.stat().st_mtime
