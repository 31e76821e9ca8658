"""Grad-CAM through the grad-cam package: batched CAMs, overlays on the original X-ray, galleries,
and checks of where the CAM points (pointing game, CAM mass on a known lesion mask).

The model has one logit. Class 1 (abnormal) is explained through the logit itself, class 0 (normal)
through its negative (grad-cam's ``BinaryClassifierOutputTarget``), one target per image.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from xrai.evaluate.calibration import apply_temperature
from xrai.evaluate.metrics import cam_mass_in_mask, pointing_chance, pointing_game


class EconomyEigenCAM(EigenCAM):
    """grad-cam's EigenCAM with an economy-size SVD: the same map, ~40x faster on a CPU.

    grad-cam 1.5's ``get_2d_projection`` asks numpy for the full SVD of each (H*W, C) activation
    matrix, which builds a C x C basis (1280 x 1280 for MobileNetV2) only to use its first row; at
    128 px that is 0.15 s per image. The first right-singular vector, its sign included, is the same
    in the economy SVD (a test compares the maps).
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency

        batch = np.nan_to_num(np.asarray(activations, dtype=np.float32), nan=0.0)
        maps = []
        # One BLAS thread: for a 16 x 1280 matrix, waking more costs more than the SVD (0.7 ms vs 12 ms
        # measured on a busy 2-core machine).
        with threadpool_limits(limits=1, user_api="blas"):
            for a in batch:
                flat = a.reshape(a.shape[0], -1).T
                flat = flat - flat.mean(axis=0)  # centred, as grad-cam does: otherwise the map comes out negative
                _, _, vt = np.linalg.svd(flat, full_matrices=False)
                maps.append((flat @ vt[0]).reshape(a.shape[1:]))
        return np.float32(maps)


CAM_METHODS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EconomyEigenCAM}
CLASS_NAMES = ("normal", "abnormal")


