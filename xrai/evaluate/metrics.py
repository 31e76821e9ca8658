"""Image- and study-level metrics, bootstrap confidence intervals and the validation threshold.

Everything here is pure numpy / pandas / scikit-learn on arrays of labels and probabilities; it
knows nothing of models or files (``xrai.evaluate.run`` wires it to a run folder).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn import metrics as skm

from xrai.labels import CLASS_NAMES, SCREENING_SENSITIVITY

# Study-level Cohen's kappa of the DenseNet-169 baseline on MURA's TEST set: 207 studies whose labels
# the authors keep (a hidden test set; models are scored on it by submission), with the majority vote
# of three radiologists as the gold standard (Rajpurkar et al., "MURA: Large Dataset for Abnormality
# Detection in Musculoskeletal Radiographs", 2017, arXiv:1712.06957, Table 2, model row). X-RAI
# cannot score that set: its figures are on MURA's public valid split or a test split carved from
# train, so every comparison says so (MURA_BASELINE_CAVEAT).
MURA_BASELINE: dict[str, float] = {
    "overall": 0.705,
    "elbow": 0.710,
    "finger": 0.389,
    "forearm": 0.737,
    "hand": 0.851,
    "humerus": 0.600,
    "shoulder": 0.729,
    "wrist": 0.931,
}
MURA_BASELINE_SOURCE = "Rajpurkar et al. 2017, MURA (arXiv:1712.06957), DenseNet-169, study-level kappa"
MURA_BASELINE_SPLIT = "MURA's hidden test set (207 studies, majority vote of three radiologists)"
MURA_BASELINE_CAVEAT = (
    "the MURA DenseNet-169 baseline is on MURA's hidden test set; this run's figures are on {split}, "
    "a different set of studies, so read the comparison as a guide, not a ranking"
)


def mura_baseline(source: str | None, split: str) -> dict[str, Any] | None:
    """The baseline block of a report: only for MURA runs (None for any other source).

    Args:
        source: the manifest's source ("mura", "fracatlas", "synthetic", ...).
        split: what this run's figures are on, in words ("valid", "test (carved from MURA's train)").
    """
    if (source or "").lower() != "mura":
        return None
    return {"model": "DenseNet-169", "reference": MURA_BASELINE_SOURCE, "evaluated_on": MURA_BASELINE_SPLIT,
            "this_run_on": split, "caveat": MURA_BASELINE_CAVEAT.format(split=split),
            "study_kappa": dict(MURA_BASELINE)}


# The image/study block of report_<split>.json, in docs/design.md's order.
METRIC_KEYS = (
    "n", "accuracy", "auroc", "auroc_ci", "average_precision", "sensitivity", "specificity",
    "f1", "kappa", "kappa_ci", "confusion_matrix",
)


def binary_arrays(y_true: Any, values: Any, *, purpose: str = "score",
                  what: str = "probabilities") -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and finite float64 values of the same length, as flat arrays; ValueError otherwise.

    Args:
        purpose: what the caller does with them, for the empty-split message ("score", "calibrate").
        what: what ``values`` are, for the messages ("probabilities", "logits or probabilities").
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(values, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but the {what} have {p.size}")
    if y.size == 0:
        raise ValueError(f"no predictions to {purpose} (empty split?)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()))}")
    if not np.isfinite(p).all():
        raise ValueError(f"{what} contain NaN or infinity")
    return y, p


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def kappa_score(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Cohen's kappa, or None where it is undefined (labels and predictions all one class)."""
    if len(np.union1d(y_true, y_pred)) < 2:
        return None
    return float(skm.cohen_kappa_score(y_true, y_pred, labels=[0, 1]))


