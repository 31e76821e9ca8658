"""One reader per source; each returns the manifest (docs/design.md): MANIFEST_COLUMNS first, extras after.

Label clean-up is explicit: the label always comes from the folder an image is filed under; where a
source's CSV says otherwise the row keeps the folder label, gets `label_conflict=True`, and a
LabelConflictWarning lists the cases. Nothing is silently resolved.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd

from xrai.data.decode.dicom import DICOM_EXTENSIONS, HEAD_BYTES, looks_like_dicom
from xrai.errors import UserError, outside_package_stacklevel

__all__ = [
    "MANIFEST_COLUMNS",
    "IMAGE_EXTENSIONS",
    "LabelConflictWarning",
    "ManifestError",
    "ManifestWarning",
    "class_label",
    "dataset_dir",
    "read_class_folders",
    "read_fracatlas",
    "read_mura",
    "require_columns",
]

MANIFEST_COLUMNS = ["path", "label", "body_part", "patient_id", "study_id", "split", "source"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
_IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS)
# Class folders also take DICOM: .dcm/.dicom, and files without an extension whose content is DICOM
# (PACS exports and DICOMDIR trees name files IM000001 or by UID).
_DICOM_SUFFIXES = tuple(DICOM_EXTENSIONS)
MURA_SPLITS = ("train", "valid")
FRACATLAS_PARTS = ("hand", "leg", "hip", "shoulder")

# Class-folder spellings found in the wild, compared after lower-casing and turning "_"/"-" into spaces.
_CLASS_LABELS = {
    "fractured": 1, "abnormal": 1, "positive": 1,
    "not fractured": 0, "non fractured": 0, "notfractured": 0, "nonfractured": 0,
    "normal": 0, "negative": 0,
}  # fmt: skip
_SPLIT_NAMES = {"train": "train", "val": "valid", "valid": "valid", "validation": "valid", "test": "test"}
_SKIP_DIRS = {"__macosx"}
_IMAGE_NAME_RE = r"(?:^|/)[^./][^/]*\.(?:png|jpe?g)$"  # _is_image_name, vectorised
_SEARCH_DEPTH = 3  # wrapper folders above a dataset (kagglehub's versions/N, Kaggle's FracAtlas/, ...)


class LabelConflictWarning(UserWarning):
    """A source's CSV disagrees with the folder an image is filed under."""


class ManifestWarning(UserWarning):
    """Images listed but missing, on disk but unlisted, or otherwise left out of a manifest."""


class ManifestError(UserError, ValueError):
    """A manifest that lacks a column the next step needs; the message names the column and the file."""


def require_columns(columns, *, where: str, needed=MANIFEST_COLUMNS, hint: str = "") -> None:
    """Raise ManifestError naming every column of ``needed`` missing from ``columns``.

    Args:
        columns: the manifest's columns (``frame.columns``).
        where: what to name in the message: the CSV's path, or "the manifest passed to fit()".
        needed: the columns the caller reads.
        hint: what makes a complete manifest, appended to the message.
    """
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise ManifestError(f"{where} has no {names} column{'s' if len(missing) > 1 else ''} (a manifest has "
                            f"{', '.join(MANIFEST_COLUMNS)})" + (f"; {hint}" if hint else ""))


def class_label(name: str) -> int | None:
    """1, 0 or None for a class-folder name such as 'Non_fractured' or 'not fractured'."""
    return _CLASS_LABELS.get(name.strip().lower().replace("_", " ").replace("-", " "))


def _split_name(name: str) -> str | None:
    return _SPLIT_NAMES.get(name.strip().lower())