class CamExplainer:
    """Class activation maps for a one-logit classifier, as a context manager that always releases
    its hooks.

    ::

        with CamExplainer(model, method="gradcam") as explainer:
            cams = explainer(x, target_class=1)      # (B, H, W) in [0, 1]
            probs = explainer.probabilities          # from the same forward pass

    Args:
        model: the classifier (put in eval mode by grad-cam).
        method: one of CAM_METHODS ("gradcam", "gradcam++", "eigencam"). EigenCAM uses no
            gradients, so its map is the same for both classes.
        target_layer: the layer to explain; ``xrai.models.factory.gradcam_layer(model)`` by default.
    """

    def __init__(self, model: nn.Module, *, method: str = "gradcam", target_layer: nn.Module | None = None) -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}")
        if target_layer is None:
            from xrai.models.factory import gradcam_layers

            self.target_layers = gradcam_layers(model)  # one per member of a fold ensemble
        else:
            self.target_layers = [target_layer]
        self.model, self.method, self.target_layer = model, method, self.target_layers[0]
        self.probabilities: np.ndarray | None = None
        self.logits: np.ndarray | None = None
        self.grid: tuple[int, int] | None = None  # the target layer's spatial size at the last call
        self._cam: Any = None

    def __enter__(self) -> "CamExplainer":
        self._cam = CAM_METHODS[self.method](model=self.model, target_layers=self.target_layers)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Release the hooks ourselves rather than through grad-cam's __exit__, which swallows IndexError.
        self.close()

    def close(self) -> None:
        """Remove the forward hooks from the model (idempotent)."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def __call__(self, x: torch.Tensor, *, target_class: int | Sequence[int] = 1) -> np.ndarray:
        """CAMs for a normalised batch (B, 3, H, W).

        Args:
            target_class: 1 explains "abnormal", 0 "normal"; an int for the whole batch or one per image.

        Returns:
            float32 (B, H, W), each map scaled to [0, 1] at the input's size. ``self.probabilities``
            then holds sigmoid(logit) per image from the same forward pass (uncalibrated), and
            ``self.logits`` the logits.
        """
        if self._cam is None:
            raise RuntimeError(
                "CamExplainer hooks the model only inside its context manager: "
                "use `with CamExplainer(model) as e: e(x)`"
            )
        if x.dim() != 4:
            raise ValueError(f"CamExplainer wants a batch (B, 3, H, W), got shape {tuple(x.shape)}")
        single = isinstance(target_class, (int, np.integer))
        classes = [int(target_class)] * x.shape[0] if single else list(target_class)
        if len(classes) != x.shape[0] or not set(classes) <= {0, 1}:
            raise ValueError(f"target_class must be 0 or 1, one per image ({x.shape[0]}), got {target_class!r}")
        device = next(self.model.parameters()).device
        # Gradients are needed even when the caller is inside inference_mode / no_grad; an input that
        # requires grad makes the target layer's output require grad even for a frozen backbone.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().to(device).requires_grad_(True)
            try:
                cams = self._cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(c) for c in classes])
                logits = self._cam.outputs.detach().float().reshape(x.shape[0], -1)[:, 0]
                activations = self._cam.activations_and_grads.activations
                if activations:
                    self.grid = tuple(int(v) for v in activations[-1].shape[-2:])
            finally:
                self.model.zero_grad(set_to_none=True)
                self._cam.activations_and_grads.clear()
        self.logits = logits.cpu().numpy()
        self.probabilities = torch.sigmoid(logits).cpu().numpy()
        return np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)


# ---- from the model's frame back to the X-ray ---------------------------------------------------


def cam_to_image(cam: np.ndarray, shape: tuple[int, int], *, resize_size: int,
                 resize: str = "letterbox") -> np.ndarray:
    """Map a CAM from the model's input frame back onto the original image's pixels.

    The model saw ``fit_square(image, resize_size, resize)`` centre-cropped to ``cam.shape``
    (``xrai.data.augment.preprocess``). This undoes both: the crop is placed back in the square (the
    cropped-away ring gets 0); for "letterbox" the padding is cut off; the content is resized to ``shape``.

    Returns:
        float32 (H, W) in the CAM's range.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or cam.shape[0] != cam.shape[1]:
        raise ValueError(f"cam must be a square (C, C) map in the model's input frame, got {cam.shape}")
    h, w = int(shape[0]), int(shape[1])
    side, crop = int(resize_size), cam.shape[0]
    # the same integer offset as GpuAugment's eval branch (torchvision CenterCrop); negative = padded
    offset = int(round((side - crop) / 2.0))
    canvas = np.zeros((side, side), dtype=np.float32)
    lo, hi = max(offset, 0), min(offset + crop, side)
    canvas[lo:hi, lo:hi] = cam[lo - offset : hi - offset, lo - offset : hi - offset]
    if resize == "stretch":  # the whole square is the image, squashed
        return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
    # the letterbox geometry of xrai.data.decode.images.letterbox
    scale = side / max(h, w)
    new_w, new_h = min(side, max(1, round(w * scale))), min(side, max(1, round(h * scale)))
    top, left = (side - new_h) // 2, (side - new_w) // 2
    content = canvas[top : top + new_h, left : left + new_w]
    return cv2.resize(content, (w, h), interpolation=cv2.INTER_LINEAR)


def _text_band(width: int, lines: list[str], colour: tuple[int, int, int], *, max_scale: float = 1.0) -> np.ndarray:
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = float(np.clip(width / 560, 0.3, max_scale))
    for _ in range(3):  # shrink until the widest line fits narrow images (thickness grows with scale)
        thick = max(1, int(round(scale * 1.6)))
        widest = max(cv2.getTextSize(s, font, scale, thick)[0][0] for s in lines)
        if widest <= 0.96 * width:
            break
        scale *= 0.96 * width / widest
    line_h = cv2.getTextSize("Ag", font, scale, thick)[0][1]
    pad = max(3, int(line_h * 0.6))
    band = np.zeros((pad + len(lines) * (line_h + pad), width, 3), dtype=np.uint8)
    for i, text in enumerate(lines):
        y = pad + line_h + i * (line_h + pad)
        cv2.putText(band, text, (max(2, int(width * 0.02)), y), font, scale, colour, thick, cv2.LINE_AA)
    return band