def compute_metrics(
    y_true: Any,
    prob: Any,
    threshold: float,
    *,
    groups: Any = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    what: str = "images",
) -> dict[str, Any]:
    """The image (or study) block of the report: every key of docs/design.md's ``image`` dict.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of class 1 (abnormal); predicted positive when ``prob >= threshold``.
        threshold: the decision threshold (chosen on validation).
        groups: resampling units for the bootstrap (patient ids, say); None resamples rows.
        n_bootstrap: bootstrap replicates for ``auroc_ci`` / ``kappa_ci``; 0 leaves them None.
        seed: bootstrap seed.
        what: word used in warnings ("images", "studies", "wrist images").

    Returns:
        dict with n, accuracy, auroc, auroc_ci, average_precision, sensitivity, specificity, f1,
        kappa, kappa_ci, confusion_matrix [[tn, fp], [fn, tp]]. Metrics that a one-class split
        leaves undefined (AUROC, AP, sensitivity or specificity, kappa) are None, with a warning.
    """
    y, p = binary_arrays(y_true, prob)
    d = decision_metrics(y, p, threshold)  # the confusion matrix and what follows from it
    both = len(np.unique(y)) == 2
    if not both:
        warnings.warn(
            f"only one class ({'abnormal' if y[0] else 'normal'}) among the {y.size} {what}: "
            "AUROC and average precision are undefined and reported as null",
            UserWarning,
            stacklevel=2,
        )
    out: dict[str, Any] = {  # in METRIC_KEYS order (the report's)
        "n": d["n"],
        "accuracy": d["accuracy"],
        "auroc": float(skm.roc_auc_score(y, p)) if both else None,
        "auroc_ci": None,
        "average_precision": float(skm.average_precision_score(y, p)) if both else None,
        "sensitivity": d["sensitivity"],
        "specificity": d["specificity"],
        "f1": float(skm.f1_score(y, (p >= threshold).astype(int), labels=[0, 1], zero_division=0)),
        "kappa": d["kappa"],
        "kappa_ci": None,
        "confusion_matrix": d["confusion_matrix"],
    }
    if n_bootstrap > 0:
        ci = bootstrap_ci(y, p, threshold, groups=groups, n=n_bootstrap, seed=seed)
        out["auroc_ci"], out["kappa_ci"] = ci["auroc"], ci["kappa"]
    return out


def decision_metrics(y_true: Any, prob: Any, threshold: float) -> dict[str, Any]:
    """What a threshold does, without intervals: sensitivity, specificity, PPV, NPV, accuracy, kappa,
    confusion matrix [[tn, fp], [fn, tp]] (a ratio with a zero denominator is None)."""
    y, p = binary_arrays(y_true, prob)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {"threshold": float(threshold), "n": int(y.size), "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "accuracy": float((tp + tn) / y.size), "kappa": kappa_score(y, pred),
            "confusion_matrix": [[tn, fp], [fn, tp]]}


def classification_report(y_true: Any, prob: Any, threshold: float,
                          names: tuple[str, str] = CLASS_NAMES) -> dict[str, Any]:
    """scikit-learn's classification_report(output_dict=True) at the threshold, both classes named
    (``xrai.labels.class_names(source)``: FracAtlas says "not fractured"/"fractured")."""
    y, p = binary_arrays(y_true, prob)
    return skm.classification_report(
        y, (p >= threshold).astype(int), labels=[0, 1], target_names=list(names),
        output_dict=True, zero_division=0,
    )


# ---- study level --------------------------------------------------------------------------------


def study_level(predictions: pd.DataFrame) -> pd.DataFrame:
    """Aggregate image predictions to studies, MURA's way: a study's probability is the mean of its
    images'.

    Images with an empty study id count as one-image studies (keyed by path). A study whose images
    disagree on the label (it should not happen: MURA labels studies) takes the abnormal label, with
    a warning.

    Returns:
        DataFrame with study_id, probability, label, body_part, patient_id, n_images, in order of
        first appearance.
    """
    missing = {"probability", "label", "study_id"} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack column(s) {sorted(missing)}")
    df = predictions.copy()
    sid = df["study_id"].fillna("").astype(str)
    df["study_id"] = sid.where(sid != "", df.get("path", pd.Series(df.index.astype(str), index=df.index)).astype(str))
    for col in ("body_part", "patient_id"):
        if col not in df.columns:
            df[col] = ""
    grouped = df.groupby("study_id", sort=False)
    out = grouped.agg(
        probability=("probability", "mean"),
        label=("label", "max"),
        label_min=("label", "min"),
        body_part=("body_part", "first"),
        patient_id=("patient_id", "first"),
        n_images=("probability", "size"),
    ).reset_index()
    mixed = out["label"] != out["label_min"]
    if mixed.any():
        warnings.warn(
            f"{int(mixed.sum())} studies mix labels across their images (e.g. {out.loc[mixed, 'study_id'].iloc[0]!r});"
            " they count as abnormal",
            UserWarning,
            stacklevel=2,
        )
    return out.drop(columns="label_min")


