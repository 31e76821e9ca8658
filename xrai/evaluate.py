"""Score a run: predictions per image, report_<split>.json (DESIGN.md), the validation threshold.

The threshold discipline: the decision threshold is chosen on the validation split only (Youden's J
by default) and written in report_valid.json; every other split (test, an external set) reads it
from there and never chooses its own.

The metric maths lives in ``xrai.metrics`` (re-exported here: compute_metrics, study_level,
bootstrap_ci, choose_threshold, MURA_BASELINE).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from torch import nn

from xrai.metrics import (
    MURA_BASELINE,
    MURA_BASELINE_SOURCE,
    bootstrap_ci,
    choose_threshold,
    classification_report,
    compute_metrics,
    has_study_ids,
    kappa_score,
    resampling_groups,
    study_level,
)

__all__ = [
    "MURA_BASELINE",
    "MURA_BASELINE_SOURCE",
    "PREDICTION_COLUMNS",
    "REPORT_KEYS",
    "bootstrap_ci",
    "build_report",
    "choose_threshold",
    "compute_metrics",
    "evaluate_external",
    "evaluate_run",
    "flipped_probability",
    "per_body_part",
    "predict",
    "read_predictions",
    "run_threshold",
    "study_level",
    "threshold_source",
    "write_json",
]

PREDICTION_COLUMNS = ["path", "probability", "label", "body_part", "patient_id", "study_id"]
# Where a run without a validation split of its own (a cross-validation run, a final fit on all the
# training data) records the threshold it was given: {"threshold": t, "threshold_from": "oof", ...}.
THRESHOLD_FILE = "threshold.json"
REPORT_KEYS = (
    "split", "threshold", "threshold_from", "split_method", "audit", "image", "study",
    "per_body_part", "classification_report",
)


# ---- prediction ---------------------------------------------------------------------------------


def flipped_probability(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(logit) of each image of a batch flipped left-right, float (B,): the second half of flip
    test-time augmentation (TrainConfig.tta), which averages it with the unflipped image's probability."""
    with torch.inference_mode():
        return torch.sigmoid(model(torch.flip(x, dims=[3])).float().reshape(x.shape[0], -1)[:, 0])


def _read(path: str) -> tuple[np.ndarray | None, str | None]:
    from xrai.data.images import ImageError, read_image

    try:
        return read_image(path), None
    except (ImageError, OSError) as e:  # one bad file is dropped, not fatal
        return None, str(e)


