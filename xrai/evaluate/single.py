"""One X-ray explained with a run: the original, the Grad-CAM heat map and the overlay side by side, with the
actual label (when known), the predicted label and the calibrated probability at the run's thresholds.

- ``side_by_side``: the three panels of one image under a text band, as an RGB array (the galleries' tiles).
- ``explain_file``: any file xrai decodes (PNG, JPEG, DICOM) scored at the run's Youden and screening
  thresholds, with a matplotlib figure of the three panels (the notebooks' "your own X-ray", the upload widget).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure

from xrai.data.decode.images import ImageError, read_image
from xrai.errors import UserError, one_line
from xrai.explain.cam import explain_paths
from xrai.explain.overlays import overlay, text_band
from xrai.labels import CLASS_NAMES
from xrai.runs.layout import RunFolder, read_json
from xrai.runs.load import load_run

__all__ = ["PANELS", "ExplainFileError", "explain_file", "heat_map", "side_by_side", "thresholds_of"]

PANELS = ("original", "heat map", "overlay")
_GAP = 6  # px between panels


class ExplainFileError(UserError, ValueError):
    """A file that cannot be explained (missing, not an image xrai decodes); one line naming the file."""


def heat_map(cam: np.ndarray) -> np.ndarray:
    """A CAM in [0, 1] as an RGB uint8 picture in the jet colours of the overlay (red: high)."""
    scaled = np.uint8(np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0) * 255)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def _band_lines(label: int | None, probability: float, threshold: float, names: tuple[str, str]) -> list[str]:
    predicted = int(probability >= threshold)
    lines = [] if label is None else [f"actual: {names[int(label)]}"]
    return lines + [f"predicted: {names[predicted]}", f"p({names[1]}) = {probability:.3f} (threshold {threshold:.3f})"]


def side_by_side(image: np.ndarray, cam: np.ndarray, *, label: int | None, probability: float, threshold: float,
                 names: tuple[str, str] = CLASS_NAMES, height: int = 256) -> np.ndarray:
    """original | heat map | overlay of one image, each captioned, under a band with the actual label, the
    predicted label and the probability (green when right, red when wrong, white without a label).

    Args:
        image: the original grey uint8 (H, W) image (``read_image``).
        cam: its map on the image's own pixels (H, W) in [0, 1] (``explain_paths``' ``cam``).
        height: the panels' height in pixels (the width follows the image's aspect ratio).

    Returns:
        RGB uint8 (band + caption + height, 3 * width + gaps, 3).
    """
    h, w = image.shape[:2]
    size = (max(1, round(w * height / h)), int(height))
    grey = cv2.resize(np.asarray(image, dtype=np.uint8), size, interpolation=cv2.INTER_AREA if height < h
                      else cv2.INTER_LINEAR)
    cam = cv2.resize(np.asarray(cam, dtype=np.float32), size, interpolation=cv2.INTER_LINEAR)
    panels = [np.repeat(grey[..., None], 3, axis=2), heat_map(cam), overlay(grey, cam)]
    captioned = [np.concatenate([text_band(size[0], [title], (200, 200, 200), max_scale=0.6), p], axis=0)
                 for title, p in zip(PANELS, panels)]
    gap = np.zeros((captioned[0].shape[0], _GAP, 3), dtype=np.uint8)
    row = np.concatenate([captioned[0], gap, captioned[1], gap, captioned[2]], axis=1)
    colour = (255, 255, 255)
    if label is not None:
        colour = (90, 220, 90) if int(label) == int(probability >= threshold) else (255, 90, 90)
    band = text_band(row.shape[1], _band_lines(label, probability, threshold, names), colour, max_scale=0.8)
    return np.concatenate([band, row], axis=0)


def thresholds_of(run_dir: str | Path, primary: float) -> dict[str, float]:
    """The run's image thresholds chosen on valid: {"youden": ..., "screening": ...} from its operating-point
    file's ``operating_points`` (``primary``, the threshold it decides with, under its method's name when
    the file has none)."""
    report = read_json(RunFolder(run_dir).operating_point_file) or {}
    points = report.get("operating_points") or {}
    out = {("screening" if name == "sensitivity" else name): float(p["threshold"]) for name, p in points.items()
           if p.get("threshold") is not None}
    if not out:
        method = report.get("threshold_method", "youden")
        out["screening" if method == "sensitivity" else method] = float(primary)
    return out


def _read(path: str) -> np.ndarray:
    """The file's grey image, or one ExplainFileError line naming the file."""
    try:
        return read_image(path)
    except (ImageError, OSError) as err:
        reason = one_line(err)
        raise ExplainFileError(reason if path in reason else f"{path}: {reason}") from None


