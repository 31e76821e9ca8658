"""Phantom X-rays in MURA v1.1's exact layout, with every fracture line's position recorded.

The set is the built-in default for the demo, the tests and the notebooks in CI: small, made in
seconds, deterministic, and learnable from scratch in a few CPU epochs. Each image is a grey
"radiograph" of one body part: a noisy dark background, a soft-tissue ellipse and long bones drawn
as projected hollow cylinders (bright cortical rims, greyer medulla). An abnormal study's images
carry a fracture: a thin lucent gap across one bone's shaft, the far fragment displaced and
angulated. Normal and abnormal images share every other distribution (anatomy, bone count, view,
contrast, brightness, noise), so the gap is the only signal a model can use.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xrai.data import phantom
from xrai.data.phantom import PARTS
from xrai.env import xrai_home

SYNTHETIC_VERSION = 2  # bump whenever the images change: it names the default folder
MURA_DIR = "MURA-v1.1"
LINES_CSV = "fracture_lines.csv"
COMPLETE_MARKER = ".complete"
VALID_SHARE = 0.15
POSITIVE_RATE = 0.45  # MURA's studies are about 40% abnormal
# A generous mask: the gap itself plus `width` pixels on either side, so that a Grad-CAM peak on the
# gap's edge (where the broken cortex is) still counts as a hit.
MASK_DILATION = 1.0
DEFAULT_PATIENTS = 80  # about 1,600 images: 3 epochs of about 36 steps each
DEFAULT_SIZE = 256
_DEFAULT_OPTIONS = {"patients_per_part": DEFAULT_PATIENTS, "size": DEFAULT_SIZE, "seed": 0}  # default_synthetic_root

@dataclass(frozen=True, kw_only=True)
class _Study:
    split: str
    part: str
    patient: int  # global patient number, as in MURA's patientNNNNN
    number: int  # study number within the patient
    label: int
    views: int
    key: tuple[int, ...]  # stable seed material for the study's anatomy

    @property
    def folder(self) -> str:
        kind = "positive" if self.label else "negative"
        return f"{MURA_DIR}/{self.split}/XR_{self.part}/patient{self.patient:05d}/study{self.number}_{kind}/"


def default_synthetic_root(**options: Any) -> Path:
    """Where a synthetic set lives: ``xrai_home()/"synthetic-v<N>"`` for the default set, and a folder
    named after its options (``synthetic-v<N>-p8-s128-seed0``) for any other."""
    chosen = {**_DEFAULT_OPTIONS, **options}
    if chosen == _DEFAULT_OPTIONS:
        return xrai_home() / f"synthetic-v{SYNTHETIC_VERSION}"
    name = f"p{chosen['patients_per_part']}-s{chosen['size']}-seed{chosen['seed']}"
    return xrai_home() / f"synthetic-v{SYNTHETIC_VERSION}-{name}"


def synthetic_options(root: str | Path) -> dict[str, int] | None:
    """The make_synthetic() options a finished synthetic tree was made with (read from its marker), or None.

    Returns:
        ``{"version", "patients_per_part", "seed", "size"}``; the same options make byte-identical files
        (with the same version), so a run folder can have its set made again on another machine.
    """
    base = Path(root)
    if base.name != MURA_DIR:
        base = base / MURA_DIR
    try:
        words = (base / COMPLETE_MARKER).read_text().split()
    except OSError:
        return None
    pairs = dict(w.split("=", 1) for w in words if "=" in w)
    version = next((w[1:] for w in words if w.startswith("v") and w[1:].isdigit()), "")
    try:
        return {"version": int(version), **{k: int(pairs[k]) for k in ("patients_per_part", "seed", "size")}}
    except (KeyError, ValueError):  # a marker from before the options were written into it
        return None


def ensure_synthetic(root: str | Path | None = None, **options: Any) -> Path:
    """Generate a synthetic set at ``root`` (default: default_synthetic_root(**options)) unless it is there.

    ``options`` go to :func:`make_synthetic` (tests use a tiny set). The tree is written into a temporary folder beside ``root`` and renamed into place, so a run that
    is interrupted, or one racing another process, never leaves a half tree that reads as complete.

    Raises:
        FileExistsError: ``root`` exists, is not empty and is not a finished synthetic set.
    """
    root = Path(root) if root is not None else default_synthetic_root(**options)
    if (root / MURA_DIR / COMPLETE_MARKER).is_file():
        return root
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty folder someone made for us: the rename below replaces it
        else:
            raise FileExistsError(
                f"{root} exists but holds no finished synthetic set (no {MURA_DIR}/{COMPLETE_MARKER}); "
                "delete it or pass another root"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        make_synthetic(tmp, **options)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first (the target is now a non-empty folder): use theirs.
            if not (root / MURA_DIR / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_synthetic(root: str | Path, *, patients_per_part: int = DEFAULT_PATIENTS, seed: int = 0,
                   size: int = DEFAULT_SIZE) -> Path:
    """Write a phantom X-ray set in MURA v1.1's layout under ``root/MURA-v1.1`` and return ``root``.

    Layout: ``{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png`` for the
    seven MURA body parts, patients split about 85/15 between train and valid (both labels in each
    split of each part), 1-2 studies per patient and 1-3 views per study; the four headerless CSVs
    (``{train,valid}_image_paths.csv``, ``{train,valid}_labeled_studies.csv``); and
    ``fracture_lines.csv`` (``path,x0,y0,x1,y1,width`` in pixels) for every abnormal image. The
    same arguments always give byte-identical files.

    Args:
        root: folder to write into (created when missing).
        patients_per_part: patients per body part (>= 2, so each part has a train and a valid patient).
        seed: changes every random choice.
        size: side of the square images in pixels (>= 32).

    Raises:
        ValueError: patients_per_part < 2 or size < 32.
    """
    if patients_per_part < 2:
        raise ValueError(f"patients_per_part must be >= 2 (one train and one valid patient), got {patients_per_part}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    root = Path(root)
    base = root / MURA_DIR
    marker = base / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()  # rewriting: the tree is incomplete until we finish
    studies = _plan(patients_per_part, seed)
    lines: list[tuple[str, float, float, float, float, float]] = []
    for study in studies:
        folder = base / study.folder.removeprefix(MURA_DIR + "/")
        folder.mkdir(parents=True, exist_ok=True)
        anatomy = phantom.anatomy(study.part, np.random.default_rng([seed, 1, *study.key]))
        for view in range(1, study.views + 1):
            rng = np.random.default_rng([seed, 2, *study.key, view])
            pixels, line = phantom.render(anatomy, study.label, size, rng)
            rel = f"{study.folder}image{view}.png"
            Image.fromarray(pixels, mode="L").save(base / rel.removeprefix(MURA_DIR + "/"), compress_level=1)
            if line is not None:
                lines.append((rel, *line))
    for split in ("train", "valid"):
        chosen = [s for s in studies if s.split == split]
        _write_lines(
            base / f"{split}_image_paths.csv",
            [f"{s.folder}image{v}.png" for s in chosen for v in range(1, s.views + 1)],
        )
        _write_lines(base / f"{split}_labeled_studies.csv", [f"{s.folder},{s.label}" for s in chosen])
    with open(base / LINES_CSV, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "x0", "y0", "x1", "y1", "width"])
        writer.writerows([rel, *(f"{v:.2f}" for v in values)] for rel, *values in lines)
    marker.write_text(f"xrai synthetic v{SYNTHETIC_VERSION} patients_per_part={patients_per_part} seed={seed} size={size}\n")
    return root


def read_fracture_lines(root: str | Path) -> Any:
    """``fracture_lines.csv`` of a synthetic tree as a DataFrame (path, x0, y0, x1, y1, width).

    ``root`` may be the folder above ``MURA-v1.1`` or that folder itself.
    """
    import pandas as pd  # here, not at import: xrai.data loads this module pandas-free (see xrai.data)

    base = Path(root)
    if base.name != MURA_DIR:
        base = base / MURA_DIR
    return pd.read_csv(base / LINES_CSV, dtype={"path": str})


def fracture_mask(
    row_or_path: Mapping[str, Any] | str | Path,
    shape: tuple[int, int],
    *,
    image_size: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """The recorded fracture line rasterised as a bool (H, W) mask, or None for a normal image.

    The gap is dilated by its width on both sides. Coordinates are scaled from the stored image's
    size to ``shape`` (synthetic images are square, so letterboxing is a plain resize).

    Args:
        row_or_path: a manifest row (``line_x0, line_y0, line_x1, line_y1, line_width``, NaN for a
            normal image; ``x0 ... width`` also accepted) or an image path inside a synthetic tree,
            looked up in its ``fracture_lines.csv``.
        shape: (H, W) of the mask wanted.
        image_size: (H, W) of the stored image the coordinates refer to; read from the file's header
            when not given.

    Raises:
        FileNotFoundError: a path with no ``MURA-v1.1/fracture_lines.csv`` above it.
    """
    if isinstance(row_or_path, (str, Path)):
        path = Path(row_or_path)
        line = _line_for_path(path)
    else:
        row = row_or_path
        path = Path(row["path"]) if "path" in row else None
        prefix = "line_" if "line_x0" in row else ""
        values = [row[prefix + k] for k in ("x0", "y0", "x1", "y1", "width")]
        # None or NaN (a normal image in a manifest) means there is no line
        line = None if any(v is None or v != v for v in values) else tuple(float(v) for v in values)
    if line is None:
        return None
    height, width = int(shape[0]), int(shape[1])
    if image_size is None:
        if path is None:
            image_size = (height, width)
        else:
            with Image.open(path) as img:  # header only: no pixels are decoded
                image_size = (img.height, img.width)
    sy, sx = height / image_size[0], width / image_size[1]
    x0, y0, x1, y1, w = line
    half = max(0.5 * w * (sx + sy) / 2 * (1 + 2 * MASK_DILATION), 1.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return phantom.segment_distance(xx + 0.5, yy + 0.5, x0 * sx, y0 * sy, x1 * sx, y1 * sy) <= half


# ---- layout ---------------------------------------------------------------------------------


def _plan(patients_per_part: int, seed: int) -> list[_Study]:
    """Every study's split, part, patient, labels and view count, in writing order."""
    drafts: dict[str, list[tuple[str, list[list[int]]]]] = {"train": [], "valid": []}
    n_valid = min(max(1, round(patients_per_part * VALID_SHARE)), patients_per_part - 1)
    for part_index, part in enumerate(PARTS):
        rng = np.random.default_rng([seed, 0, part_index])
        valid = set(rng.choice(patients_per_part, size=n_valid, replace=False).tolist())
        groups: dict[str, list[list[list[int]]]] = {"train": [], "valid": []}
        for p in range(patients_per_part):
            n_studies = 1 + int(rng.random() < 0.4)
            studies = [[int(rng.random() < POSITIVE_RATE), int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.3]))]
                       for _ in range(n_studies)]
            groups["valid" if p in valid else "train"].append(studies)
        for split, patients in groups.items():
            _ensure_both_labels(patients, rng)
            drafts[split].extend((part, studies) for studies in patients)
    out: list[_Study] = []
    number = 0
    for split in ("train", "valid"):  # MURA numbers train patients first, then valid
        for part, studies in drafts[split]:
            number += 1
            for s, (label, views) in enumerate(studies, start=1):
                out.append(_Study(split=split, part=part, patient=number, number=s, label=label,
                                  views=views, key=(PARTS.index(part), number, s)))
    return out