def overlay(
    image_uint8_hw: np.ndarray,
    cam: np.ndarray,
    *,
    label: int | None = None,
    predicted: int | None = None,
    probability: float | None = None,
    threshold: float = 0.5,
    resize_size: int | None = None,
    alpha: float = 0.4,
    resize: str = "letterbox",
) -> np.ndarray:
    """The heatmap over the ORIGINAL X-ray, with a text band above it (actual label, predicted label,
    probability) when any of those is given.

    Args:
        image_uint8_hw: the original grey image (H, W) uint8, as ``read_image`` returns it.
        cam: a map on the image's own pixels (H, W), or one in the model's input frame (C, C) together
            with ``resize_size`` and ``resize`` (the run's ``config.resize_size``, ``config.resize``); see
            :func:`cam_to_image`.
        label: the actual label (0/1) or None when unknown.
        predicted: the predicted label; derived from ``probability >= threshold`` when None.
        alpha: heatmap weight.

    Returns:
        RGB uint8 (band + H, W, 3); the bottom H rows are the overlay at the original size.
    """
    image = np.asarray(image_uint8_hw)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if image.ndim != 2:
        raise ValueError(f"overlay wants a grey (H, W) image, got shape {image.shape}")
    h, w = image.shape
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (h, w):
        if resize_size is None:
            raise ValueError(
                f"cam {cam.shape} is not on the image's pixels {(h, w)}: pass resize_size= (the run's "
                "config.resize_size) to map it from the model's input frame"
            )
        cam = cam_to_image(cam, (h, w), resize_size=resize_size, resize=resize)
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32) / 255.0
    out = show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)
    if predicted is None and probability is not None:
        predicted = int(probability >= threshold)
    if label is None and predicted is None and probability is None:
        return out
    lines = []
    if label is not None:
        lines.append(f"actual: {CLASS_NAMES[int(label)]}")
    if predicted is not None:
        lines.append(f"predicted: {CLASS_NAMES[int(predicted)]}")
    if probability is not None:
        lines.append(f"p(abnormal) = {probability:.3f} (threshold {threshold:.3f})")
    colour = (255, 255, 255)
    if label is not None and predicted is not None:
        colour = (90, 220, 90) if int(label) == int(predicted) else (255, 90, 90)
    return np.concatenate([_text_band(w, lines, colour), out], axis=0)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)
    return path


def _file_stem(path: str) -> str:
    """A readable unique-ish name: MURA calls every file image1.png, so keep the folders above."""
    parts = Path(path).with_suffix("").parts[-3:]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))


