"""Grad-CAM through the grad-cam package: batched CAMs of a one-logit model, and ``explain_paths``: the
probability, label and map of image files, with overlays written (pictures: ``xrai.explain.overlays``).

The model has one logit. Class 1 (abnormal) is explained through the logit itself, class 0 (normal)
through its negative (grad-cam's ``BinaryClassifierOutputTarget``), one target per image.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from threadpoolctl import threadpool_limits  # scikit-learn's dependency
from torch import nn
from tqdm.auto import tqdm

from xrai.data.augment import preprocess
from xrai.data.contract import model_normalisation
from xrai.data.decode.images import DamagedImages, ImageError, read_image
from xrai.explain.overlays import cam_to_image, overlay, save_png
from xrai.labels import CLASS_NAMES
from xrai.models.factory import gradcam_layers
from xrai.models.logits import flip_tta_logits, one_logit
from xrai.runs.layout import DAMAGED_CSV
from xrai.runs.operating import Calibration

__all__ = ["CAM_METHODS", "CamExplainer", "EconomyEigenCAM", "explain_paths"]


class EconomyEigenCAM(EigenCAM):
    """grad-cam's EigenCAM with an economy-size SVD: the same map, ~40x faster on a CPU.

    grad-cam 1.5's ``get_2d_projection`` asks numpy for the full SVD of each (H*W, C) activation
    matrix, which builds a C x C basis (1280 x 1280 for MobileNetV2) only to use its first row; at
    128 px that is 0.15 s per image. The first right-singular vector, its sign included, is the same
    in the economy SVD (a test compares the maps).
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
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

            self.target_layers = gradcam_layers(model)  # one per member of a fold ensemble
        else:
            self.target_layers = [target_layer]
        self.model, self.method, self.target_layer = model, method, self.target_layers[0]
        self.probabilities: np.ndarray | None = None
        self.logits: np.ndarray | None = None
        self.grid: tuple[int, int] | None = None  # the target layer's spatial size at the last call
        self._cam: Any = None

    def __enter__(self) -> CamExplainer:
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
    calibration: Calibration | None = None,
    class_names: tuple[str, str] = CLASS_NAMES,
    damaged: DamagedImages | None = None,
) -> list[dict[str, Any]]:
    """Probability, label at the threshold and Grad-CAM for image files; overlays written to out_dir.

    A file that cannot be read gives an entry with ``error`` set and the rest go on. Such files and truncated
    ones are said in ONE warning at the end (``_say_damaged``); each at DEBUG on ``xrai.data.decode`` (-v).

    Args:
        config: the run's TrainConfig (image_size, resize_size).
        labels: actual labels for the overlays' text band, when known.
        target_class: which class the maps explain (1 abnormal: where the model sees abnormality).
        names: file names (without .png) for the overlays; derived from the paths when None.
        with_cam: False only predicts (no Grad-CAM, no overlays; ``cam`` stays None), for ``predict``.
        temperature, calibration: probability = ``calibration.apply(logit)`` (the run's, the number
            ``threshold`` was chosen on), or sigmoid(logit / temperature) without one.
        class_names: the words for label 0 and 1 in the overlays' text band.
        damaged: where the unreadable and truncated files are counted instead, for the caller's one line.

    Returns:
        one dict per path, in order: path, probability, label (predicted, at threshold), threshold,
        cam (float32 on the original image's pixels), overlay (Path or None), error (None or str).
    """
    paths = [str(p) for p in paths]
    _check_request(paths, out_dir=out_dir, with_cam=with_cam, labels=labels)
    results = [_blank_result(p, threshold) for p in paths]
    out, used, device = (Path(out_dir) if out_dir is not None else None), set(), next(model.parameters()).device
    counted = DamagedImages() if damaged is None else damaged
    forward = functools.partial(one_logit, model.eval())  # no autocast: the logits the CAM pass gives
    with (CamExplainer(model, method=method) if with_cam else contextlib.nullcontext()) as explainer:
        for start in tqdm(range(0, len(paths), batch_size), desc="grad-cam", unit="batch", disable=not progress):
            batch, images = _read_batch(paths, range(start, min(start + batch_size, len(paths))), results, counted)
            if not batch:
                continue
            cams, probs = _cams_and_probabilities(explainer, forward, images, config, device, target_class,
                                                  temperature, calibration)
            for i, image, cam, prob in zip(batch, images, cams, probs):
                r = _record(results[i], image, cam, prob, threshold, config)
                if out is not None:
                    name = _unique_name(names[i] if names is not None else _file_stem(paths[i]), used)
                    actual = None if labels is None else labels[i]
                    r["overlay"] = _save_overlay(out / f"{name}.png", image, r, actual, threshold, class_names)
    _say_damaged(counted, out, ours=damaged is None)
    return results