def _ensure_both_labels(patients: list[list[list[int]]], rng: np.random.Generator) -> None:
    """Make sure a split of a part holds both a normal and an abnormal study."""
    for wanted in (1, 0):
        labels = [label for studies in patients for label, _ in studies]
        if wanted in labels:
            continue
        if len(labels) == 1:  # a single study cannot hold both: add one
            patients[0].append([wanted, int(rng.choice([1, 2, 3]))])
        else:  # every study has the other label, so flipping one keeps that label present
            patients[0][-1][0] = wanted


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


@functools.lru_cache(maxsize=8)
def _lines_table(csv_path: str, mtime: float) -> dict[str, tuple[float, ...]]:
    with open(csv_path, newline="") as handle:
        return {row["path"]: tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1", "width"))
                for row in csv.DictReader(handle)}


def _line_for_path(path: Path) -> tuple[float, ...] | None:
    resolved = path.resolve()
    for parent in resolved.parents:
        if parent.name == MURA_DIR and (parent / LINES_CSV).is_file():
            table = _lines_table(str(parent / LINES_CSV), (parent / LINES_CSV).stat().st_mtime)
            return table.get(resolved.relative_to(parent.parent).as_posix())
    raise FileNotFoundError(f"{path} is not inside a synthetic tree (no {MURA_DIR}/{LINES_CSV} above it)")