def explain_paths(
    model: nn.Module,
    config: Any,
    paths: Sequence[str | Path],
    *,
    threshold: float,
    out_dir: str | Path | None = None,
    labels: Sequence[int | None] | None = None,
    method: str = "gradcam",
    target_class: int = 1,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
    with_cam: bool = True,
    progress: bool = False,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """Probability, label at the threshold and Grad-CAM for image files; overlays written to out_dir.

    A file that cannot be read gives an entry with ``error`` set and the rest go on.

    Args:
        config: the run's TrainConfig (image_size, resize_size).
        labels: actual labels for the overlays' text band, when known.
        target_class: which class the maps explain (1 abnormal: where the model sees abnormality).
        names: file names (without .png) for the overlays; derived from the paths when None.
        with_cam: False only predicts (no Grad-CAM, no overlays; ``cam`` stays None), for ``predict``.
        temperature: the run's calibration; probability = sigmoid(logit / temperature) (see
            ``xrai.runs.load.RunModel``), the number ``threshold`` was chosen on.

    Returns:
        one dict per path, in order: path, probability, label (predicted, at threshold), threshold,
        cam (float32 on the original image's pixels), overlay (Path or None), error (None or str).
    """
    from tqdm.auto import tqdm

    from xrai.data.augment import preprocess
    from xrai.data.decode.images import ImageError, read_image
    from xrai.runs.load import flip_tta_logits, one_logit

    paths = [str(p) for p in paths]
    if out_dir is not None and not with_cam:
        raise ValueError("overlays need the CAM: pass with_cam=True (or no out_dir)")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels has {len(labels)} values for {len(paths)} paths")
    results: list[dict[str, Any]] = [
        {"path": p, "probability": None, "label": None, "threshold": float(threshold), "cam": None,
         "overlay": None, "error": None} for p in paths
    ]
    out = Path(out_dir) if out_dir is not None else None
    used: set[str] = set()
    device = next(model.parameters()).device
    model.eval()
    forward = functools.partial(one_logit, model)  # no autocast: the logits the CAM pass gives
    with (CamExplainer(model, method=method) if with_cam else contextlib.nullcontext()) as explainer:
        for start in tqdm(range(0, len(paths), batch_size), desc="grad-cam", unit="batch", disable=not progress):
            batch, images = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(read_image(paths[i]))
                except (ImageError, OSError) as e:  # one bad file must not stop the others
                    results[i]["error"] = str(e)
                    warnings.warn(f"skipping {paths[i]}: {e}", UserWarning, stacklevel=2)
                    continue
                batch.append(i)
            if not batch:
                continue
            x = preprocess(images, image_size=config.image_size, resize_size=config.resize_size, device=device,
                           resize=config.resize)
            if explainer is None:
                logits = forward(x).cpu().numpy()
                cams: Any = [None] * len(batch)
            else:
                cams, logits = explainer(x, target_class=target_class), explainer.logits
            if getattr(config, "tta", False):  # the run's flip TTA, as its threshold was chosen with; the map is the unflipped image's
                logits = flip_tta_logits(forward, x, torch.as_tensor(np.asarray(logits))).cpu().numpy()
            probs = apply_temperature(logits, temperature)
            for i, image, cam, prob in zip(batch, images, cams, probs):
                r = results[i]
                r["probability"], r["label"] = float(prob), int(prob >= threshold)
                if cam is not None:
                    r["cam"] = cam_to_image(cam, image.shape, resize_size=config.resize_size, resize=config.resize)
                if out is not None:
                    name = names[i] if names is not None else _file_stem(paths[i])
                    while name in used:
                        name += "_"
                    used.add(name)
                    actual = None if labels is None or labels[i] is None else int(labels[i])
                    rgb = overlay(image, r["cam"], label=actual, probability=r["probability"], threshold=threshold)
                    r["overlay"] = save_png(rgb, out / f"{name}.png")
    return results


# ---- galleries ----------------------------------------------------------------------------------

GALLERY_KINDS = {
    "tp": "most confident true positives",
    "fp": "most confident false positives",
    "fn": "most confident false negatives",
}


def _select(pred: Any, kind: str, threshold: float, n: int) -> Any:
    p, y = pred["probability"], pred["label"]
    if kind == "tp":
        rows = pred[(y == 1) & (p >= threshold)].sort_values("probability", ascending=False)
    elif kind == "fp":
        rows = pred[(y == 0) & (p >= threshold)].sort_values("probability", ascending=False)
    else:
        rows = pred[(y == 1) & (p < threshold)].sort_values("probability", ascending=True)
    return rows.head(n)


def _tile(path: str, cam: np.ndarray, label: int, probability: float, threshold: float, *,
          height: int = 320, min_width: int = 280) -> np.ndarray:
    """A gallery tile: the X-ray and its CAM scaled to a readable size, then overlaid with its text band."""
    from xrai.data.decode.images import read_image

    image = read_image(path)
    h, w = image.shape
    scale = max(height / h, min_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cam = cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)
    return overlay(image, cam, label=label, probability=probability, threshold=threshold)


def _tile_row(tiles: list[np.ndarray], title: str) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 8), (0, 0))) for t in tiles]
    row = np.concatenate(padded, axis=1)[:, :-8]
    return np.concatenate([_text_band(row.shape[1], [title], (255, 255, 255)), row], axis=0)


