"""Explanations measured, not only shown: faithfulness, a randomisation sanity check, the pointing game.

For each CAM method offered (``xrai.explain.cam.CAM_METHODS``), on a seeded sample of the evaluated split:

- **faithfulness** with grad-cam's own metrics: ``ROADCombined`` (Rong et al., "A Consistent and
  Efficient Evaluation Strategy for Attribution Methods", ICML 2022: the explained output after
  removing the least relevant pixels minus after removing the most relevant, averaged over
  percentiles and halved; higher is more faithful) and ``CamMultImageConfidenceChange`` (the change of
  the explained output when the image is multiplied by its map). The targets are grad-cam's
  ``BinaryClassifierOutputTarget``: the logit for class 1, its negation for class 0, so both scores are
  in logit units of the class each image is explained for (its predicted class at the run's
  threshold). A map of uniform noise at the CAM's own grid is scored the same way as a reference.
- **the randomisation check** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): maps
  from the same architecture with randomly initialised weights must differ from the trained model's.
  The Spearman rank correlation between the two maps of each image is reported; a method whose maps
  barely change (mean correlation at or above SANITY_MAX_SPEARMAN) is flagged.
- on the synthetic set, **the pointing game** against the recorded fracture lines, on the sample's
  true positives (``line_localisation``; tolerance half a CAM cell).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from scipy.stats import spearmanr

from xrai.data import read_manifest
from xrai.data.augment import preprocess
from xrai.data.contract import model_normalisation
from xrai.data.decode.images import DamagedImages, ImageError, read_image
from xrai.data.synthetic import fracture_mask
from xrai.evaluate.metrics import cam_mass_in_mask, pointing_chance, pointing_game
from xrai.explain.cam import CAM_METHODS, CamExplainer, explain_paths
from xrai.explain.overlays import cam_to_image
from xrai.labels import DEFAULT_THRESHOLD
from xrai.models.factory import create_model
from xrai.runs.load import load_model

__all__ = [
    "EXPLAIN_IMAGES",
    "ROAD_IMAGES",
    "ROAD_PERCENTILES",
    "SANITY_MAX_SPEARMAN",
    "explanation_table",
    "fracture_localisation",
    "line_localisation",
    "map_correlations",
    "measure_explanations",
    "randomised_copy",
]

# ROAD solves a sparse linear system per image, percentile and direction (~0.1 s for a 128 px image
# with 60% of it removed, ~4x that at 224 px), so it runs on the first ROAD_IMAGES of the sample at
# three of grad-cam's nine default percentiles (removing 60%, 40% and 20% of the pixels): ~0.4 s per
# image and method at 128 px on one CPU core.
ROAD_PERCENTILES = (40, 60, 80)
ROAD_IMAGES = 8
EXPLAIN_IMAGES = 32  # images sampled (seeded) per split for every other score
SANITY_MAX_SPEARMAN = 0.5
_BATCH = 16


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def randomised_copy(model: torch.nn.Module, config: Any, *, seed: int = 0) -> torch.nn.Module:
    """The same architecture with freshly initialised weights (seeded, the global RNG left untouched)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(config.model, pretrained=False, head=config.head, dropout=config.dropout)
    device = next(model.parameters()).device
    return fresh.to(device).eval()


def _cams(model: torch.nn.Module, x: torch.Tensor, classes: list[int], method: str) -> tuple[np.ndarray, tuple]:
    """Maps (B, H, W) in [0, 1] at the input's size, batch by batch, and the CAM grid's size."""
    out, grid = [], None
    with CamExplainer(model, method=method) as explainer:
        for start in range(0, x.shape[0], _BATCH):
            out.append(explainer(x[start:start + _BATCH], target_class=classes[start:start + _BATCH]))
            grid = explainer.grid
    return np.concatenate(out), grid or x.shape[-2:]


