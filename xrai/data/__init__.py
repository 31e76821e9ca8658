"""Every source into one manifest: ``load(source, root=None, ...)``; plus the safe decoder and the audit."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from xrai.data.audit import audit, audit_summary, duplicate_groups
from xrai.data.download import DATASETS, DownloadError, download
from xrai.data.images import DECODER_VERSION, ImageError, TruncatedImageWarning, letterbox, read_image, scan_images
from xrai.data.sources import (
    MANIFEST_COLUMNS,
    LabelConflictWarning,
    ManifestWarning,
    read_class_folders,
    read_fracatlas,
    read_mura,
)
from xrai.data.split import filter_body_parts, split_manifest
from xrai.data.synthetic import default_synthetic_root, ensure_synthetic, make_synthetic, read_fracture_lines

__all__ = [
    "DATASETS",
    "DECODER_VERSION",
    "MANIFEST_COLUMNS",
    "SOURCES",
    "DownloadError",
    "ImageError",
    "LabelConflictWarning",
    "ManifestWarning",
    "TruncatedImageWarning",
    "audit",
    "audit_summary",
    "default_synthetic_root",
    "download",
    "duplicate_groups",
    "filter_body_parts",
    "letterbox",
    "load",
    "make_synthetic",
    "read_class_folders",
    "read_fracatlas",
    "read_image",
    "read_manifest",
    "read_mura",
    "save_manifest",
    "scan_images",
    "split_manifest",
]

SOURCES = ("mura", "fracatlas", "folder", "multiregion", "bonefracture", "synthetic")
_STR_COLUMNS = ("path", "body_part", "patient_id", "study_id", "split", "source", "image_id")
_MAKES_MANIFEST = (
    "notebooks/01_download.ipynb, or `python -m xrai audit --data SOURCE --root DIR --out RUN_DIR` "
    "(training with `python -m xrai train` writes it too)"
)


def _synthetic_lines(manifest: pd.DataFrame) -> pd.DataFrame:
    """Add line_x0, line_y0, line_x1, line_y1, line_width (NaN for normal images) from fracture_lines.csv."""
    cols = ["line_x0", "line_y0", "line_x1", "line_y1", "line_width"]
    # image -> study -> patient -> XR_<PART> -> split -> MURA-v1.1
    mura_dir = Path(manifest["path"].iloc[0]).parents[4]
    try:
        lines = read_fracture_lines(mura_dir)
    except FileNotFoundError:
        warnings.warn(f"no fracture_lines.csv in {mura_dir}: line_* columns left empty", ManifestWarning, stacklevel=3)
        return manifest.assign(**{c: np.nan for c in cols})
    key = lines["path"].str.replace("\\", "/", regex=False).str.split("/", n=1).str[1]
    table = lines.drop(columns="path").set_axis(cols, axis=1).set_index(key)
    table = table[~table.index.duplicated()]
    own_key = manifest["study_id"] + "/" + manifest["path"].map(os.path.basename)
    return pd.concat([manifest, table.reindex(own_key).set_index(manifest.index)], axis=1)


def load(
    source: str,
    root: str | os.PathLike | None = None,
    *,
    split: bool = True,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    body_part: str | list[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Read a dataset into the manifest (DESIGN.md), with splits filled and body parts filtered.

    Args:
        source: "mura", "fracatlas", "folder" (class folders; "multiregion" and "bonefracture" are the
            two Kaggle sets of that shape) or "synthetic".
        root: where the data is. None: the synthetic set is generated under xrai_home() once; the
            others are found attached in Kaggle or downloaded with kagglehub.
        split: fill the splits the source lacks (seeded, patient-grouped, label-stratified; FracAtlas
            keeps duplicate groups together since it has no patient ids, and the manifest keeps them as
            an extra ``group`` column). False leaves "" in place.
        seed, val_fraction, test_fraction: passed to split_manifest.
        body_part: one part, a list, or None/"all". Applied after splitting, so an image's split does
            not depend on which parts a run picks.
        progress: show progress bars (FracAtlas hashes its images to find duplicates).
    Returns:
        The manifest; ``attrs`` holds source, root and split_method.
    Raises:
        ValueError: unknown source or body part. FileNotFoundError: no such dataset under root.
        DownloadError: root=None and the dataset can neither be found nor downloaded.
    """
    key = source.strip().lower()
    if key not in SOURCES:
        raise ValueError(f"unknown source '{source}'; choose one of: {', '.join(SOURCES)}")
    if root is None:
        if key == "synthetic":
            root = ensure_synthetic()
        elif key == "folder":
            raise ValueError("source 'folder' needs root= the folder holding the class folders "
                             "(or use 'multiregion' / 'bonefracture' to fetch those Kaggle sets)")  # fmt: skip
        else:
            root = download(key)
    root = Path(root)
    if key in ("mura", "synthetic"):
        manifest = read_mura(root, source=key)
        if key == "synthetic":
            manifest = _synthetic_lines(manifest)
    elif key == "fracatlas":
        manifest = read_fracatlas(root)
    else:
        manifest = read_class_folders(root)

    if split:
        groups = duplicate_groups(manifest, progress=progress) if key == "fracatlas" else None
        manifest = split_manifest(
            manifest, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, groups=groups
        )
        if groups is not None:  # kept, so the bootstrap resamples the units the split kept together
            manifest["group"] = groups.reindex(manifest.index).to_numpy()
        method = manifest.attrs.get("split_method", "")
    else:
        method = "official" if (manifest["split"] != "").all() else "none"
    if isinstance(body_part, str):
        body_part = None if body_part.strip().lower() == "all" else [body_part]
    if body_part:
        manifest = filter_body_parts(manifest, list(body_part))
    manifest = manifest.reset_index(drop=True)
    manifest.attrs = {"source": key, "root": str(root), "split_method": method}
    return manifest


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_manifest(manifest: pd.DataFrame, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/manifest.csv and run_dir/manifest.json (its attrs: source, root, split_method).

    Both are written atomically (temporary file, then rename): a run folder on Google Drive never
    holds half a manifest. Returns the path of manifest.csv.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"not a manifest: columns {missing} are missing (has {list(manifest.columns)})")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / "manifest.csv"
    _atomic_write_text(csv_path, manifest.to_csv(index=False, lineterminator="\n"))
    meta = {k: manifest.attrs.get(k, "") for k in ("source", "root", "split_method")}
    meta.update({"rows": int(len(manifest)), "columns": [str(c) for c in manifest.columns]})
    _atomic_write_text(run_dir / "manifest.json", json.dumps(meta, indent=2) + "\n")
    return csv_path


def read_manifest(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Read run_dir/manifest.csv back with its dtypes (ids and paths str with "" for none, label int) and attrs.

    Raises:
        FileNotFoundError: no manifest.csv there; the message says what makes one.
    """
    run_dir = Path(run_dir)
    csv_path = run_dir / "manifest.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no manifest.csv in {run_dir}; make it with {_MAKES_MANIFEST}")
    header = pd.read_csv(csv_path, nrows=0).columns
    manifest = pd.read_csv(csv_path, dtype={c: str for c in _STR_COLUMNS if c in header})
    for c in _STR_COLUMNS:
        if c in manifest.columns:
            manifest[c] = manifest[c].fillna("")
    manifest["label"] = manifest["label"].astype(np.int64)
    if "label_conflict" in manifest.columns:
        manifest["label_conflict"] = manifest["label_conflict"].astype(bool)
    meta_path = run_dir / "manifest.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    manifest.attrs = {k: meta.get(k, "") for k in ("source", "root", "split_method")}
    return manifest
