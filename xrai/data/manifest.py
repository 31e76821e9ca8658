"""The manifest on disk: ``RUN_DIR/manifest.csv`` with paths relative to the dataset root, and manifest.json.

On disk a path is relative to the dataset folder (``MURA-v1.1``, the folder holding FracAtlas's
dataset.csv, ...); in memory, after ``read_manifest``, it is absolute on this machine: the images are
found again wherever this machine has them (see xrai.data.locate), and one line in
``manifest.attrs["found"]`` says where. A manifest written before paths were relative (absolute paths,
no dataset key) still reads: its paths are used where they exist and mapped onto a copy found again
where they do not.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from xrai.data.archive import ARCHIVE_SPLITS, extract_root, leads_outside, open_split_images, write_split_images
from xrai.data.locate import Found, find_images
from xrai.data.sources import ManifestError, require_columns
from xrai.env import detect_platform, is_under, kaggle_input_dir
from xrai.fileio import atomic_write_json, atomic_write_text
from xrai.runs.layout import MANIFEST_CSV, RunFolder

__all__ = ["ATTRS", "manifest_info", "read_manifest", "relocate_paths", "save_manifest"]

logger = logging.getLogger(__name__)
_TOLD: set[tuple[str, str]] = set()  # (run folder, image root) pairs whose "images found" line was logged

# What manifest.json records besides rows and columns; a manifest's attrs carry the same keys.
# split_images: the zip of the valid and test images (save_manifest's keep_split_images), relative to the run
# folder: its own, or the data folder's that 03 copied the manifest from (so 04 and 05 find it from RUN_DIR)
ATTRS = ("source", "dataset", "slug", "root", "split_method", "split", "synthetic", "split_images")
_STR_COLUMNS = ("path", "body_part", "patient_id", "study_id", "split", "source", "image_id")
_MAKES_MANIFEST = (
    "notebooks/01_download.ipynb, or `python -m xrai audit --data SOURCE --root DIR --out RUN_DIR` "
    "(training with `python -m xrai train` writes it too)"
)


def save_manifest(manifest: pd.DataFrame, run_dir: str | os.PathLike, *,
                  keep_split_images: bool | None = None) -> Path:
    """Write run_dir/manifest.csv and run_dir/manifest.json (its attrs: source, dataset, root, split, ...).

    Paths under ``attrs["root"]`` are written relative to it, so the run folder does not depend on where
    this machine keeps the images. Both files are written atomically (temporary file, then rename): a
    run folder on Google Drive never holds half a manifest. Returns the path of manifest.csv.

    Args:
        keep_split_images: also write run_dir/split_images.zip, the valid and test images' original
            files (xrai.data.archive), so that 04 and 05 in a fresh runtime need no download. None: on
            Colab only (each notebook there is a fresh runtime). Needs relative paths and the images at
            hand; without them, or on a full disk, one line is logged and the manifest is saved alone.
    """
    require_columns(manifest.columns, where="the manifest to save")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = str(manifest.attrs.get("root") or "")
    prefix = root.rstrip("/\\") + os.sep
    relative = bool(root) and len(manifest) > 0 and bool(manifest["path"].str.startswith(prefix).all())
    table = manifest.assign(path=manifest["path"].str.slice(len(prefix)).str.replace(os.sep, "/", regex=False)) \
        if relative else manifest
    csv_path = RunFolder(run_dir).manifest_csv
    atomic_write_text(csv_path, table.to_csv(index=False, lineterminator="\n"))
    if keep_split_images is None:
        keep_split_images = detect_platform()[0] == "colab"
    if keep_split_images:
        _keep_split_images(manifest, table if relative else None, run_dir)
    meta = {k: manifest.attrs.get(k, "") for k in ATTRS}
    meta.update({"paths": "relative" if relative else "absolute", "rows": int(len(manifest)),
                 "columns": [str(c) for c in manifest.columns], "split_images": _zip_record(manifest, run_dir)})
    atomic_write_json(RunFolder(run_dir).manifest_json, meta)
    return csv_path


def _zip_record(manifest: pd.DataFrame, run_dir: Path) -> str:
    """manifest.json's split_images: this folder's zip, else the one the manifest was read with, relative to run_dir."""
    own = RunFolder(run_dir).split_images_zip
    if own.is_file():
        return own.name
    carried = manifest.attrs.get("split_images") or ""
    if carried and Path(carried).is_absolute() and Path(carried).is_file():
        return os.path.relpath(carried, run_dir)
    return ""


def _recorded_zip(run_dir: Path, meta: dict) -> Path | None:
    """The split-images zip manifest.json names (absolute), when it is there."""
    value = meta.get("split_images") or ""
    path = (run_dir / value) if value else None
    return path.resolve() if path is not None and path.is_file() else None


def _keep_split_images(manifest: pd.DataFrame, relative: pd.DataFrame | None, run_dir: Path) -> None:
    """run_dir/split_images.zip of the valid and test rows (see save_manifest)."""
    if relative is None:
        logger.warning("%s: no split_images.zip: the manifest's paths are not under one dataset folder (attrs "
                       "'root'), so they cannot be kept with their relative paths", run_dir)
        return
    rows = manifest["split"].isin(ARCHIVE_SPLITS).to_numpy()
    if not rows.any():
        logger.info("%s: no split_images.zip: the manifest has no %s rows", run_dir, " or ".join(ARCHIVE_SPLITS))
        return
    splits = [s for s in ARCHIVE_SPLITS if (manifest["split"] == s).any()]
    write_split_images(RunFolder(run_dir).split_images_zip, zip(relative["path"][rows], manifest["path"][rows]),
                       splits)


def manifest_info(run_dir: str | os.PathLike) -> dict:
    """manifest.json of a run folder (source, dataset, root, ...) without looking for the images.

    Raises:
        FileNotFoundError: no manifest.csv there; the message says what makes one.
    """
    run_dir = Path(run_dir)
    if not RunFolder(run_dir).manifest_csv.is_file():
        raise FileNotFoundError(f"no {MANIFEST_CSV} in {run_dir}; make it with {_MAKES_MANIFEST}")
    path = RunFolder(run_dir).manifest_json
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {k: meta.get(k, "") for k in ATTRS} | {"paths": meta.get("paths", "absolute")}


def read_manifest(run_dir: str | os.PathLike, *, root: str | os.PathLike | None = None,
                  splits: Iterable[str] | None = None) -> pd.DataFrame:
    """Read run_dir/manifest.csv with its dtypes and attrs, its paths made absolute on this machine.

    The images are looked for where xrai.data.locate says (the recorded root, an attached Kaggle copy,
    kagglehub's cache, a download, the synthetic set regenerated); ``attrs["found"]`` is one line saying
    where they were found. When that is not the recorded root, manifest.json is updated (where the
    run folder is writable and outside Kaggle's input folder).

    With ``splits``, only those splits' images need to be found: before a download (or a regeneration)
    the run folder's split_images.zip is tried, extracted once into a folder on this machine's disk
    when it holds every image of those splits (xrai.data.archive). Every row is returned, but only the
    rows of ``splits`` are sure to be on this machine; the extracted folder is not recorded as the root.

    Args:
        run_dir: the run folder.
        root: a folder holding the dataset, tried before anything else.
        splits: the splits the caller needs ("valid", "test"); None: all of them (training).
    Raises:
        FileNotFoundError: no manifest.csv there (the message says what makes one), or its images are on
            this machine nowhere and cannot be fetched (the message says what to do).
        ManifestError: manifest.csv is not a readable CSV or lacks a column (the message names it and the file).
    """
    run_dir = Path(run_dir)
    meta = manifest_info(run_dir)
    csv_path = RunFolder(run_dir).manifest_csv
    manifest = _read_table(csv_path)
    if isinstance(splits, str):
        splits = (splits,)
    needed = manifest if splits is None else manifest[manifest["split"].isin(list(splits))]
    if needed.empty:
        needed = manifest
    found = None
    if len(manifest):
        if meta["paths"] == "relative":
            _refuse_paths_outside_the_root(manifest["path"], csv_path)  # before any is looked at
            local = None if splits is None or needed is manifest else _archive(run_dir, needed["path"], meta)
            found = _find_relative(manifest, meta, root, csv_path, needed["path"], local)
        else:
            found = _find_absolute(manifest, meta, root, csv_path)
    manifest.attrs = {k: meta[k] for k in ATTRS if k != "split_images"}
    recorded = _recorded_zip(run_dir, meta)
    if recorded is not None:  # absolute here, so a copy saved in another folder can point at it (_zip_record)
        manifest.attrs["split_images"] = str(recorded)
    if found is not None:
        manifest.attrs["root"] = str(found.root)
        manifest.attrs["found"] = found.line(len(needed))
        told = (str(run_dir.resolve()), str(found.root))  # once per run and root: evaluate reads it per split
        logger.log(logging.DEBUG if told in _TOLD else logging.INFO, "%s: %s", run_dir, manifest.attrs["found"])
        _TOLD.add(told)
        extracted = is_under(found.root, extract_root())  # holds some splits only: never the root to record
        if meta["paths"] == "relative" and str(found.root) != meta["root"] and not extracted:
            _record_root(run_dir, str(found.root))
    return manifest


def _read_table(csv_path: Path) -> pd.DataFrame:
    """manifest.csv with its dtypes (ids as strings, "" for none), paths as written."""
    try:
        header = pd.read_csv(csv_path, nrows=0).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"{csv_path} is not a readable CSV ({e}); make it again with {_MAKES_MANIFEST}") from e
    require_columns(header, where=str(csv_path), hint=f"make it again with {_MAKES_MANIFEST}")
    manifest = pd.read_csv(csv_path, dtype={c: str for c in _STR_COLUMNS if c in header})
    for c in _STR_COLUMNS:
        if c in manifest.columns:
            manifest[c] = manifest[c].fillna("")
    manifest["label"] = manifest["label"].astype(np.int64)
    if "label_conflict" in manifest.columns:
        manifest["label_conflict"] = manifest["label_conflict"].astype(bool)
    return manifest


def _archive(run_dir: Path, paths: pd.Series, meta: dict) -> Callable[[], tuple[str, Path] | None]:
    """find_images' ``local``: the run folder's split_images.zip (or the one its manifest.json names: the data
    folder's, for a run that copied its manifest from there) extracted, when it holds every one of ``paths``."""
    def local() -> tuple[str, Path] | None:
        own = RunFolder(run_dir).split_images_zip
        zip_path = own if own.is_file() else (_recorded_zip(run_dir, meta) or own)
        opened = open_split_images(zip_path, paths)
        return None if opened is None else (opened[1], opened[0])

    return local


def _refuse_paths_outside_the_root(paths: pd.Series, csv_path: Path) -> None:
    """ManifestError naming the first row whose path is not inside the dataset folder.

    A manifest travels with its run folder (Google Drive, a Kaggle output): a path such as
    ``../../../../etc/passwd`` would have evaluate read (and score) any file this machine holds.
    """
    outside = paths.map(leads_outside)
    if outside.any():
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise ManifestError(f"{csv_path}: row {row + 2} has path {paths.iloc[row]!r}, which leads outside the dataset "
                            f"folder ({int(outside.sum())} such row(s)); paths there are relative to the dataset root. "
                            f"The file was edited or damaged: make it again with {_MAKES_MANIFEST}")


def _find_relative(manifest: pd.DataFrame, meta: dict, root, csv_path: Path, needed: pd.Series,
                   local=None) -> Found:
    probes = list(dict.fromkeys([needed.iloc[0], needed.iloc[-1]]))
    found = find_images(meta, lambda folder: all((folder / p).exists() for p in probes), root=root,
                        where=str(csv_path), local=local)
    manifest["path"] = str(found.root) + os.sep + manifest["path"].str.replace("/", os.sep, regex=False)
    return found


def _tails(path: str) -> Iterator[str]:
    """The path without its first folder, then without its first two, ..., "/"-separated: longest first."""
    parts = path.replace("\\", "/").split("/")
    return ("/".join(parts[k:]) for k in range(1, len(parts)))


def _find_absolute(manifest: pd.DataFrame, meta: dict, root, csv_path: Path) -> Found:
    """An old manifest: its paths where they exist, else mapped onto a copy found again by their tails."""
    first = manifest["path"].iloc[0]
    if root is None and os.path.exists(first):
        return Found(root=Path(meta["root"] or os.path.dirname(first)), how="recorded paths", seconds=0.0)
    tails = list(_tails(first))
    old_prefix: list[str] = []

    def holds(folder: Path) -> bool:
        tail = next((t for t in tails if (folder / t).exists()), None)
        if tail is not None:
            old_prefix[:] = [first[: len(first) - len(tail)]]
        return tail is not None

    found = find_images(meta, holds, root=root, where=str(csv_path))
    prefix = old_prefix[0]
    paths = manifest["path"]
    moved = paths.str.startswith(prefix)
    manifest.loc[moved, "path"] = str(found.root) + os.sep + paths[moved].str.slice(len(prefix))
    return found


def _record_root(run_dir: Path, root: str) -> None:
    """Write where the images were found into manifest.json, so the next reader looks there first."""
    path = RunFolder(run_dir).manifest_json
    if is_under(run_dir, kaggle_input_dir()) or not os.access(run_dir, os.W_OK) or not path.is_file():
        return
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["root"] = root
    atomic_write_json(path, meta)


def relocate_paths(paths: pd.Series, manifest: pd.DataFrame) -> pd.Series:
    """Paths another machine wrote (a run's predictions_<split>.csv) mapped onto this machine's manifest.

    A path the manifest holds stays; another one is matched by its tail (the path relative to the
    dataset root, which is the same on every machine); one with no match stays as it was.
    """
    known = set(manifest["path"])
    root = str(manifest.attrs.get("root") or "")
    if not root or paths.isin(known).all():
        return paths
    by_tail = {p[len(root) + 1:].replace(os.sep, "/"): p for p in known if p.startswith(root)}

    def move(path: str) -> str:
        if path in known:
            return path
        return next((by_tail[t] for t in _tails(path) if t in by_tail), path)

    return paths.map(move)