def has_study_ids(predictions: pd.DataFrame) -> bool:
    """True where the source gives study ids (MURA, synthetic); False for FracAtlas and folders."""
    return "study_id" in predictions.columns and bool((predictions["study_id"].fillna("").astype(str) != "").any())


RESAMPLING_COLUMNS = (("patient_id", "patients"), ("group", "duplicate groups"), ("study_id", "studies"))


def resampling_groups(frame: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """The bootstrap's resampling unit for a predictions (or studies) table.

    Patients where every row has one; else the duplicate groups the split kept together (the
    manifest's ``group`` column: FracAtlas has no patient ids, and a picture that appears twice is
    one observation, not two); else studies; else rows. Returns (group per row or None, unit name).
    """
    for col, unit in RESAMPLING_COLUMNS:
        if col in frame.columns:
            ids = frame[col].fillna("").astype(str)
            if (ids != "").all():
                return ids.to_numpy(), unit
    return None, "images"


# ---- bootstrap ----------------------------------------------------------------------------------


def bootstrap_weights(groups: Any, n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates as multiplicity weights, shape (n, n_rows).

    Drawing G groups with replacement is the same as giving every row of group g the number of
    times g was drawn; whole groups go in or out together, so a patient's images are never split.
    """
    if groups is None:
        return rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n).astype(np.float64)
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups).ravel()), sort=False)
    if codes.size != n_rows:
        raise ValueError(f"groups has {codes.size} values for {n_rows} rows")
    g = len(uniques)
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=n).astype(np.float64)
    return counts[:, codes]


def _weighted_auroc(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row of weights ``w`` (B, N); ties count one half. NaN where a
    replicate holds one class only."""
    order = np.argsort(p, kind="mergesort")
    p, y, w = p[order], y[order], w[:, order]
    pos = y == 1
    # first / last index of each run of tied scores
    new = np.r_[True, p[1:] != p[:-1]]
    run = np.cumsum(new) - 1
    first = np.flatnonzero(new)[run]
    last = np.r_[np.flatnonzero(new[1:]), p.size - 1][run]
    cneg = np.cumsum(w * ~pos, axis=1)
    below = np.where(first > 0, cneg[:, np.maximum(first - 1, 0)], 0.0)
    tied = cneg[:, last] - below
    num = (w[:, pos] * (below[:, pos] + 0.5 * tied[:, pos])).sum(axis=1)
    den = w[:, pos].sum(axis=1) * w[:, ~pos].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _weighted_kappa(w: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    tp = w @ ((y == 1) & (pred == 1))
    tn = w @ ((y == 0) & (pred == 0))
    fp = w @ ((y == 0) & (pred == 1))
    fn = w @ ((y == 1) & (pred == 0))
    n = tp + tn + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        return np.where(pe < 1, (po - pe) / np.where(pe < 1, 1 - pe, 1), np.nan)


def bootstrap_ci(
    y_true: Any,
    prob: Any,
    threshold: float,
    *,
    groups: Any = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk_elements: int = 4_000_000,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap confidence intervals for AUROC and Cohen's kappa.

    Resamples whole groups (patients, or studies) when ``groups`` is given, rows otherwise; vectorised
    over replicates (in chunks of about ``chunk_elements`` weights, to bound memory). Replicates that
    draw one class only are left out of the AUROC interval.

    Returns:
        {"auroc": [lo, hi] or None, "kappa": [lo, hi] or None}; None when no replicate defines it.
    """
    y, p = binary_arrays(y_true, prob)
    if n < 1:
        raise ValueError(f"n (bootstrap replicates) must be >= 1, got {n}")
    pred = (p >= threshold).astype(int)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_elements // y.size)
    aurocs, kappas = [], []
    for start in range(0, n, per_chunk):
        w = bootstrap_weights(groups, y.size, min(per_chunk, n - start), rng)
        aurocs.append(_weighted_auroc(w, y, p))
        kappas.append(_weighted_kappa(w, y, pred))
    alpha = (1 - level) / 2
    out: dict[str, list[float] | None] = {}
    for name, values in (("auroc", np.concatenate(aurocs)), ("kappa", np.concatenate(kappas))):
        values = values[np.isfinite(values)]
        out[name] = None if values.size == 0 else [float(v) for v in np.quantile(values, [alpha, 1 - alpha])]
    return out


# ---- threshold ----------------------------------------------------------------------------------

THRESHOLD_METHODS = ("youden", "sensitivity")


def choose_threshold(y_true: Any, prob: Any, *, method: str = "youden",
                     target: float = SCREENING_SENSITIVITY) -> float:
    """Choose the decision threshold on VALIDATION predictions (never on test).

    Args:
        method: "youden" maximises sensitivity + specificity - 1; "sensitivity" takes the highest
            threshold whose sensitivity reaches ``target`` (so the best specificity at that
            sensitivity).
        target: the sensitivity asked for with method="sensitivity".

    Returns:
        threshold in [0, 1]; predict abnormal when ``prob >= threshold``.

    Raises:
        ValueError: unknown method, target outside (0, 1], or one class only.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of: {', '.join(THRESHOLD_METHODS)}")
    y, p = binary_arrays(y_true, prob)
    if len(np.unique(y)) < 2:
        raise ValueError(f"choosing a threshold needs both classes; the {y.size} validation images are all one class")
    fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    if method == "youden":
        k = int(np.argmax(tpr - fpr))  # first (highest) threshold on ties
    else:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
        k = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    # roc_curve's first threshold is +inf ("predict nothing positive"); keep JSON finite
    return float(min(thresholds[k], 1.0))


# ---- Grad-CAM against a lesion mask ------------------------------------------------------------


def _pairs(cams: Any, masks: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(cams) != len(masks):
        raise ValueError(f"{len(cams)} cams but {len(masks)} masks")
    pairs = []
    for cam, mask in zip(cams, masks):
        if mask is None or not np.asarray(mask).any():
            continue  # a normal image has no lesion to point at
        cam, mask = np.asarray(cam, dtype=np.float64), np.asarray(mask, dtype=bool)
        if cam.shape != mask.shape:
            raise ValueError(f"cam {cam.shape} and mask {mask.shape} differ; map the cam with cam_to_image first")
        pairs.append((cam, mask))
    if not pairs:
        raise ValueError("no image with a non-empty mask to score")
    return pairs


def _dilate(mask: np.ndarray, tolerance_px: float) -> np.ndarray:
    if tolerance_px <= 0:
        return mask
    return ndimage.distance_transform_edt(~mask) <= tolerance_px


def pointing_game(cams: Any, masks: Any, *, tolerance_px: float = 15.0) -> float:
    """Share of images whose CAM maximum lies on the mask dilated by ``tolerance_px`` (Zhang et al.,
    2016, "Top-down neural attention by excitation backprop", who allow 15 px). CAMs and masks are on the
    same pixels (the original image's). Images without a mask (None or empty) are skipped. Chance is
    :func:`pointing_chance`."""
    pairs = _pairs(cams, masks)
    hits = [_dilate(m, tolerance_px)[np.unravel_index(np.argmax(c), c.shape)] for c, m in pairs]
    return float(np.mean(hits))


def pointing_chance(masks: Any, *, tolerance_px: float = 15.0) -> float:
    """The pointing game's chance level: the mean area fraction of the dilated masks."""
    present = [np.asarray(m, bool) for m in masks if m is not None and np.asarray(m).any()]
    fractions = [_dilate(m, tolerance_px).mean() for m in present]
    if not fractions:
        raise ValueError("no image with a non-empty mask to score")
    return float(np.mean(fractions))


def cam_mass_in_mask(cams: Any, masks: Any) -> dict[str, float]:
    """How much of the CAM's mass falls on the mask, against the mask's share of the image.

    Returns:
        {"n", "mass_fraction" (mean share of CAM mass on the mask), "area_fraction" (mean share of the
        image the mask covers), "ratio" (mass_fraction / area_fraction; 1 = no better than uniform)}.
    """
    pairs = _pairs(cams, masks)
    mass = [float((c * m).sum() / c.sum()) if c.sum() > 0 else 0.0 for c, m in pairs]
    area = [float(m.mean()) for _, m in pairs]
    return {"n": len(pairs), "mass_fraction": float(np.mean(mass)), "area_fraction": float(np.mean(area)),
            "ratio": float(np.mean(mass) / np.mean(area))}