def _figure(image: np.ndarray, cam: np.ndarray, title: str) -> Figure:
    h, w = image.shape[:2]
    fig = Figure(figsize=(3 * 3.2, 3.2 * h / w + 0.9), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    shown = axes[1].imshow(cam, cmap="jet", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label="Grad-CAM (0 to 1)")
    axes[2].imshow(overlay(image, cam))
    for ax, name in zip(axes, PANELS):
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig


def explain_file(run_dir: str | Path, path: str | os.PathLike, *, method: str = "gradcam") -> dict[str, Any]:
    """One X-ray file scored and explained with a run, at the thresholds chosen on its valid split.

    Args:
        run_dir: an evaluated run folder (its operating point chosen on valid for its current checkpoint).
        path: a PNG, JPEG or DICOM file (any format ``xrai.data.read_image`` decodes).
        method: a CAM method of ``xrai.explain.cam.CAM_METHODS``.

    Returns:
        {"path", "probability" (calibrated, of the run's positive class), "label" (the word at the run's
        threshold), "predicted" (0/1), "threshold" (the one the run decides with), "thresholds" ({"youden",
        "screening"}), "calls" (the word at each threshold), "calibrated" (bool), "text" (one line), "figure"
        (matplotlib Figure: original | heat map | overlay, titled with the label and probability), "cam"}.

    Raises:
        ExplainFileError: the file is missing or not an image xrai decodes (one line naming it).
        StaleOperatingPointError, FileNotFoundError: the run's operating point is stale or was never chosen
            (the message names the command to run).
    """
    path = os.fspath(path)
    image = _read(path)
    run = load_run(run_dir)  # a stale operating point: one line naming `python -m xrai evaluate`
    if run.point.source == "default":
        raise FileNotFoundError(f"no threshold for this checkpoint: {run.point.note}; run "
                                f"`python -m xrai evaluate --run {run_dir} --split valid` first")
    names = RunFolder(run_dir).class_names()
    (result,) = explain_paths(run.model, run.config, [path], threshold=run.threshold, method=method,
                              calibration=run.calibration, class_names=names)
    if result["error"]:  # readable above, unreadable now: the file changed under us
        raise ExplainFileError(f"{path}: {result['error']}")
    probability, cam = float(result["probability"]), result["cam"]
    thresholds = thresholds_of(run_dir, run.threshold)
    calls = {name: names[int(probability >= t)] for name, t in thresholds.items()}
    label = names[int(probability >= run.threshold)]
    at = "; ".join(f"{'Youden' if name == 'youden' else name} threshold {t:.3f}: {calls[name]}"
                   for name, t in thresholds.items())
    text = (f"{Path(path).name}: p({names[1]}) = {probability:.3f} "
            f"({'calibrated' if run.calibrated else 'not calibrated'}); {at}")
    title = f"{Path(path).name}: {label}, p({names[1]}) = {probability:.3f} (threshold {run.threshold:.3f})"
    return {"path": path, "probability": probability, "label": label, "predicted": int(probability >= run.threshold),
            "threshold": float(run.threshold),
            "thresholds": thresholds, "calls": calls, "calibrated": bool(run.calibrated), "text": text,
            "figure": _figure(image, cam, title), "cam": cam}
