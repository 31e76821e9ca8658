"""Grad-CAM galleries of a scored split: the most confident true positives, false positives, false negatives
and true negatives (correct normals), each a row of tiles: per image, original | heat map | overlay side by
side under its actual label, predicted label and probability (``xrai.evaluate.single.side_by_side``).

A notebook cell showing a gallery says at most one line about damaged images: the evaluation's (when the
split is scored first), or the gallery's own for images not listed yet in the run's damaged_images.csv.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xrai.data import read_manifest, relocate_paths
from xrai.data.decode.images import DamagedImages, TruncatedImageWarning, read_image
from xrai.evaluate.run import evaluate_run
from xrai.evaluate.single import side_by_side
from xrai.explain.cam import explain_paths
from xrai.explain.overlays import save_png, text_band, tile_row
from xrai.labels import CLASS_NAMES
from xrai.runs.layout import RunFolder, read_json
from xrai.runs.load import load_run
from xrai.runs.operating import operating_point

__all__ = ["GALLERY_KINDS", "gallery", "tile"]

GALLERY_KINDS = {
    "tp": "most confident true positives",
    "fp": "most confident false positives",
    "fn": "most confident false negatives",
    "tn": "most confident true negatives (correct normals)",
}


def tile(path: str, cam: np.ndarray, label: int, probability: float, threshold: float, *,
         names: tuple[str, str] = CLASS_NAMES, damaged: DamagedImages | None = None) -> np.ndarray:
    """A gallery tile: original | heat map | overlay of one image under its labels and probability."""
    return side_by_side(read_image(path, damaged=damaged), cam, label=label, probability=probability, threshold=threshold, names=names)


def _select(pred: Any, kind: str, threshold: float, n: int) -> Any:
    p, y = pred["probability"], pred["label"]
    if kind == "tp":
        rows = pred[(y == 1) & (p >= threshold)].sort_values("probability", ascending=False)
    elif kind == "fp":
        rows = pred[(y == 0) & (p >= threshold)].sort_values("probability", ascending=False)
    elif kind == "fn":
        rows = pred[(y == 1) & (p < threshold)].sort_values("probability", ascending=True)
    else:
        rows = pred[(y == 0) & (p < threshold)].sort_values("probability", ascending=True)
    return rows.head(n)


def gallery(
    run_dir: str | Path,
    *,
    split: str = "test",
    n: int = 4,
    method: str = "gradcam",
    progress: bool = True,
) -> dict[str, Path]:
    """Galleries of the most confident true positives, false positives, false negatives and true negatives.

    Reads predictions_<split>.csv (evaluating the split first when it is missing) and the run's
    validation threshold and calibration (``xrai.runs.load.load_run``); writes under run_dir/gradcam/: ``<kind>_<split>.png`` (one row of
    tiles, each original | heat map | overlay with the actual and predicted label and the probability; a short
    note when there is no such case) and ``<split>_<kind>_<rank>.png`` per image shown (its overlay). Damaged
    images (truncated, unreadable) get one warning at most, listed in the run's damaged_images.csv.

    Returns:
        {"tp": path, "fp": path, "fn": path, "tn": path, "tp_1": path, ...}.
    """
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    run = load_run(run_dir, stale="default")  # evaluating below chooses a stale operating point again
    evaluated = False  # True: the evaluation below had damaged images to say (gallery's one line says them)
    made_with = ((read_json(folder.report_json(split)) or {}).get("checkpoint") or {}).get("sha256")
    if not folder.predictions_csv(split).is_file() or made_with != run.checkpoint_sha256 or run.point.source == "default":
        evaluated = _evaluate(run_dir, split, progress)  # the predictions are this checkpoint's
        # the same checkpoint and model: only the operating point it (re)wrote is new
        run.point = operating_point(run_dir, run.checkpoint_sha256)[0] or run.point
    pred = folder.read_predictions(split)
    if folder.manifest_csv.is_file():  # predicted on another machine (a fresh runtime): find its images here
        pred["path"] = relocate_paths(pred["path"], read_manifest(run_dir, splits=(split,)))
    threshold, model, config = run.threshold, run.model, run.config
    names = folder.class_names()
    out_dir = folder.gradcam
    written: dict[str, Path] = {}
    damaged = DamagedImages()  # truncated (or since broken) images shown: one line at the end at most
    for kind, title in GALLERY_KINDS.items():
        rows = _select(pred, kind, threshold, n)
        stems = [f"{split}_{kind}_{rank}" for rank in range(1, len(rows) + 1)]
        results = explain_paths(
            model, config, rows["path"].tolist(), threshold=threshold, out_dir=out_dir,
            labels=rows["label"].astype(int).tolist(), method=method, names=stems, calibration=run.calibration,
            class_names=names, damaged=damaged,
        )
        tiles = []
        for name, label, r in zip(stems, rows["label"].astype(int), results):
            if r["overlay"] is not None:
                written[f"{kind}_{name.rsplit('_', 1)[1]}"] = r["overlay"]
                tiles.append(tile(r["path"], r["cam"], label, r["probability"], threshold, names=names,
                                  damaged=damaged))
        if not tiles:
            note = text_band(480, [f"none on {split} at threshold {threshold:.3f}"], (200, 200, 200))
            tiles = [np.pad(note, ((140, 180 - note.shape[0]), (0, 0), (0, 0)))]
        heading = f"{title} ({split}, threshold {threshold:.3f}, {method})"
        written[kind] = save_png(tile_row(tiles, heading), out_dir / f"{kind}_{split}.png")
    _say_damaged(damaged, folder, evaluated=evaluated)
    return written


def _evaluate(run_dir: Path, split: str, progress: bool) -> bool:
    """Score the split, its warnings said again at gallery()'s caller (a notebook cell), not at lines inside
    the package; except those about damaged images (predict's line for each split it scores, a truncated
    image read again), which gallery()'s one line says instead. Returns whether there were such."""
    folder, caught, done = RunFolder(run_dir), [], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate_run(run_dir, split=split, progress=progress)
        done = True
    finally:  # failed: all it said up to there, as it was
        about = [done and _about_damaged(said, folder) for said in caught]
        for said, damaged in zip(caught, about):
            if not damaged:
                warnings.warn(said.message, said.category, stacklevel=3)
    return any(about)


def _about_damaged(said: warnings.WarningMessage, folder: RunFolder) -> bool:
    """A truncated image's own warning, or a line pointing at the run's list of damaged images."""
    return issubclass(said.category, TruncatedImageWarning) or str(folder.damaged_csv) in str(said.message)


def _listed(folder: RunFolder) -> dict[str, tuple[str, str]]:
    """The run's damaged_images.csv: {path: (problem, reason)} ({} when there is none)."""
    try:
        with open(folder.damaged_csv, newline="") as f:
            return {row["path"]: (row.get("problem") or "", row.get("reason") or "") for row in csv.DictReader(f)
                    if row.get("path")}
    except (OSError, csv.Error, KeyError):
        return {}


def _say_damaged(damaged: DamagedImages, folder: RunFolder, *, evaluated: bool) -> None:
    """gallery()'s one line about damaged images: when its evaluation had some (all the run lists, then),
    or when it showed some the run's damaged_images.csv does not list yet."""
    listed = _listed(folder)
    if not evaluated and all(path in listed for path, _, _ in damaged.entries()):
        return  # none, or all said already where the split was scored
    if evaluated:
        for path, (problem, reason) in listed.items():
            damaged.add(path, problem, reason)
    if line := damaged.summary(folder.damaged_csv):
        warnings.warn(line, UserWarning, stacklevel=3)  # at gallery()'s caller: no source line of the package