def map_correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between paired maps, one per image; NaN where a map is constant."""
    out = np.full(len(maps_a), np.nan)
    for i, (a, b) in enumerate(zip(maps_a, maps_b)):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            out[i] = spearmanr(a, b)[0]  # [0]: the coefficient in every SciPy version
    return out


def _faithfulness(model: torch.nn.Module, x: torch.Tensor, cams: np.ndarray, classes: list[int],
                  road_images: int, seed: int) -> dict[str, Any]:
    targets = [BinaryClassifierOutputTarget(c) for c in classes]
    change = [CamMultImageConfidenceChange()(x[s:s + _BATCH], cams[s:s + _BATCH], targets[s:s + _BATCH], model)
              for s in range(0, x.shape[0], _BATCH)]
    k = min(road_images, x.shape[0])
    road = ROADCombined(percentiles=list(ROAD_PERCENTILES))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # seeded imputer noise, global RNG kept
        # grad-cam 1.5.7's imputer calls np.argwhere on a torch tensor; numpy 2 warns once per call (harmless)
        warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
        torch.manual_seed(seed)
        scores = [road(x[s:min(s + _BATCH, k)], cams[s:min(s + _BATCH, k)], targets[s:min(s + _BATCH, k)], model)
                  for s in range(0, k, _BATCH)]
    return {"road_combined": _summary(np.concatenate(scores) if scores else np.array([])),
            "confidence_change": _summary(np.concatenate(change))}


def _noise_maps(n: int, grid: tuple, size: tuple, seed: int) -> np.ndarray:
    """Uniform noise on the CAM's grid, upsampled like a CAM: a map that knows nothing, at the same scale."""
    rng = np.random.default_rng(seed)
    cells = rng.random((n, int(grid[0]), int(grid[1]))).astype(np.float32)
    maps = np.stack([cv2.resize(c, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR) for c in cells])
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-7)


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int = 1):
    """Fewer intra-op threads for the many small batches below, on a CPU only (restored after).

    ROAD, the confidence change and the CAMs run some hundred forward passes of 8-16 images; with two
    threads on a CPU that other work shares, every convolution waits at an OpenMP barrier for a thread
    the scheduler has parked: measured on a busy 2-core machine, 31 ms per convolution with two
    threads against under 1 ms with one (the explanation scores of one split: 213 s against 21 s).
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sample(predictions: pd.DataFrame, n_images: int, seed: int) -> pd.DataFrame:
    rows = predictions.reset_index(drop=True)
    return rows.sample(min(n_images, len(rows)), random_state=seed) if len(rows) > n_images else rows


def _line_rows(rows: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame | None:
    """The sampled rows with the manifest's recorded fracture lines (synthetic runs), else None."""
    if "line_x0" not in manifest.columns:
        return None
    lines = manifest.drop_duplicates("path").set_index("path")[[c for c in manifest.columns if c.startswith("line_")]]
    return rows.join(lines, on="path")


def _pointing(cams: np.ndarray, images: list[np.ndarray], lines: pd.DataFrame | None, classes: list[int],
              *, cell_px: float, resize_size: int, resize: str = "letterbox") -> dict[str, Any] | None:
    """Pointing game and CAM mass on the sample's true positives that have a recorded line."""
    if lines is None:
        return None
    keep = [i for i, (c, (_, row)) in enumerate(zip(classes, lines.iterrows()))
            if c == 1 and int(row["label"]) == 1 and pd.notna(row["line_x0"])]
    if not keep:
        return None
    on_original = [cam_to_image(cams[i], images[i].shape, resize_size=resize_size, resize=resize) for i in keep]
    return line_localisation(on_original, [lines.iloc[i].to_dict() for i in keep], cell_px=cell_px,
                             resize_size=resize_size)


