"""Every source into one manifest: ``load(source, root=None, ...)``; plus the safe decoder and the audit."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# Importing xrai.data (as importing xrai.data.decode.images, the decoder, does) must not import pandas,
# scikit-learn or torch: the ONNX server runs without them. So the modules that need pandas are loaded
# on first use of one of their names (PEP 562). audit and download are imported here, as their names
# are also their modules' (a later import of the submodule would otherwise rebind xrai.data.audit to
# the module); both import pandas only inside their functions.
from xrai.data.audit import audit, audit_summary, duplicate_groups
from xrai.data.decode.images import (
    DECODER_VERSION,
    ImageError,
    TruncatedImageWarning,
    letterbox,
    read_image,
    scan_images,
)
from xrai.data.download import DATASETS, DownloadError, download
from xrai.labels import SOURCES  # re-exported: xrai.data.SOURCES, every source load reads

_LAZY = {
    "manifest": ("manifest_info", "read_manifest", "relocate_paths", "save_manifest"),
    "sources": ("MANIFEST_COLUMNS", "LabelConflictWarning", "ManifestError", "ManifestWarning", "dataset_dir",
                "read_class_folders", "read_fracatlas", "read_mura", "require_columns"),
    "split": ("filter_body_parts", "split_manifest"),
    "synthetic": ("default_synthetic_root", "ensure_synthetic", "make_synthetic", "read_fracture_lines",
                  "synthetic_options"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    import pandas as pd

    from xrai.data.manifest import (
        manifest_info,
        read_manifest,
        relocate_paths,
        save_manifest,
    )
    from xrai.data.sources import (
        MANIFEST_COLUMNS,
        LabelConflictWarning,
        ManifestError,
        ManifestWarning,
        dataset_dir,
        read_class_folders,
        read_fracatlas,
        read_mura,
        require_columns,
    )
    from xrai.data.split import filter_body_parts, split_manifest
    from xrai.data.synthetic import default_synthetic_root, make_synthetic


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "DATASETS",
    "DECODER_VERSION",
    "MANIFEST_COLUMNS",
    "SOURCES",
    "DownloadError",
    "ImageError",
    "LabelConflictWarning",
    "ManifestError",
    "ManifestWarning",
    "TruncatedImageWarning",
    "audit",
    "audit_summary",
    "dataset_dir",
    "default_synthetic_root",
    "download",
    "duplicate_groups",
    "filter_body_parts",
    "letterbox",
    "load",
    "make_synthetic",
    "manifest_info",
    "read_class_folders",
    "read_fracatlas",
    "read_image",
    "read_manifest",
    "read_mura",
    "require_columns",
    "relocate_paths",
    "save_manifest",
    "scan_images",
    "split_manifest",
]


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
    """Read a dataset into the manifest (docs/design.md), with splits filled and body parts filtered.

    Args:
        source: "mura", "fracatlas", "folder" (class folders; "multiregion" and "bonefracture" are the
            two Kaggle sets of that shape) or "synthetic".
        root: where the data is. None: the synthetic set is generated under xrai_home() once (and
            into root, when root is a folder that does not exist yet or is empty); the others are
            found attached in Kaggle or downloaded with kagglehub.
        split: fill the splits the source lacks (seeded, patient-grouped, label-stratified; FracAtlas
            keeps duplicate groups together since it has no patient ids, and the manifest keeps them as
            an extra ``group`` column). False leaves "" in place.
        seed, val_fraction, test_fraction: passed to split_manifest.
        body_part: one part, a list, or None/"all". Applied after splitting, so an image's split does
            not depend on which parts a run picks.
        progress: show progress bars (FracAtlas hashes its images to find duplicates).
    Returns:
        The manifest; ``attrs`` holds source, dataset (the DATASETS key, "" for a local folder or the
        synthetic set) and slug, root (the dataset folder the paths hang from, see dataset_dir),
        split_method, split (seed and fractions) and, for the synthetic set, its options.
    Raises:
        ValueError: unknown source or body part. FileNotFoundError: no such dataset under root.
        DownloadError: root=None and the dataset can neither be found nor downloaded.
    """
    from xrai.data import loading  # pandas: importing xrai.data must not import it (the ONNX server)

    key = source.strip().lower()
    if key not in SOURCES:
        raise ValueError(f"unknown source '{source}'; choose one of: {', '.join(SOURCES)}")
    if root is None and key not in ("synthetic", "folder"):
        root = download(key)  # this module's name at call time: a replaced xrai.data.download is the one called
    manifest, root, base = loading.read_source(key, root)
    options = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if split:
        manifest = loading.split_source(manifest, key, progress=progress, **options)
        method = manifest.attrs.get("split_method", "")
    else:
        method = "official" if (manifest["split"] != "").all() else "none"
    manifest = loading.keep_body_parts(manifest, body_part).reset_index(drop=True)
    manifest.attrs = loading.describe(key, root, base, method, options if split else {})
    return manifest