def _is_image_name(name: str) -> bool:
    # "._image1.png" (macOS resource forks) and ".DS_Store" start with a dot: never images.
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted; hidden ones and __MACOSX are strays."""
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".") and e.name.lower() not in _SKIP_DIRS]
    return sorted((Path(e.path) for e in dirs), key=lambda p: p.name)


def _is_dicom_file(path: str) -> bool:
    """Whether a file without an extension is DICOM, from its first bytes (one small read)."""
    try:
        with open(path, "rb") as f:
            return looks_like_dicom(f.read(HEAD_BYTES))
    except OSError:
        return False


def _is_dicom_name(folder: str, name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_DICOM_SUFFIXES) or ("." not in name and _is_dicom_file(os.path.join(folder, name)))


def _walk_images(top: Path, *, dicom: bool = False) -> list[str]:
    """Image paths under top, relative to it with '/' separators, sorted, strays skipped.

    ``dicom``: also DICOM files (.dcm, .dicom, and extension-less files recognised by content).

    One scandir per folder and no stat per file (DirEntry.is_dir uses the directory listing's type):
    MURA's ~27,000 folders take about a second, and on a mounted Drive far fewer round trips than os.walk.
    """
    found: list[str] = []
    stack = [(os.fspath(top), "")]
    while stack:
        folder, prefix = stack.pop()
        dirs, files = [], []
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        if e.name.lower() not in _SKIP_DIRS:
                            dirs.append(e.name)
                    elif _is_image_name(e.name) or (dicom and _is_dicom_name(folder, e.name)):
                        files.append(e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.extend(prefix + f for f in sorted(files))
        stack.extend((os.path.join(folder, d), f"{prefix}{d}/") for d in sorted(dirs, reverse=True))
    return found


def _isin(values: pd.Series, pool) -> pd.Series:
    """values.isin(pool) through a Python set: pandas' Arrow-string isin is ~10x slower on 40k paths."""
    pool = set(pool)
    return pd.Series(np.fromiter((v in pool for v in values), dtype=bool, count=len(values)), index=values.index)


def _find_dir(root: Path, accept, what: str, hint: str) -> Path:
    """Breadth-first search for the first folder `accept`s, at most _SEARCH_DEPTH levels below root."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: {root} is not a folder. {hint}")
    queue = deque([(Path(os.path.abspath(root)), 0)])  # not resolve(): keep the path as mounted, symlinks and all
    while queue:
        d, depth = queue.popleft()
        if accept(d):
            return d
        if depth < _SEARCH_DEPTH:
            queue.extend((s, depth + 1) for s in _subdirs(d))
    raise FileNotFoundError(f"{what} not found in {root} or up to {_SEARCH_DEPTH} folders below it. {hint}")


def _examples(items, n: int = 3) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _warn_conflicts(conflicts: pd.Series, what: str) -> None:
    if len(conflicts):
        warnings.warn(
            f"{len(conflicts)} {what} filed under one label but labelled otherwise in the CSV: "
            f"{_examples(conflicts)}. The folder label is kept; see the label_conflict column.",
            LabelConflictWarning,
            stacklevel=outside_package_stacklevel(),
        )


def _order(manifest: pd.DataFrame) -> pd.DataFrame:
    extras = [c for c in manifest.columns if c not in MANIFEST_COLUMNS]
    out = manifest[MANIFEST_COLUMNS + extras].reset_index(drop=True)
    out["label"] = out["label"].astype(np.int64)
    for c in MANIFEST_COLUMNS:
        if c != "label":
            out[c] = out[c].astype(str)  # one string dtype whatever the reader built (object or str)
    return out


def dataset_dir(source: str, root: str | os.PathLike) -> Path:
    """The folder a source's image paths hang from, found at or up to 3 folders below ``root``.

    MURA-v1.1 itself for "mura" and "synthetic", the folder holding dataset.csv for "fracatlas", the
    level holding the split or class folders for the class-folder sets. The manifest stores paths
    relative to it, so a dataset found under another wrapper (kagglehub's versions/N/, Kaggle's
    datasets/<owner>/<slug>/) gives the same relative paths.

    Raises:
        FileNotFoundError: no such dataset under root. ValueError: unknown source.
    """
    if source in ("mura", "synthetic"):
        return _mura_dir(root)
    if source == "fracatlas":
        return _fracatlas_dir(root)
    if source in ("folder", "multiregion", "bonefracture"):
        return _find_class_root(Path(root))[0]
    raise ValueError(f"unknown source '{source}'; choose one of: mura, synthetic, fracatlas, folder")


# --------------------------------------------------------------------------------------------- MURA
def _mura_dir(root: str | os.PathLike) -> Path:
    return _find_dir(
        Path(root), _is_mura_dir, "MURA-v1.1 (train_image_paths.csv or train/XR_<PART>/...)",
        "Download it with xrai.data.download('mura') or pass root= the folder that holds MURA-v1.1.",
    )  # fmt: skip


def _is_mura_dir(d: Path) -> bool:
    if any((d / f"{s}_image_paths.csv").is_file() for s in MURA_SPLITS):
        return True
    return any(p.name.upper().startswith("XR_") for s in MURA_SPLITS for p in _subdirs(d / s))


def _relative_to_split(paths: pd.Series) -> pd.Series:
    """'MURA-v1.1/train/XR_X/...' -> 'train/XR_X/...': whatever the top folder is called on this disk."""
    paths = paths.astype(str).str.strip().str.replace("\\", "/", regex=False).str.rstrip("/")
    return paths.str.extract(r"(?:^|/)((?:train|valid)/.+)$", expand=False)


def read_mura(root: str | os.PathLike, *, source: str = "mura") -> pd.DataFrame:
    """Manifest of MURA v1.1 in its official layout (also the synthetic set, which copies it).

    Which images: those listed in `{train,valid}_image_paths.csv` and present on disk. Listed but
    missing -> warned and dropped. On disk but unlisted -> warned and left out (the CSVs define the
    release; extra files are usually partial copies or strays). Without the CSV, every image on
    disk under that split is used, with a warning.
    Label: from the study folder (`study1_positive` -> 1), checked against
    `{split}_labeled_studies.csv`; disagreements get `label_conflict=True` and a LabelConflictWarning.
    patient_id: "patient11185"; study_id: "train/XR_WRIST/patient11185/study1_positive" (the study's
    path inside MURA-v1.1, unique even if a patient appears in both splits); split: official train/valid.
    Extra columns: csv_label (the labeled_studies value, NaN if absent), label_conflict.

    Args:
        root: the folder holding MURA-v1.1, MURA-v1.1 itself, or up to 3 wrapper folders above it.
        source: value of the `source` column ("mura"; "synthetic" for the generated set).
    Raises:
        FileNotFoundError: no MURA tree under root.
    """
    mura = _mura_dir(root)
    frames, conflicts = [], []
    for split in MURA_SPLITS:
        if not (mura / split).is_dir() and not (mura / f"{split}_image_paths.csv").is_file():
            continue
        frame, split_conflicts = _read_mura_split(mura, split, source)
        frames.append(frame)
        conflicts.extend(split_conflicts)
    if not frames or not sum(len(f) for f in frames):
        raise FileNotFoundError(f"no MURA images found under {mura} (expected train/ and valid/ with "
                                "XR_<PART>/patientNNNNN/studyN_<label>/imageN.png)")  # fmt: skip
    _warn_conflicts(pd.Series(conflicts, dtype=object), "MURA studies")
    return _order(pd.concat(frames, ignore_index=True))


# The warnings below name read_mura's caller, as when read_mura raised them itself: stacklevel 3 from
# _read_mura_split (read_mura -> _read_mura_split), 4 from _mura_images.
def _read_mura_split(mura: Path, split: str, source: str) -> tuple[pd.DataFrame, list[str]]:
    """One official split's rows, and the studies whose labeled_studies entry disagrees with their folder."""
    rel = _mura_images(mura, split)
    parts = rel.str.extract(r"^(?P<split>[^/]+)/(?P<part>XR_[^/]+)/(?P<patient>[^/]+)/(?P<study>[^/]+)/[^/]+$")
    bad = parts["part"].isna()
    if bad.any():
        warnings.warn(f"{int(bad.sum())} images under {mura / split} are not at "
                      f"XR_<PART>/patient/study/image depth; left out: {_examples(rel[bad])}",
                      ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
        rel, parts = rel[~bad], parts[~bad]
    study_key = parts["split"] + "/" + parts["part"] + "/" + parts["patient"] + "/" + parts["study"]
    folder = parts["study"].str.extract(r"_(positive|negative)$", expand=False).str.lower()
    folder_label = folder.map({"positive": 1.0, "negative": 0.0})
    csv_label = _mura_study_labels(mura / f"{split}_labeled_studies.csv", study_key)
    conflict = folder_label.notna() & csv_label.notna() & (folder_label != csv_label)
    label = folder_label.fillna(csv_label)
    unlabelled = label.isna()
    if unlabelled.any():
        warnings.warn(f"{int(unlabelled.sum())} images have neither a _positive/_negative study folder "
                      f"nor a labeled_studies entry; left out: {_examples(rel[unlabelled])}",
                      ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    keep = ~unlabelled
    frame = pd.DataFrame({
        "path": str(mura) + "/" + rel[keep],
        "label": label[keep],
        "body_part": parts.loc[keep, "part"].str[3:].str.lower(),
        "patient_id": parts.loc[keep, "patient"],
        "study_id": study_key[keep],
        "split": split,
        "source": source,
        "csv_label": csv_label[keep],
        "label_conflict": conflict[keep],
    })  # fmt: skip
    return frame, list(study_key[conflict].drop_duplicates())


def _mura_images(mura: Path, split: str) -> pd.Series:
    """A split's images ('train/XR_.../image1.png'): those its image_paths CSV lists and the disk holds
    (the others warned about), or every image on disk when there is no CSV."""
    on_disk = pd.Series([f"{split}/{p}" for p in _walk_images(mura / split)], dtype=object)
    csv = mura / f"{split}_image_paths.csv"
    if not csv.is_file():
        if len(on_disk):
            warnings.warn(f"{csv} not found: using all {len(on_disk)} images on disk under {split}/ "
                          "(labels from folder names only)", ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
        return on_disk
    listed = _relative_to_split(pd.read_csv(csv, header=None, usecols=[0], dtype=str)[0]).dropna()
    listed = listed[listed.str.contains(_IMAGE_NAME_RE, case=False)].drop_duplicates()
    missing = listed[~_isin(listed, on_disk)]
    if len(missing):
        warnings.warn(f"{len(missing)} images listed in {csv.name} are missing under {mura}; "
                      f"dropped: {_examples(missing)}", ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    unlisted = on_disk[~_isin(on_disk, listed)]
    if len(unlisted):
        warnings.warn(f"{len(unlisted)} images under {mura / split} are not in {csv.name}; left out: "
                      f"{_examples(unlisted)}", ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    return listed[_isin(listed, on_disk)]


def _mura_study_labels(studies_csv: Path, study_key: pd.Series) -> pd.Series:
    """Each row's label in {split}_labeled_studies.csv (float; NaN when absent or without the CSV)."""
    if not studies_csv.is_file():
        return pd.Series(np.nan, index=study_key.index)
    studies = pd.read_csv(studies_csv, header=None, usecols=[0, 1], names=["study", "label"], dtype={0: str})
    studies["study"] = _relative_to_split(studies["study"])
    studies = studies.dropna(subset=["study"]).drop_duplicates("study")
    return study_key.map(studies.set_index("study")["label"].astype(float))


# ---------------------------------------------------------------------------------------- FracAtlas
def _class_dirs(d: Path) -> list[tuple[Path, int]]:
    return [(s, lab) for s in _subdirs(d) if (lab := class_label(s.name)) is not None]


def _is_fracatlas_dir(d: Path) -> bool:
    return (d / "dataset.csv").is_file() and any(s.name.lower() == "images" for s in _subdirs(d))


def _fracatlas_dir(root: str | os.PathLike) -> Path:
    return _find_dir(
        Path(root), _is_fracatlas_dir, "FracAtlas (dataset.csv beside images/)",
        "Download it with xrai.data.download('fracatlas') or pass root= the folder that holds dataset.csv.",
    )  # fmt: skip


def read_fracatlas(root: str | os.PathLike) -> pd.DataFrame:
    """Manifest of FracAtlas: images/{Fractured,Non_fractured}/*.jpg with dataset.csv.

    Label: from the folder; the CSV's `fractured` is kept as `csv_fractured` and any disagreement is
    flagged (`label_conflict`, LabelConflictWarning). body_part: the one set flag of hand/leg/hip/
    shoulder; "mixed" when `mixed` is set or several are; "unknown" when none (or the image is not in
    the CSV). No patient ids, studies or official split: those columns are "". The other CSV columns
    (hardware, multiscan, fracture_count, frontal, lateral, oblique, ...) follow as extras.

    Args:
        root: the folder holding dataset.csv and images/, or up to 3 wrapper folders above it.
    Raises:
        FileNotFoundError: no FracAtlas tree under root.
    """
    top = _fracatlas_dir(root)
    images = next(s for s in _subdirs(top) if s.name.lower() == "images")
    rows = []
    for cls_dir, lab in _class_dirs(images):
        rows.extend((str(cls_dir / rel), os.path.basename(rel), lab) for rel in _walk_images(cls_dir))
    if not rows:
        raise FileNotFoundError(f"no images under {images}/{{Fractured,Non_fractured}}")
    disk = pd.DataFrame(rows, columns=["path", "image_id", "label"]).sort_values("path", kind="stable")
    csv = pd.read_csv(top / "dataset.csv", dtype={"image_id": str})
    if "image_id" not in csv.columns:
        raise ValueError(f"{top / 'dataset.csv'} has no image_id column; columns: {list(csv.columns)}")
    csv = csv.drop_duplicates("image_id").rename(columns={"fractured": "csv_fractured"})
    m = disk.merge(csv, on="image_id", how="left", validate="many_to_one", indicator=True)
    unlisted = m.loc[m["_merge"] == "left_only", "path"]
    if len(unlisted):
        warnings.warn(f"{len(unlisted)} FracAtlas images are not in dataset.csv (body_part 'unknown'): "
                      f"{_examples(unlisted)}", ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    absent = csv.loc[~csv["image_id"].isin(disk["image_id"]), "image_id"]
    if len(absent):
        warnings.warn(f"{len(absent)} dataset.csv rows have no image under {images}: {_examples(absent)}",
                      ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    m = m.drop(columns="_merge")
    parts = [p for p in FRACATLAS_PARTS if p in m.columns]
    flags = m[parts].fillna(0).astype(int).clip(0, 1) if parts else pd.DataFrame(index=m.index)
    n_set = flags.sum(axis=1) if parts else pd.Series(0, index=m.index)
    mixed = m["mixed"].fillna(0).astype(int) > 0 if "mixed" in m.columns else pd.Series(False, index=m.index)
    body = pd.Series("unknown", index=m.index, dtype=object)
    if parts:
        body[n_set == 1] = flags[n_set == 1].idxmax(axis=1)
    body[mixed | (n_set > 1)] = "mixed"
    m["body_part"] = body
    m["patient_id"] = m["study_id"] = m["split"] = ""
    m["source"] = "fracatlas"
    if "csv_fractured" in m.columns:
        m["label_conflict"] = m["csv_fractured"].notna() & (m["csv_fractured"] != m["label"])
        _warn_conflicts(m.loc[m["label_conflict"], "path"], "FracAtlas images")
    else:
        m["label_conflict"] = False
    for c in csv.columns:  # ints stay ints where every image had a CSV row
        if c != "image_id" and c in m.columns and m[c].notna().all() and pd.api.types.is_float_dtype(m[c]):
            if (m[c] == m[c].round()).all():
                m[c] = m[c].astype(np.int64)
    return _order(m)


# ------------------------------------------------------------------------------------ class folders
def _find_class_root(root: Path) -> tuple[Path, bool]:
    """Descend single-child wrapper folders to the level holding split or class folders.

    Returns (folder, has_split_level).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"class-folder dataset: {root} is not a folder")
    d = Path(os.path.abspath(root))
    for _ in range(16):  # any realistic chain of wrappers; bounded so a symlink loop cannot spin
        subs = _subdirs(d)
        if any(_split_name(s.name) for s in subs):
            return d, True
        if any(class_label(s.name) is not None for s in subs):
            return d, False
        if len(subs) != 1:
            break
        d = subs[0]
    names = ", ".join(s.name for s in _subdirs(d)) or "no sub-folders"
    raise FileNotFoundError(
        f"no split folders (train, val/valid/validation, test) or class folders (fractured, not fractured, "
        f"normal, abnormal, positive, negative, ...) found in {d} (it holds: {names}); pass root= the folder "
        "that holds them"
    )


def read_class_folders(root: str | os.PathLike) -> pd.DataFrame:
    """Manifest of a `{split}/{class}/image` or `{class}/image` tree (Kaggle's fracture sets).

    Wrapper folders with a single child are stepped through. Split names: train, val/valid/validation
    (-> "valid"), test; with no split level, split is "". Class names, any case, "_" or " ":
    fractured/abnormal/positive -> 1; not fractured/non fractured/normal/negative -> 0. Other folders
    are warned about and skipped. body_part "unknown", source "folder", no patient or study ids (not
    even from DICOM files: their patient tags are never read). Images: PNG, JPEG and DICOM (.dcm,
    .dicom, or no extension and DICOM content).
    """
    top, has_splits = _find_class_root(Path(root))
    split_dirs = [(s, _split_name(s.name)) for s in _subdirs(top)] if has_splits else [(top, "")]
    rows, skipped = [], []
    for split_dir, split in split_dirs:
        if split is None:
            skipped.append(split_dir.name)
            continue
        for sub in _subdirs(split_dir):
            lab = class_label(sub.name)
            if lab is None:
                skipped.append(f"{split_dir.name}/{sub.name}" if split else sub.name)
                continue
            rows.extend((str(sub / rel), lab, split) for rel in _walk_images(sub, dicom=True))
    if skipped:
        warnings.warn(f"folders in {top} that are neither a split nor a class were skipped: {_examples(skipped)}",
                      ManifestWarning, stacklevel=outside_package_stacklevel())  # fmt: skip
    if not rows:
        raise FileNotFoundError(f"no .png/.jpg/.jpeg or DICOM images in the class folders under {top}")
    m = pd.DataFrame(rows, columns=["path", "label", "split"])
    m["body_part"] = "unknown"
    m["patient_id"] = m["study_id"] = ""
    m["source"] = "folder"
    return _order(m)