def measure_explanations(
    run: Any,
    predictions: pd.DataFrame,
    *,
    split: str,
    threshold: float,
    n_images: int = EXPLAIN_IMAGES,
    road_images: int = ROAD_IMAGES,
    methods: tuple[str, ...] = tuple(CAM_METHODS),
    seed: int = 0,
    progress: bool = False,
    manifest: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The ``explain`` block of report_<split>.json for a loaded run (``xrai.runs.load.RunModel``).

    Args:
        predictions: the split's calibrated predictions (path, probability); a seeded sample of
            ``n_images`` of them is explained for its predicted class at ``threshold``.
        road_images: ROAD runs on the first this many of the sample (it is the slow metric).
        manifest: manifest rows holding the predictions' paths (their ``line_*`` columns give the
            pointing game); None reads the run's manifest.

    Returns:
        {"sample": ..., "methods": {method: {"road_combined", "confidence_change", "randomisation",
        "pointing_game"}}, "noise_map": {...}, "flagged": [methods failing the randomisation check]}.
    """

    rows = _sample(predictions, n_images, seed)
    images, classes, readable = [], [], []
    counted = DamagedImages()  # predict has said them already, in one line: here they are only counted
    for i, (_, row) in enumerate(rows.iterrows()):
        try:
            images.append(read_image(row["path"], damaged=counted))
        except (ImageError, OSError):  # predict already warned about it; leave it out here
            continue
        classes.append(int(row["probability"] >= threshold))
        readable.append(i)
    if not images:
        raise ValueError(f"no readable image among the {len(rows)} sampled from the {split} predictions")
    rows = rows.iloc[readable].reset_index(drop=True)
    if manifest is None:
        manifest = read_manifest(run.run_dir, splits=(split,))
    lines = _line_rows(rows, manifest)
    x = preprocess(images, image_size=run.config.image_size, resize_size=run.config.resize_size, device=run.device,
                   resize=run.config.resize, **model_normalisation(run.config.model))
    with _cpu_threads(x.device):
        return _measure(run, x, images, classes, lines, split=split, road_images=road_images, methods=methods,
                        seed=seed, progress=progress)


def _measure(run: Any, x: torch.Tensor, images: list[np.ndarray], classes: list[int], lines: pd.DataFrame | None,
             *, split: str, road_images: int, methods: tuple[str, ...], seed: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    model = run.model.eval()
    fresh = randomised_copy(model, run.config, seed=seed)
    out: dict[str, Any] = {}
    grid = None
    for method in tqdm(methods, desc="explanation scores", unit="method", disable=not progress):
        cams, grid = _cams(model, x, classes, method)
        random_cams, _ = _cams(fresh, x, classes, method)
        rho = map_correlations(cams, random_cams)
        finite = rho[np.isfinite(rho)]
        mean_rho = float(finite.mean()) if finite.size else None
        out[method] = {
            **_faithfulness(model, x, cams, classes, road_images, seed),
            "randomisation": {"spearman_mean": mean_rho,
                              "spearman_median": float(np.median(finite)) if finite.size else None,
                              "n": int(finite.size), "n_constant": int(rho.size - finite.size),
                              "passes": mean_rho is None or mean_rho < SANITY_MAX_SPEARMAN},
            "pointing_game": _pointing(cams, images, lines, classes, cell_px=x.shape[-1] / max(grid),
                                       resize_size=run.config.resize_size, resize=run.config.resize),
        }
    noise = _noise_maps(len(classes), grid or x.shape[-2:], tuple(x.shape[-2:]), seed)
    return {
        "sample": {"split": split, "n_images": len(classes), "road_images": min(road_images, len(classes)),
                   "seed": seed, "explained_class": "the predicted class at the run's threshold",
                   "n_abnormal_explained": int(sum(classes)),
                   "units": "logit of the explained class (BinaryClassifierOutputTarget)"},
        "road_percentiles": list(ROAD_PERCENTILES),
        "randomisation_rule": (f"maps of the same architecture with random weights (seed {seed}); a method "
                               f"fails when the mean Spearman rank correlation is >= {SANITY_MAX_SPEARMAN}"),
        "methods": out,
        "noise_map": _faithfulness(model, x, noise, classes, road_images, seed),
        "flagged": [m for m, v in out.items() if not v["randomisation"]["passes"]],
    }


def explanation_table(report: dict[str, Any] | str | Path, split: str = "test") -> pd.DataFrame:
    """One row per CAM method (and the noise reference) from a report's ``explain`` block, for a notebook.

    Args:
        report: a report dict, or a run folder whose report_<split>.json is read.

    Raises:
        FileNotFoundError: a run folder without report_<split>.json.
        ValueError: the report has no ``explain`` block (evaluated with explain_images=0).
    """
    if not isinstance(report, dict):
        path = Path(report) / f"report_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {report}: run notebooks/04_evaluate.ipynb (or `python -m "
                                    f"xrai evaluate --run {report} --split {split}`) first")
        report = json.loads(path.read_text(encoding="utf-8"))
    block = report.get("explain")
    if not block:
        raise ValueError(f"report_{report.get('split', '?')}.json has no explanation scores; evaluate that split "
                         "again with explain_images > 0 (the default of evaluate_run)")
    rows = {}
    for method, v in block["methods"].items():
        point = v.get("pointing_game") or {}
        rows[method] = {
            "ROAD (higher = more faithful)": v["road_combined"]["mean"],
            "confidence change, image x map": v["confidence_change"]["mean"],
            "Spearman vs random weights": v["randomisation"]["spearman_mean"],
            "randomisation check": "passes" if v["randomisation"]["passes"] else "FAILS",
            "pointing game": point.get("pointing_game"),
            "pointing chance": point.get("chance"),
        }
    noise = block["noise_map"]
    rows["noise map (reference)"] = {"ROAD (higher = more faithful)": noise["road_combined"]["mean"],
                                     "confidence change, image x map": noise["confidence_change"]["mean"]}
    return pd.DataFrame.from_dict(rows, orient="index")


# ---- does the map point at the lesion? (the synthetic set records every fracture line) ----------


def fracture_localisation(
    run_dir: str | Path,
    *,
    split: str = "test",
    method: str = "gradcam",
    tolerance_px: float | None = None,
    max_images: int | None = 200,
) -> dict[str, float]:
    """Pointing game and CAM mass on the recorded fracture lines of a synthetic run's abnormal images.

    Args:
        tolerance_px: the pointing game's tolerance on the original image; None takes half a cell of
            the CAM's grid mapped onto the original (mobilenet_v2 at 128 px sees a 4 x 4 grid, so its map
            cannot place a maximum more finely than that). Chance uses the same tolerance.

    Returns:
        n, pointing_game, chance, tolerance_px, mass_fraction, area_fraction, mass_ratio.

    Raises:
        ValueError: the run's manifest has no recorded lines (only the synthetic source has them).
    """
    manifest = read_manifest(run_dir, splits=(split,))
    if "line_x0" not in manifest.columns:
        raise ValueError(f"{run_dir}: the manifest has no fracture lines (source {manifest.attrs.get('source')!r}); "
                         "only the synthetic set records them")
    rows = manifest[(manifest["split"] == split) & (manifest["label"] == 1) & manifest["line_x0"].notna()]
    if max_images is not None:
        rows = rows.head(max_images)
    if rows.empty:
        raise ValueError(f"{run_dir}: no abnormal {split} image with a recorded fracture line")
    model, config = load_model(run_dir)
    results = explain_paths(model, config, rows["path"].tolist(), threshold=DEFAULT_THRESHOLD, method=method)
    with CamExplainer(model, method=method) as explainer:
        explainer(torch.zeros(1, 3, config.image_size, config.image_size))
        grid = explainer.grid or (config.image_size,)
    kept = [(row.to_dict(), r["cam"]) for (_, row), r in zip(rows.iterrows(), results) if r["cam"] is not None]
    return line_localisation([c for _, c in kept], [row for row, _ in kept], cell_px=config.image_size / max(grid),
                             resize_size=config.resize_size, tolerance_px=tolerance_px)


def line_localisation(
    cams: Sequence[np.ndarray],
    rows: Sequence[dict[str, Any]],
    *,
    cell_px: float,
    resize_size: int,
    tolerance_px: float | None = None,
) -> dict[str, float]:
    """Pointing game and CAM mass of maps on the original pixels against the rows' recorded lines.

    Args:
        cams: one map per row, on that image's own pixels (``cam_to_image``).
        rows: manifest rows with ``line_x0 ... line_width`` (the synthetic set's).
        cell_px: crop pixels per cell of the CAM's grid (image_size / grid side).
        resize_size: the run's letterbox side, to map a cell onto the original.
        tolerance_px: None takes half a cell mapped onto each original (see fracture_localisation).
    """
    masks = [fracture_mask(row, cam.shape, image_size=cam.shape) for cam, row in zip(cams, rows)]
    if tolerance_px is None:
        tolerance = float(np.mean([0.5 * cell_px * max(cam.shape) / resize_size for cam in cams]))
    else:
        tolerance = float(tolerance_px)
    mass = cam_mass_in_mask(cams, masks)
    return {"n": mass["n"], "pointing_game": pointing_game(cams, masks, tolerance_px=tolerance),
            "chance": pointing_chance(masks, tolerance_px=tolerance), "tolerance_px": tolerance,
            "mass_fraction": mass["mass_fraction"], "area_fraction": mass["area_fraction"], "mass_ratio": mass["ratio"]}
