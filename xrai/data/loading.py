"""The steps of ``xrai.data.load``: find and read a source, fill its splits, keep the body parts asked for,
and describe the result in ``attrs``. This module imports pandas, so ``xrai.data`` loads it on first use."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrai.data.audit import duplicate_groups
from xrai.data.download import DATASETS
from xrai.data.sources import ManifestWarning, dataset_dir, read_class_folders, read_fracatlas, read_mura
from xrai.data.split import filter_body_parts, split_manifest
from xrai.data.synthetic import ensure_synthetic, read_fracture_lines, synthetic_options
from xrai.errors import outside_package_stacklevel

__all__ = ["describe", "keep_body_parts", "read_source", "split_source"]


def read_source(key: str, root: str | os.PathLike | None) -> tuple[pd.DataFrame, Path, Path]:
    """(manifest, root, dataset folder) of a known source. ``root`` None is only for "synthetic" (generated
    under xrai_home() once) and "folder" (refused: it names no dataset); load downloads the others first."""
    if root is None:
        if key == "folder":
            raise ValueError("source 'folder' needs root= the folder holding the class folders "
                             "(or use 'multiregion' / 'bonefracture' to fetch those Kaggle sets)")  # fmt: skip
        root = ensure_synthetic()
    root = Path(root)
    if key == "synthetic" and (not root.exists() or (root.is_dir() and not any(root.iterdir()))):
        root = ensure_synthetic(root)  # a new (or empty) folder named for the synthetic set: generate it there
    base = dataset_dir(key, root)  # searched for once; each reader accepts it as it stands
    if key in ("mura", "synthetic"):
        manifest = read_mura(base, source=key)
        if key == "synthetic":
            manifest = _synthetic_lines(manifest)
    elif key == "fracatlas":
        manifest = read_fracatlas(base)
    else:
        manifest = read_class_folders(base)
    return manifest, root, base


def _synthetic_lines(manifest: pd.DataFrame) -> pd.DataFrame:
    """Add line_x0, line_y0, line_x1, line_y1, line_width (NaN for normal images) from fracture_lines.csv."""
    cols = ["line_x0", "line_y0", "line_x1", "line_y1", "line_width"]
    # image -> study -> patient -> XR_<PART> -> split -> MURA-v1.1
    mura_dir = Path(manifest["path"].iloc[0]).parents[4]
    try:
        lines = read_fracture_lines(mura_dir)
    except FileNotFoundError:
        # stacklevel 4: the caller of xrai.data.load (load -> read_source -> here)
        warnings.warn(f"no fracture_lines.csv in {mura_dir}: line_* columns left empty", ManifestWarning, stacklevel=outside_package_stacklevel())
        return manifest.assign(**{c: np.nan for c in cols})
    key = lines["path"].str.replace("\\", "/", regex=False).str.split("/", n=1).str[1]
    table = lines.drop(columns="path").set_axis(cols, axis=1).set_index(key)
    table = table[~table.index.duplicated()]
    own_key = manifest["study_id"] + "/" + manifest["path"].map(os.path.basename)
    return pd.concat([manifest, table.reindex(own_key).set_index(manifest.index)], axis=1)


def split_source(manifest: pd.DataFrame, key: str, *, seed: int, val_fraction: float, test_fraction: float,
                 progress: bool) -> pd.DataFrame:
    """split_manifest, FracAtlas's duplicate groups kept together (and kept as its ``group`` column)."""
    groups = duplicate_groups(manifest, progress=progress) if key == "fracatlas" else None
    manifest = split_manifest(manifest, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                              groups=groups)
    if groups is not None:  # kept, so the bootstrap resamples the units the split kept together
        manifest["group"] = groups.reindex(manifest.index).to_numpy()
    return manifest


def keep_body_parts(manifest: pd.DataFrame, body_part: str | list[str] | None) -> pd.DataFrame:
    """The rows of one part, a list of parts, or every row (None or "all")."""
    if isinstance(body_part, str):
        body_part = None if body_part.strip().lower() == "all" else [body_part]
    if body_part:
        manifest = filter_body_parts(manifest, list(body_part))
    return manifest


def describe(key: str, root: Path, base: Path, method: str, split: dict[str, Any]) -> dict[str, Any]:
    """A loaded manifest's ``attrs``: source, dataset and slug, root, split_method, split, synthetic."""
    dataset = key if key in DATASETS else ""
    return {
        "source": key, "dataset": dataset, "slug": DATASETS.get(dataset, ""),
        "root": str(base), "split_method": method, "split": split,
        "synthetic": (synthetic_options(root) or {}) if key == "synthetic" else {},
    }  # fmt: skip
