"""Find a run's images again on the machine that reads the run folder.

A run folder outlives the machine that made it (a fresh Colab runtime per notebook, a Kaggle working
folder per notebook), so manifest.json records where the images came from (source, dataset key and
slug, the root where they were last found, the synthetic set's options) and the manifest's paths are
relative to that root. ``find_images`` tries, in order: the root the caller names, the recorded root,
a copy attached in Kaggle (any mount form), kagglehub's cache, a download (kagglehub, with its
progress bar; in Kaggle through its data proxy), and for the synthetic set a regeneration (the same
options give byte-identical files). The first folder that holds the manifest's images wins. A caller
may add a local copy to try before anything is downloaded or regenerated (``local=``: the run
folder's split_images.zip, extracted; see xrai.data.archive).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xrai.data.download import (
    DATASETS,
    DownloadError,
    dataset_key,
    download,
    find_attached,
    find_cached,
)
from xrai.data.sources import dataset_dir
from xrai.data.synthetic import (
    COMPLETE_MARKER,
    MURA_DIR,
    SYNTHETIC_VERSION,
    default_synthetic_root,
    ensure_synthetic,
)

__all__ = ["Found", "find_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """Where a run's images are on this machine: ``root`` (the folder the relative paths hang from),
    ``how`` (recorded root, attached in Kaggle, ...) and the seconds the search took."""

    root: Path
    how: str
    seconds: float

    def line(self, n_images: int) -> str:
        return f"images: {n_images:,} found at {self.root} ({self.how}, {self.seconds:.1f} s)"


Local = Callable[[], tuple[str, Path] | None]  # (how, the dataset folder itself) or None: nothing there


def find_images(meta: dict, holds: Callable[[Path], bool], *, root: str | os.PathLike | None = None,
                where: str = "the manifest", local: Local | None = None) -> Found:
    """The first candidate folder that ``holds`` the manifest's images.

    Args:
        meta: manifest.json's content (source, dataset, root, synthetic, ...).
        holds: ``holds(folder)`` is True when the manifest's images are under that dataset folder.
        root: a folder the caller names (tried first).
        where: the manifest's file, for the error message.
        local: called (once, and only when nothing before it holds the images) just before a download
            or a regeneration; returns (how, folder) of a copy on this machine, or None.
    Raises:
        FileNotFoundError: no candidate holds the images; says where they were and what to do.
    """
    start = time.perf_counter()
    source = meta.get("source") or ""
    tried: list[str] = []
    for how, folder, exact in _candidates(meta, root, tried, local):
        inner = folder if exact else _dataset_dir(source, folder)
        if inner is not None and holds(inner):
            return Found(root=inner, how=how, seconds=time.perf_counter() - start)
        tried.append(f"{how} {folder}")
    recorded = meta.get("root") or "an unrecorded folder"
    key = _key(meta)
    fetch = (f"attach or download dataset '{DATASETS[key]}' (notebook 01 does)" if key else
             "put the data back there, or pass root= the folder that now holds it")
    raise FileNotFoundError(f"the images of {where} ({source or 'unknown source'}) were at {recorded} and are not "
                            f"on this machine (tried: {'; '.join(tried) or 'nothing else'}): {fetch}")


def _key(meta: dict) -> str:
    """The DATASETS key a manifest came from ("" for a local folder or the synthetic set)."""
    for name in (meta.get("dataset"), meta.get("slug"), meta.get("source")):
        if name:
            try:
                return dataset_key(name)
            except ValueError:
                continue
    return ""


def _candidates(meta: dict, root, tried: list[str], local: Local | None = None,
                ) -> Iterator[tuple[str, Path, bool]]:
    """(how, folder, whether folder is the dataset folder itself) in the order the module docstring gives;
    later ones are only made when asked for."""
    if root is not None:
        yield "the root given", Path(root), False
    if meta.get("root"):
        yield "recorded root", Path(meta["root"]), False
    key = _key(meta)
    if key:
        attached = find_attached(key)
        if attached is not None:
            yield "attached in Kaggle", attached, False
        cached = find_cached(key)
        if cached is not None:
            yield "kagglehub's cache", cached, False
        yield from _local(local)
        try:
            fetched = download(key)
        except DownloadError as error:
            tried.append(f"download: {error}")
            return
        yield "downloaded with kagglehub", fetched, False
    elif meta.get("source") == "synthetic":
        options = dict(meta.get("synthetic") or {})
        version = options.pop("version", SYNTHETIC_VERSION)
        target = default_synthetic_root(**options) if version == SYNTHETIC_VERSION else None
        made = target is not None and (target / MURA_DIR / COMPLETE_MARKER).is_file()
        if made:
            yield "synthetic set", target, False
        yield from _local(local)
        if target is None:
            tried.append(f"regenerating: the set was made by synthetic v{version}, "
                         f"this xrai makes v{SYNTHETIC_VERSION}")
        if made or target is None:
            return
        logger.info("regenerating the synthetic set %s at %s", options or "(defaults)", target)
        yield "synthetic set regenerated", ensure_synthetic(target, **options), False
    else:
        yield from _local(local)


def _local(local: Local | None) -> Iterator[tuple[str, Path, bool]]:
    copy = local() if local is not None else None
    if copy is not None:
        yield copy[0], copy[1], True


def _dataset_dir(source: str, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    try:
        return dataset_dir(source, folder)
    except (FileNotFoundError, ValueError):
        return None