def gallery(
    run_dir: str | Path,
    *,
    split: str = "test",
    n: int = 4,
    method: str = "gradcam",
    progress: bool = True,
) -> dict[str, Path]:
    """Galleries of the most confident true positives, false positives and false negatives.

    Reads predictions_<split>.csv (evaluating the split first when it is missing) and the run's
    validation threshold and temperature (``xrai.runs.load.load_run``); writes under run_dir/gradcam/: ``<kind>_<split>.png`` (one row of overlays;
    a short note when there is no such case) and ``<split>_<kind>_<rank>.png`` per image shown.

    Returns:
        {"tp": path, "fp": path, "fn": path, "tp_1": path, ...}.
    """
    import pandas as pd

    from xrai.data import read_manifest, relocate_paths
    from xrai.evaluate.run import evaluate_run
    from xrai.runs.load import load_run, operating_point

    run_dir = Path(run_dir)
    pred_path = run_dir / f"predictions_{split}.csv"
    run = load_run(run_dir)  # re-chooses a threshold made with another checkpoint
    report_path = run_dir / f"report_{split}.json"
    made_with = (json.loads(report_path.read_text(encoding="utf-8")).get("checkpoint") or {}).get("sha256") \
        if report_path.is_file() else None
    if not pred_path.is_file() or made_with != run.checkpoint_sha256 or run.point.source == "default":
        evaluate_run(run_dir, split=split, progress=progress)  # the predictions are this checkpoint's
        # the same checkpoint and model: only the operating point it (re)wrote is new
        run.point = operating_point(run_dir, run.checkpoint_sha256)[0] or run.point
    pred = pd.read_csv(pred_path, dtype={"path": str, "patient_id": str, "study_id": str}, keep_default_na=False)
    if (run_dir / "manifest.csv").is_file():  # predicted on another machine (a fresh runtime): find its images here
        pred["path"] = relocate_paths(pred["path"], read_manifest(run_dir))
    threshold, model, config = run.threshold, run.model, run.config
    out_dir = run_dir / "gradcam"
    written: dict[str, Path] = {}
    for kind, title in GALLERY_KINDS.items():
        rows = _select(pred, kind, threshold, n)
        names = [f"{split}_{kind}_{rank}" for rank in range(1, len(rows) + 1)]
        results = explain_paths(
            model, config, rows["path"].tolist(), threshold=threshold, out_dir=out_dir,
            labels=rows["label"].astype(int).tolist(), method=method, names=names, temperature=run.temperature,
        )
        tiles = []
        for name, label, r in zip(names, rows["label"].astype(int), results):
            if r["overlay"] is not None:
                written[f"{kind}_{name.rsplit('_', 1)[1]}"] = r["overlay"]
                tiles.append(_tile(r["path"], r["cam"], label, r["probability"], threshold))
        if not tiles:
            note = _text_band(480, [f"none on {split} at threshold {threshold:.3f}"], (200, 200, 200))
            tiles = [np.pad(note, ((140, 180 - note.shape[0]), (0, 0), (0, 0)))]
        heading = f"{title} ({split}, threshold {threshold:.3f}, {method})"
        written[kind] = save_png(_tile_row(tiles, heading), out_dir / f"{kind}_{split}.png")
    return written


# ---- does the map point at the lesion? ----------------------------------------------------------

# pointing_game, pointing_chance and cam_mass_in_mask live in xrai.evaluate.metrics (pure array maths).


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
    from xrai.data import read_manifest
    from xrai.models.factory import load_model

    manifest = read_manifest(run_dir)
    if "line_x0" not in manifest.columns:
        raise ValueError(f"{run_dir}: the manifest has no fracture lines (source {manifest.attrs.get('source')!r}); "
                         "only the synthetic set records them")
    rows = manifest[(manifest["split"] == split) & (manifest["label"] == 1) & manifest["line_x0"].notna()]
    if max_images is not None:
        rows = rows.head(max_images)
    if rows.empty:
        raise ValueError(f"{run_dir}: no abnormal {split} image with a recorded fracture line")
    model, config = load_model(run_dir)
    results = explain_paths(model, config, rows["path"].tolist(), threshold=0.5, method=method)
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
    from xrai.data.synthetic import fracture_mask

    masks = [fracture_mask(row, cam.shape, image_size=cam.shape) for cam, row in zip(cams, rows)]
    if tolerance_px is None:
        tolerance = float(np.mean([0.5 * cell_px * max(cam.shape) / resize_size for cam in cams]))
    else:
        tolerance = float(tolerance_px)
    mass = cam_mass_in_mask(cams, masks)
    return {"n": mass["n"], "pointing_game": pointing_game(cams, masks, tolerance_px=tolerance),
            "chance": pointing_chance(masks, tolerance_px=tolerance), "tolerance_px": tolerance,
            "mass_fraction": mass["mass_fraction"], "area_fraction": mass["area_fraction"], "mass_ratio": mass["ratio"]}