def _blank_result(path: str, threshold: float) -> dict[str, Any]:
    return {"path": path, "probability": None, "label": None, "threshold": float(threshold), "cam": None,
            "overlay": None, "error": None}


def _record(result: dict[str, Any], image: np.ndarray, cam: np.ndarray | None, prob: float, threshold: float,
            config: Any) -> dict[str, Any]:
    """``result`` with the image's probability, label at the threshold and map (on its own pixels)."""
    result["probability"], result["label"] = float(prob), int(prob >= threshold)
    if cam is not None:
        result["cam"] = cam_to_image(cam, image.shape, resize_size=config.resize_size, resize=config.resize)
    return result


_NAMED = 3  # damaged files one line names; more are listed in out_dir/damaged_images.csv


def _say_damaged(damaged: DamagedImages, out: Path | None, *, ours: bool) -> None:
    """explain_paths's one warning about its damaged files (when it counted them itself: ``ours``): their
    names when few (or nowhere to list them), else the count and out_dir/damaged_images.csv."""
    if not ours or not len(damaged):
        return
    listing = out / DAMAGED_CSV if out is not None and len(damaged) > _NAMED else None
    if listing is not None:
        listing.parent.mkdir(parents=True, exist_ok=True)
    # at explain_paths's caller (stacklevel 3): the line shows no source line of the package
    warnings.warn(damaged.summary(listing), UserWarning, stacklevel=3)


def _check_request(paths: list[str], *, out_dir: Any, with_cam: bool, labels: Sequence | None) -> None:
    if out_dir is not None and not with_cam:
        raise ValueError("overlays need the CAM: pass with_cam=True (or no out_dir)")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels has {len(labels)} values for {len(paths)} paths")


def _save_overlay(path: Path, image: np.ndarray, result: dict[str, Any], actual: int | None, threshold: float,
                  class_names: tuple[str, str]) -> Path:
    """The overlay of one result (its map over the image, with the text band) written as PNG."""
    rgb = overlay(image, result["cam"], label=None if actual is None else int(actual),
                  probability=result["probability"], threshold=threshold, names=class_names)
    return save_png(rgb, path)


def _cams_and_probabilities(explainer: CamExplainer | None, forward: Any, images: list[np.ndarray], config: Any,
                            device: torch.device, target_class: int, temperature: float,
                            calibration: Calibration | None = None) -> tuple[Any, np.ndarray]:
    """(maps in the model's input frame, or Nones without an explainer; calibrated probabilities) of a batch."""
    x = preprocess(images, image_size=config.image_size, resize_size=config.resize_size, device=device,
                   resize=config.resize, **model_normalisation(config.model))
    if explainer is None:
        logits = forward(x).cpu().numpy()
        cams: Any = [None] * x.shape[0]
    else:
        cams, logits = explainer(x, target_class=target_class), explainer.logits
    if getattr(config, "tta", False):  # the run's flip TTA, as its threshold was chosen with; the map is the unflipped image's
        logits = flip_tta_logits(forward, x, torch.as_tensor(np.asarray(logits))).cpu().numpy()
    return cams, (calibration or Calibration.from_temperature(temperature)).apply(logits)


def _read_batch(paths: list[str], indices: range, results: list[dict[str, Any]],
                damaged: DamagedImages) -> tuple[list[int], list]:
    """(indices read, their images); a file that cannot be read gets its ``error`` set and is counted in
    ``damaged`` (as a truncated one is), and the others go on."""
    batch, images = [], []
    for i in indices:
        try:
            images.append(read_image(paths[i], damaged=damaged))
        except (ImageError, OSError) as e:  # one bad file must not stop the others
            results[i]["error"] = str(e)
            damaged.add(paths[i], "unreadable", str(e))
            continue
        batch.append(i)
    return batch, images


def _unique_name(name: str, used: set[str]) -> str:
    """``name``, with "_" appended until no earlier overlay of this call has it; recorded in ``used``."""
    while name in used:
        name += "_"
    used.add(name)
    return name