def predict(
    model: nn.Module,
    manifest: pd.DataFrame,
    *,
    config: Any = None,
    batch_size: int = 64,
    tta: bool | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Probability of "abnormal" for every image of a manifest.

    Images go through ``xrai.data.augment.preprocess`` (letterbox + the eval branch of the training
    augmentation: a centre crop), so prediction and training see the same pixels. Files are decoded
    in a thread pool one batch ahead of the model. Unreadable images are dropped with a warning.

    Args:
        model: a one-logit classifier.
        manifest: rows with at least ``path``; label, body_part, patient_id, study_id are carried over
            when present (label -1 and "" otherwise).
        config: the run's TrainConfig (image_size, resize_size); None uses TrainConfig's defaults for
            the manifest's source.
        tta: also score the horizontally flipped image and average the two probabilities; None: as the
            run's config says (``config.tta``, the flip test-time augmentation of its recipe).
        device: "auto" (CUDA when there is one), "cpu", "cuda", ...

    Returns:
        DataFrame with PREDICTION_COLUMNS, in manifest order, bad images left out.
    """
    from tqdm.auto import tqdm

    from xrai.data.augment import preprocess
    from xrai.env import autocast_dtype, get_device

    if "path" not in manifest.columns:
        raise ValueError(f"predict needs a manifest with a 'path' column, got {list(manifest.columns)}")
    if config is None:
        from xrai.config import TrainConfig

        source = str(manifest["source"].iloc[0]) if "source" in manifest.columns and len(manifest) else "synthetic"
        config = TrainConfig(data=source)
    tta = bool(getattr(config, "tta", False)) if tta is None else tta
    dev = get_device(device) if isinstance(device, str) else torch.device(device)
    model = model.to(dev).eval()
    amp = autocast_dtype(dev) if dev.type == "cuda" else None
    table = manifest.reset_index(drop=True)
    paths = table["path"].astype(str).tolist()
    batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    probs = np.full(len(paths), np.nan)
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(_read, paths[i]) for i in batches[0]] if batches else []
        for b, rows in enumerate(tqdm(batches, desc="predict", unit="batch", disable=not progress)):
            decoded = [f.result() for f in pending]
            if b + 1 < len(batches):  # decode the next batch while this one runs
                pending = [pool.submit(_read, paths[i]) for i in batches[b + 1]]
            keep = [(i, img) for i, (img, err) in zip(rows, decoded) if img is not None]
            bad += [(paths[i], err) for i, (img, err) in zip(rows, decoded) if img is None]
            if not keep:
                continue
            x = preprocess([img for _, img in keep], image_size=config.image_size,
                           resize_size=config.resize_size, device=dev, resize=config.resize)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                p = torch.sigmoid(model(x).float().reshape(len(keep), -1)[:, 0])
                if tta:
                    p = (p + flipped_probability(model, x)) / 2
            probs[[i for i, _ in keep]] = p.cpu().numpy()
    if bad:
        listed = "; ".join(f"{p}: {e}" for p, e in bad[:5])
        warnings.warn(f"dropped {len(bad)} unreadable image(s) from the predictions: {listed}"
                      + (" ..." if len(bad) > 5 else ""), UserWarning, stacklevel=2)
    out = pd.DataFrame({"path": paths, "probability": probs})
    out["label"] = table["label"].astype(int) if "label" in table.columns else -1
    for col in ("body_part", "patient_id", "study_id"):
        out[col] = table[col].fillna("").astype(str) if col in table.columns else ""
    return out[np.isfinite(out["probability"])].reset_index(drop=True)[PREDICTION_COLUMNS]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A predictions_<split>.csv back, ids as strings ("" for none)."""
    return pd.read_csv(path, dtype={c: str for c in ("path", "body_part", "patient_id", "study_id")},
                       keep_default_na=False)


# ---- the report ---------------------------------------------------------------------------------


def per_body_part(predictions: pd.DataFrame, threshold: float) -> dict[str, dict[str, Any]]:
    """n, image AUROC, image kappa and study kappa for each body part (sorted by name).

    Metrics a part cannot define (one class only) are None; study_kappa is None without study ids.
    """
    out: dict[str, dict[str, Any]] = {}
    studies = has_study_ids(predictions)
    parts = predictions["body_part"].replace("", "unknown")
    for part, frame in sorted(predictions.groupby(parts), key=lambda kv: str(kv[0])):
        y = frame["label"].to_numpy(int)
        p = frame["probability"].to_numpy(float)
        row: dict[str, Any] = {
            "n": int(len(frame)),
            "auroc": float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
            "kappa": kappa_score(y, (p >= threshold).astype(int)),
            "study_kappa": None,
        }
        if studies:
            s = study_level(frame)
            study_pred = (s["probability"].to_numpy() >= threshold).astype(int)
            row["study_kappa"] = kappa_score(s["label"].to_numpy(int), study_pred)
        out[str(part)] = row
    return out


def build_report(
    predictions: pd.DataFrame,
    *,
    split: str,
    threshold: float,
    threshold_from: str,
    split_method: str | None,
    audit: dict[str, int | None],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """report_<split>.json as DESIGN.md specifies it (keys REPORT_KEYS, in that order).

    Confidence intervals resample patients where every image has one, else studies, else images; the
    study block resamples patients (else studies). ``study`` is None when the source has no study ids.
    """
    if len(predictions) == 0:
        raise ValueError(f"no predictions to report for split {split!r}")
    groups, _ = resampling_groups(predictions)
    image = compute_metrics(predictions["label"], predictions["probability"], threshold,
                            groups=groups, n_bootstrap=n_bootstrap, seed=seed)
    study = None
    if has_study_ids(predictions):
        s = study_level(predictions)
        sgroups, _ = resampling_groups(s)
        study = compute_metrics(s["label"], s["probability"], threshold, groups=sgroups,
                                n_bootstrap=n_bootstrap, seed=seed, what="studies")
    return {
        "split": split,
        "threshold": float(threshold),
        "threshold_from": threshold_from,
        "split_method": split_method or None,
        "audit": audit,
        "image": image,
        "study": study,
        "per_body_part": per_body_part(predictions, threshold),
        "classification_report": classification_report(predictions["label"], predictions["probability"], threshold),
    }


def write_json(obj: Any, path: Path) -> Path:
    """Strict JSON (NaN is refused: undefined metrics are null), written atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _audit_counts(run_dir: Path) -> dict[str, int | None]:
    """Counts from run_dir/audit.csv; null counts (not zeros: "not audited" is not "clean") without it."""
    path = run_dir / "audit.csv"
    if not path.is_file():
        warnings.warn(f"no audit.csv in {run_dir}: the report's audit counts are null; run "
                      f"`python -m xrai audit` (or notebooks/02_eda.ipynb) to fill them", UserWarning, stacklevel=3)
        return {"cross_split_groups": None, "cross_label_groups": None}
    from xrai.data import audit_summary

    table = pd.read_csv(path, dtype={"path": str, "crosses": str}, keep_default_na=False)
    return {k: int(v) for k, v in audit_summary(table).items()}


def run_threshold(run_dir: str | Path) -> float:
    """The run's decision threshold, as chosen on validation (report_valid.json), or as recorded in
    threshold.json by a run that has no validation split (``threshold_source`` says where it came from).

    Raises:
        FileNotFoundError: the run was never evaluated on valid; the message says how.
    """
    path = Path(run_dir) / "report_valid.json"
    recorded = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file() and recorded.is_file():
        return float(json.loads(recorded.read_text(encoding="utf-8"))["threshold"])
    if not path.is_file():
        raise FileNotFoundError(f"no report_valid.json in {run_dir}: the threshold is chosen on validation; "
                                f"run `python -m xrai evaluate --run {run_dir} --split valid` first")
    return float(json.loads(path.read_text(encoding="utf-8"))["threshold"])


def threshold_source(run_dir: str | Path) -> str:
    """Where the run's threshold was chosen: "valid", or threshold.json's "threshold_from" ("oof": on the
    out-of-fold predictions of a cross-validation)."""
    path = Path(run_dir) / "report_valid.json"
    recorded = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file() and recorded.is_file():
        return str(json.loads(recorded.read_text(encoding="utf-8"))["threshold_from"])
    return "valid"


def _split_rows(run_dir: Path, split: str, config: Any) -> pd.DataFrame:
    from xrai.data import filter_body_parts, read_manifest

    manifest = read_manifest(run_dir)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        present = manifest["split"].value_counts().to_dict()
        raise ValueError(f"no {split!r} images in {run_dir / 'manifest.csv'} (splits present: {present})")
    rows = filter_body_parts(rows, config.body_parts())
    rows.attrs = dict(manifest.attrs)
    return rows


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "valid",
    tta: bool | None = None,
    which: str = "best",
    progress: bool = True,
    threshold_method: str = "youden",
    target_sensitivity: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Score one split of a run; write predictions_<split>.csv and report_<split>.json.

    On "valid" the threshold is chosen here (``threshold_method``: "youden" or "sensitivity" with
    ``target_sensitivity``); on any other split it is read from report_valid.json, which is made
    first when missing. A split never chooses its own threshold.

    A cross-validation run (cv.json) has no valid split of its own: its "valid" is the out-of-fold
    report written by the CV (report_oof.json: every pool image scored by the fold model that never
    trained on it, the threshold chosen there), returned as it is. A final fit has none at all.

    Returns:
        the report dict (as written).
    """
    from xrai.models import load_model

    run_dir = Path(run_dir)
    threshold, threshold_from = None, "valid"
    recorded = (run_dir / THRESHOLD_FILE).is_file()
    if split == "valid" and (run_dir / "report_oof.json").is_file():  # a CV run's validation
        return json.loads((run_dir / "report_oof.json").read_text(encoding="utf-8"))
    if split == "valid" and recorded:
        raise ValueError(f"{run_dir} has no validation split of its own (its threshold comes from "
                         f"{run_dir / THRESHOLD_FILE}); score the test split or an external set")
    if split != "valid":
        if not recorded and not (run_dir / "report_valid.json").is_file():
            evaluate_run(run_dir, split="valid", tta=tta, which=which, progress=progress,
                         threshold_method=threshold_method, target_sensitivity=target_sensitivity,
                         n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size, device=device)
        threshold, threshold_from = run_threshold(run_dir), threshold_source(run_dir)
    model, config = load_model(run_dir, which=which)
    rows = _split_rows(run_dir, split, config)
    pred = predict(model, rows, config=config, batch_size=batch_size, tta=tta, device=device, progress=progress)
    pred.to_csv(run_dir / f"predictions_{split}.csv", index=False)
    if threshold is None:
        try:
            threshold = choose_threshold(pred["label"], pred["probability"], method=threshold_method,
                                         target=target_sensitivity)
        except ValueError as e:
            warnings.warn(f"{e}; using threshold 0.5", UserWarning, stacklevel=2)
            threshold, threshold_from = 0.5, "default"
    report = build_report(pred, split=split, threshold=threshold, threshold_from=threshold_from,
                          split_method=rows.attrs.get("split_method"), audit=_audit_counts(run_dir),
                          n_bootstrap=n_bootstrap, seed=seed)
    write_json(report, run_dir / f"report_{split}.json")
    return report


def evaluate_external(
    run_dir: str | Path,
    manifest: pd.DataFrame,
    *,
    name: str = "external",
    tta: bool | None = None,
    which: str = "best",
    progress: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Score every image of another dataset at the run's validation threshold.

    All rows of ``manifest`` are used whatever their split, and no body-part filter is applied (filter
    the manifest first to compare like with like). Writes predictions_<name>.csv and
    report_<name>.json; ``audit`` counts are null (the external set is not part of the run's audit).
    """
    from xrai.models import load_model

    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in ("train", "valid", "test"):
        raise ValueError(f"external report name {name!r} must be a plain word other than train/valid/test")
    run_dir = Path(run_dir)
    if not (run_dir / "report_valid.json").is_file() and not (run_dir / THRESHOLD_FILE).is_file():
        evaluate_run(run_dir, split="valid", tta=tta, which=which, progress=progress, n_bootstrap=n_bootstrap,
                     seed=seed, batch_size=batch_size, device=device)
    threshold = run_threshold(run_dir)
    model, config = load_model(run_dir, which=which)
    pred = predict(model, manifest, config=config, batch_size=batch_size, tta=tta, device=device, progress=progress)
    pred.to_csv(run_dir / f"predictions_{name}.csv", index=False)
    source = manifest.attrs.get("source") or (manifest["source"].iloc[0] if "source" in manifest.columns else "")
    report = build_report(pred, split=name, threshold=threshold, threshold_from=threshold_source(run_dir),
                          split_method=f"external: every image of {source or 'the given manifest'}",
                          audit={"cross_split_groups": None, "cross_label_groups": None},
                          n_bootstrap=n_bootstrap, seed=seed)
    write_json(report, run_dir / f"report_{name}.json")
    return report
