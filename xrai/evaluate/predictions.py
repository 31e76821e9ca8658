"""Predictions for a manifest: the probability of "abnormal" for every image, with the columns of
predictions_<split>.csv (docs/design.md, "The run folder")."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from xrai.config import TrainConfig
from xrai.data.augment import preprocess
from xrai.data.contract import model_normalisation
from xrai.data.decode.images import DamagedImages, ImageError, read_image
from xrai.env import autocast_dtype, get_device
from xrai.errors import outside_package_stacklevel
from xrai.models.logits import flip_tta_logits, one_logit
from xrai.runs.layout import RunFolder
from xrai.runs.load import RunModel
from xrai.runs.operating import NO_CALIBRATION, Calibration

__all__ = ["PREDICTION_COLUMNS", "PREDICTION_EXTRA_COLUMNS", "predict"]

PREDICTION_COLUMNS = ["path", "probability", "label", "body_part", "patient_id", "study_id"]
# After docs/design.md's columns: the logit (so the uncalibrated probability is sigmoid(logit)) and, where
# the manifest has it, the duplicate group the split kept together (the bootstrap resamples it).
PREDICTION_EXTRA_COLUMNS = ["logit", "group"]


def _read(path: str, damaged: DamagedImages) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(path, damaged=damaged), None  # a truncated file: counted, said once by predict
    except (ImageError, OSError) as e:  # one bad file is dropped, not fatal
        damaged.add(path, "unreadable", str(e))
        return None, str(e)


def _forward(model: nn.Module | RunModel, config: Any, calibration: Calibration | None, device: str | torch.device,
             source: str) -> tuple[Callable, torch.device, Any, Calibration]:
    """(logits of a batch, device, config, calibration): a RunModel's own, else the model's on ``device``."""
    if isinstance(model, RunModel):
        # through RunModel.logits, so whatever stands behind a run (one model, a fold ensemble) predicts
        config = model.config if config is None else config
        calibration = model.point.calibration if calibration is None else calibration
        dev, forward = model.device, model.logits
    else:
        dev = get_device(device) if isinstance(device, str) else torch.device(device)
        amp = autocast_dtype(dev) if dev.type == "cuda" else None
        forward = functools.partial(one_logit, model.to(dev).eval(), amp=amp)
    config = TrainConfig(data=source) if config is None else config
    return forward, dev, config, NO_CALIBRATION if calibration is None else calibration


def _logits(forward: Callable, paths: list[str], config: Any, dev: torch.device, *, tta: bool, batch_size: int,
            progress: bool, damaged: DamagedImages) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Every image's logit (NaN where unreadable) and the unreadable (path, error); files are decoded in a
    thread pool one batch ahead of the model."""
    batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    logits = np.full(len(paths), np.nan)
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(_read, paths[i], damaged) for i in batches[0]] if batches else []
        for b, rows in enumerate(tqdm(batches, desc="predict", unit="batch", disable=not progress)):
            decoded = [f.result() for f in pending]
            if b + 1 < len(batches):  # decode the next batch while this one runs
                pending = [pool.submit(_read, paths[i], damaged) for i in batches[b + 1]]
            keep = [(i, img) for i, (img, err) in zip(rows, decoded) if img is not None]
            bad += [(paths[i], err) for i, (img, err) in zip(rows, decoded) if img is None]
            if not keep:
                continue
            x = preprocess([img for _, img in keep], image_size=config.image_size,
                           resize_size=config.resize_size, device=dev, resize=config.resize,
                           **model_normalisation(config.model))
            z = flip_tta_logits(forward, x) if tta else forward(x)
            logits[[i for i, _ in keep]] = z.cpu().numpy()
    return logits, bad


def predict(
    model: nn.Module | RunModel,
    manifest: pd.DataFrame,
    *,
    config: Any = None,
    temperature: float | None = None,
    calibration: Calibration | None = None,
    batch_size: int = 64,
    tta: bool | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Probability of "abnormal" for every image of a manifest.

    Images go through ``xrai.data.augment.preprocess`` (letterbox + the eval branch of the training
    augmentation: a centre crop), so prediction and training see the same pixels. Unreadable images are
    dropped; they and truncated ones are said in one warning (listed in the run's damaged_images.csv).

    Args:
        model: a one-logit classifier, or a RunModel (its logits, device, config and calibration are then
            used; ``device`` is ignored).
        manifest: rows with at least ``path``; label, body_part, patient_id, study_id (and ``group``)
            are carried over when present (label -1 and "" otherwise).
        config: the run's TrainConfig (image_size, resize_size); None uses the RunModel's, else
            TrainConfig's defaults for the manifest's source.
        temperature: probability = sigmoid(logit / temperature), where no ``calibration`` is given.
        calibration: probability = ``calibration.apply(logit)``; None (and no temperature): the
            RunModel's, else the raw sigmoid(logit).
        tta: also score the horizontally flipped image and average the two probabilities (the logit
            of their mean, ``xrai.models.logits.flip_tta_logits``); None: as the run's config says
            (``config.tta``, the flip test-time augmentation of its recipe).
        device: "auto" (CUDA when there is one), "cpu", "cuda", ...

    Returns:
        DataFrame with PREDICTION_COLUMNS, then ``logit`` (and ``group``), in manifest order, bad
        images left out.
    """
    if "path" not in manifest.columns:
        raise ValueError(f"predict needs a manifest with a 'path' column, got {list(manifest.columns)}")
    source = str(manifest["source"].iloc[0]) if "source" in manifest.columns and len(manifest) else "synthetic"
    if calibration is None and temperature is not None:  # temperature scaling, as before calibrators
        calibration = Calibration.from_temperature(float(temperature))
    forward, dev, config, calibration = _forward(model, config, calibration, device, source)
    tta = bool(getattr(config, "tta", False)) if tta is None else bool(tta)
    table = manifest.reset_index(drop=True)
    paths = table["path"].astype(str).tolist()
    damaged = DamagedImages()  # truncated and unreadable images: one line for the whole call
    logits, _ = _logits(forward, paths, config, dev, tta=tta, batch_size=batch_size, progress=progress,
                        damaged=damaged)
    if line := damaged.summary(RunFolder(model.run_dir).damaged_csv if isinstance(model, RunModel) else None):
        warnings.warn(line, UserWarning, stacklevel=outside_package_stacklevel())
    out = pd.DataFrame({"path": paths, "probability": calibration.apply(np.nan_to_num(logits))})
    out["label"] = table["label"].astype(int) if "label" in table.columns else -1
    for col in ("body_part", "patient_id", "study_id"):
        out[col] = table[col].fillna("").astype(str) if col in table.columns else ""
    out["logit"] = logits
    if "group" in table.columns:
        out["group"] = table["group"].fillna("").astype(str)
    columns = PREDICTION_COLUMNS + [c for c in PREDICTION_EXTRA_COLUMNS if c in out.columns]
    return out[np.isfinite(out["logit"])].reset_index(drop=True)[columns]
