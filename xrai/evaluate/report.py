"""report_<split>.json: docs/design.md's blocks, and what each figure was made with.

The operating point is chosen on validation only (:func:`choose_selection`): a calibration (Platt by
default, or a temperature) fitted on valid's logits and applied only where it lowers valid's
cross-fitted NLL, then on the calibrated probabilities an image threshold (on images) and a study
threshold (on the study means, MURA's protocol), each by Youden's J and by a target sensitivity.
Every other split reads the same :class:`Selection` back from report_valid.json
(:func:`selection_from_report`). The report says which threshold made which figure: ``threshold``
made ``image``, ``classification_report`` and the per-part ``kappa``; ``study_threshold`` made
``study`` and the per-part ``study_kappa``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn import metrics as skm

from xrai.evaluate.calibration import (
    DEFAULT_CALIBRATION,
    ECE_BINNING,
    ECE_BINS,
    calibration_summary,
    choose_calibration,
)
from xrai.evaluate.metrics import (
    bootstrap_ci,
    choose_threshold,
    classification_report,
    compute_metrics,
    decision_metrics,
    has_study_ids,
    kappa_score,
    resampling_groups,
    study_level,
)
from xrai.runs.operating import NO_CALIBRATION, Calibration, calibration_from_report

__all__ = [
    "DEFAULT_TARGET_SENSITIVITY",
    "OPERATING_POINTS",
    "REPORT_KEYS",
    "Selection",
    "build_report",
    "calibration_block",
    "calibration_table",
    "calibration_words",
    "choose_selection",
    "figure",
    "operating_points",
    "per_body_part",
    "per_part_table",
    "selection_from_report",
    "thresholds_table",
]

# docs/design.md's keys, in its order; later keys extend the format (docs/design.md lists them).
REPORT_KEYS = (
    "split", "threshold", "threshold_from", "split_method", "audit", "image", "study",
    "per_body_part", "classification_report",
)
# Which threshold made which figure; written into every report as "threshold_use".
THRESHOLD_USE = {"threshold": "image, classification_report, per_body_part kappa",
                 "study_threshold": "study, per_body_part study_kappa (study probability = mean of its images')"}
OPERATING_POINTS = ("youden", "sensitivity")
DEFAULT_TARGET_SENSITIVITY = 0.95  # a screening tool misses few abnormal studies


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Everything chosen on valid for one checkpoint: the calibration and the thresholds.

    ``calibration`` is what every probability is made with (none where the fit did not lower valid's
    cross-fitted NLL: ``calibrated`` is then False); ``fitted`` is the calibrator fitted on valid, applied
    or not. ``cross_fitted`` holds valid's ECE / NLL / Brier uncalibrated and cross-fitted, only on the
    Selection chosen on valid (one read back from a report has None: other splits report plain figures).
    ``image`` and ``study`` map each of OPERATING_POINTS to a threshold on calibrated probabilities
    (``study`` is None without study ids); ``raw_image`` / ``raw_study`` are the primary method's
    thresholds chosen the same way on the uncalibrated probabilities, for the figures kept beside.
    """

    calibration: Calibration = NO_CALIBRATION
    calibrated: bool = False
    fitted: Calibration | None = None
    cross_fitted: dict[str, Any] | None = None
    method: str = "youden"
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    image: dict[str, float] = field(default_factory=lambda: {k: 0.5 for k in OPERATING_POINTS})
    study: dict[str, float] | None = None
    raw_image: float = 0.5
    raw_study: float | None = None
    source: str = "valid"

    @property
    def temperature(self) -> float:
        """The calibration's 1 / slope (the temperature for temperature scaling; 1.0 when uncalibrated)."""
        return self.calibration.temperature

    @property
    def threshold(self) -> float:
        return self.image[self.method]

    @property
    def study_threshold(self) -> float | None:
        return None if self.study is None else self.study[self.method]


def _choose(y: Any, p: Any, method: str, target: float, what: str) -> float | None:
    try:
        return choose_threshold(y, p, method=method, target=target)
    except ValueError as e:
        warnings.warn(f"{what}: {e}; using threshold 0.5", UserWarning, stacklevel=3)
        return None


def choose_selection(predictions: pd.DataFrame, *, method: str = "youden",
                     target: float = DEFAULT_TARGET_SENSITIVITY,
                     calibration: str = DEFAULT_CALIBRATION) -> Selection:
    """Fit the calibration and choose every threshold on VALIDATION predictions (never on test).

    Args:
        predictions: valid's predictions with ``logit`` and ``label`` (study_id for the study level).
        method: the primary operating point, "youden" or "sensitivity".
        target: the sensitivity the "sensitivity" operating point must reach on valid.
        calibration: "platt" (sigmoid(a * logit + b)) or "temperature" (sigmoid(logit / T)); applied only
            where it lowers valid's cross-fitted NLL (``xrai.evaluate.calibration.choose_calibration``).
    """
    if method not in OPERATING_POINTS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of: {', '.join(OPERATING_POINTS)}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, z = predictions["label"].to_numpy(int), predictions["logit"].to_numpy(float)
    fitted, cross_fitted = None, None
    try:
        fitted, calibrated, cross_fitted = choose_calibration(z, y, calibration)
    except ValueError as e:
        if "unknown calibration" in str(e):
            raise
        warnings.warn(f"{e}; probabilities left uncalibrated", UserWarning, stacklevel=2)
        calibrated = False
    applied = fitted if calibrated and fitted is not None else NO_CALIBRATION
    chosen: dict[str, Any] = {}
    found_all = True
    for scale, calibrator in (("calibrated", applied), ("raw", NO_CALIBRATION)):
        frame = predictions.assign(probability=calibrator.apply(z))
        studies = study_level(frame) if has_study_ids(frame) else None
        for level, table in (("image", frame), ("study", studies)):
            if table is None:
                continue
            for name in OPERATING_POINTS if scale == "calibrated" else (method,):
                t = _choose(table["label"], table["probability"], name, target, f"{level} threshold ({name})")
                found_all &= t is not None
                chosen.setdefault((scale, level), {})[name] = 0.5 if t is None else t
    study = chosen.get(("calibrated", "study"))
    return Selection(calibration=applied, calibrated=calibrated, fitted=fitted, cross_fitted=cross_fitted,
                     method=method, target_sensitivity=target, image=chosen[("calibrated", "image")], study=study,
                     raw_image=chosen[("raw", "image")][method],
                     raw_study=None if study is None else chosen[("raw", "study")][method],
                     source="valid" if found_all else "default")


def selection_from_report(report: dict[str, Any]) -> Selection:
    """The Selection a report_valid.json was made with (written by :func:`build_report` and evaluate).

    Reads the calibration's slope and intercept, or an older report's temperature alone."""
    points = report.get("operating_points") or {}
    calibration = report.get("calibration") or {}
    uncal = calibration.get("uncalibrated") or {}
    method = report.get("threshold_method", "youden")
    # the top-level keys are the primary method's (docs/design.md's "threshold"); operating_points the others
    image = {k: float(v["threshold"]) for k, v in points.items()}
    image[method] = float(report["threshold"])
    study = {k: float(v["study_threshold"]) for k, v in points.items() if v.get("study_threshold") is not None}
    if report.get("study_threshold") is not None:
        study[method] = float(report["study_threshold"])
    target = (points.get("sensitivity") or {}).get("target", DEFAULT_TARGET_SENSITIVITY)
    applied, calibrated = calibration_from_report(report, "report_valid.json")
    fitted = (Calibration(calibration["method"], float(calibration["slope"]), float(calibration["intercept"]))
              if "slope" in calibration else applied)
    return Selection(
        calibration=applied, calibrated=calibrated, fitted=fitted,
        method=method, target_sensitivity=float(target), image=image, study=study or None,
        raw_image=float(uncal.get("threshold", image[method])), raw_study=uncal.get("study_threshold"),
        source=report.get("threshold_from", "valid"),
    )


# ---- the blocks ---------------------------------------------------------------------------------


def per_body_part(predictions: pd.DataFrame, threshold: float, study_threshold: float | None = None, *,
                  n_bootstrap: int = 0, seed: int = 0) -> dict[str, dict[str, Any]]:
    """n, image AUROC and kappa (at ``threshold``), study kappa (at ``study_threshold``, else
    ``threshold``), each with its bootstrap interval, per body part (sorted by name).

    Metrics a part cannot define (one class only) are None; study_kappa is None without study ids.
    """
    out: dict[str, dict[str, Any]] = {}
    studies = has_study_ids(predictions)
    t_study = threshold if study_threshold is None else study_threshold
    parts = predictions["body_part"].replace("", "unknown")
    for part, frame in sorted(predictions.groupby(parts), key=lambda kv: str(kv[0])):
        y = frame["label"].to_numpy(int)
        p = frame["probability"].to_numpy(float)
        row: dict[str, Any] = {
            "n": int(len(frame)),
            "auroc": _auroc(y, p),
            "kappa": kappa_score(y, (p >= threshold).astype(int)),
            "study_kappa": None,
            "auroc_ci": None, "kappa_ci": None, "study_kappa_ci": None,
        }
        if n_bootstrap > 0:
            ci = bootstrap_ci(y, p, threshold, groups=resampling_groups(frame)[0], n=n_bootstrap, seed=seed)
            row["auroc_ci"], row["kappa_ci"] = ci["auroc"], ci["kappa"]
        if studies:
            s = study_level(frame)
            sy, sp = s["label"].to_numpy(int), s["probability"].to_numpy(float)
            row["study_kappa"] = kappa_score(sy, (sp >= t_study).astype(int))
            if n_bootstrap > 0:
                row["study_kappa_ci"] = bootstrap_ci(sy, sp, t_study, groups=resampling_groups(s)[0],
                                                     n=n_bootstrap, seed=seed)["kappa"]
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
    study_threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """docs/design.md's report (REPORT_KEYS, in order), then ``study_threshold``, ``threshold_use`` and
    ``resampling_unit``.

    ``image`` is at ``threshold``; ``study`` at ``study_threshold`` (the image threshold where None,
    and ``study_threshold`` then says so by repeating it). Intervals resample patients where every image
    has one, else the split's duplicate groups, else studies, else images; ``resampling_unit`` names it.
    """
    if len(predictions) == 0:
        raise ValueError(f"no predictions to report for split {split!r}")
    groups, unit = resampling_groups(predictions)
    image = compute_metrics(predictions["label"], predictions["probability"], threshold,
                            groups=groups, n_bootstrap=n_bootstrap, seed=seed)
    study, study_unit = None, None
    t_study = threshold if study_threshold is None else study_threshold
    if has_study_ids(predictions):
        s = study_level(predictions)
        sgroups, study_unit = resampling_groups(s)
        study = compute_metrics(s["label"], s["probability"], t_study, groups=sgroups,
                                n_bootstrap=n_bootstrap, seed=seed, what="studies")
    return {
        "split": split,
        "threshold": float(threshold),
        "threshold_from": threshold_from,
        "split_method": split_method or None,
        "audit": audit,
        "image": image,
        "study": study,
        "per_body_part": per_body_part(predictions, threshold, t_study, n_bootstrap=n_bootstrap, seed=seed),
        "classification_report": classification_report(predictions["label"], predictions["probability"], threshold),
        "study_threshold": None if study is None else float(t_study),
        "threshold_use": dict(THRESHOLD_USE),
        "resampling_unit": {"image": unit, "study": study_unit, "replicates": int(n_bootstrap)},
    }


def operating_points(predictions: pd.DataFrame, selection: Selection) -> dict[str, Any]:
    """Each operating point's thresholds (chosen on valid) and what they do on these predictions."""
    studies = study_level(predictions) if has_study_ids(predictions) else None
    out: dict[str, Any] = {}
    for name in OPERATING_POINTS:
        t = selection.image.get(name)
        if t is None:
            continue
        ts = None if selection.study is None else selection.study.get(name)
        point: dict[str, Any] = {"target": selection.target_sensitivity} if name == "sensitivity" else {}
        point.update({
            "threshold": t, "study_threshold": ts,
            "image": decision_metrics(predictions["label"], predictions["probability"], t),
            "study": None if studies is None or ts is None
            else decision_metrics(studies["label"], studies["probability"], ts),
        })
        out[name] = point
    return out


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None


def calibration_block(predictions: pd.DataFrame, selection: Selection) -> dict[str, Any]:
    """The calibration (method, slope, intercept, applied), ECE / NLL / Brier before and after it, and
    the uncalibrated figures beside.

    On the predictions the selection was chosen on (valid) the after figures are cross-fitted
    (``figures`` says so, ``in_sample`` holds the fit's own); on other splits they are plain. Not
    applied: the after figures are the raw ones. The uncalibrated figures use thresholds chosen the same
    way on valid's uncalibrated probabilities. Image-level ranking and decisions are the same either way
    (a > 0 keeps the order); the study level can differ, because a mean of calibrated probabilities is
    not a monotonic function of the raw mean.
    """
    y, z = predictions["label"].to_numpy(int), predictions["logit"].to_numpy(float)
    raw = predictions.assign(probability=expit(z))
    uncal: dict[str, Any] = {"threshold": selection.raw_image, "study_threshold": selection.raw_study,
                             "image": {"auroc": _auroc(y, raw["probability"].to_numpy()),
                                       **decision_metrics(y, raw["probability"], selection.raw_image)},
                             "study": None}
    calibrated_study = None
    if has_study_ids(predictions) and selection.raw_study is not None:
        s = study_level(raw)
        sy, sp = s["label"].to_numpy(int), s["probability"].to_numpy(float)
        uncal["study"] = {"auroc": _auroc(sy, sp), **decision_metrics(sy, sp, selection.raw_study)}
        cal = study_level(predictions)
        calibrated_study = _auroc(cal["label"].to_numpy(int), cal["probability"].to_numpy(float))
    return {
        **_calibration_keys(predictions, selection, y, z),
        "study_auroc": {"uncalibrated": None if uncal["study"] is None else uncal["study"]["auroc"],
                        "calibrated": calibrated_study},
        "uncalibrated": uncal,
    }


CALIBRATION_DESCRIPTIONS = {
    "platt": "Platt scaling: sigmoid(slope * logit + intercept), NLL minimised on valid (Platt's smoothed targets)",
    "temperature": "temperature scaling: sigmoid(logit / T), NLL minimised on valid by a bounded 1-D search",
    "none": "none: sigmoid(logit)",
}


def figure(value: float | None, ci: Any = None) -> str:
    """A metric as every printed line and table writes it: three decimals or n/a, then its 95% interval as
    " [low, high]" where there is one."""
    text = "n/a" if value is None else f"{value:.3f}"
    return text if not ci or ci[0] is None else f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"


def calibration_words(section: dict[str, Any], where: str = "valid") -> str:
    """A report's calibration in words: "Platt scaling: sigmoid(a * logit + b) fitted on valid", or
    "Temperature scaling: T = ... fitted on valid" (an older report's too), and whether it is applied."""
    if "slope" not in section or section.get("method") == "temperature":
        t = section.get("temperature")
        words = "Temperature scaling: " + ("T = 1" if t is None else f"T = {float(t):.3f}") + f" fitted on {where}"
        if not section.get("applied"):
            words += " (not applied: valid had one class)" if "slope" not in section else f" ({_NOT_APPLIED})"
        return words
    if section.get("method") == "none":
        return f"Not calibrated ({_NOT_APPLIED})"
    words = (f"Platt scaling: sigmoid({section['slope']:.3f} * logit {section['intercept']:+.3f}) fitted on {where}")
    return words if section.get("applied") else f"Not calibrated: {words} but {_NOT_APPLIED}"


_NOT_APPLIED = "not applied: it did not lower valid's cross-fitted NLL; probabilities are the raw sigmoid(logit)"


def _calibration_keys(predictions: pd.DataFrame, selection: Selection, y: np.ndarray,
                      z: np.ndarray) -> dict[str, Any]:
    """The calibration section's head: what was fitted, whether applied, and the before / after figures
    (valid: cross-fitted, when ``selection`` was chosen on these predictions; other splits: plain)."""
    fitted = selection.fitted or selection.calibration
    head: dict[str, Any] = {**fitted.to_dict(), "description": CALIBRATION_DESCRIPTIONS[fitted.method],
                            "applied": bool(selection.calibrated), "fitted_on": "valid"}
    plain = calibration_summary(y, z, selection.calibration)
    cross = selection.cross_fitted
    if cross is not None and cross.get("n") == len(y):  # the images the selection was chosen on
        head.update({"bins": ECE_BINS, "binning": ECE_BINNING,
                     "figures": (f"cross-fitted: {cross['folds']}-fold within valid (each image calibrated by a fit "
                                 f"on the other folds, pooled); the fit on all of valid is what is applied")})
        for key in ("ece", "nll", "brier"):
            after = cross[key]["calibrated"] if selection.calibrated else cross[key]["uncalibrated"]
            head[key] = {"uncalibrated": cross[key]["uncalibrated"], "calibrated": after}
        head["in_sample"] = {k: plain[k]["calibrated"] for k in ("ece", "nll", "brier")}
        head["cross_fitted_candidate"] = {k: cross[k]["calibrated"] for k in ("ece", "nll", "brier")}
    else:
        head.update(plain)
        head["figures"] = "plain: the calibration chosen on valid, applied to these images"
    if not selection.calibrated:
        head["note"] = ("not calibrated: the fit did not lower valid's cross-fitted NLL (or could not be made); "
                        "probabilities are the raw sigmoid(logit)")
    return head


# ---- tables for the notebooks -------------------------------------------------------------------


def thresholds_table(report: dict[str, Any]) -> pd.DataFrame:
    """A report's operating points (thresholds chosen on valid) and what each does on its split, with
    the primary method's uncalibrated thresholds beside."""
    rows: dict[str, dict[str, Any]] = {}

    def row(threshold: Any, image: dict | None, study_threshold: Any, study: dict | None) -> dict[str, Any]:
        image, study = image or {}, study or {}
        return {"image threshold": threshold, "image sensitivity": image.get("sensitivity"),
                "image specificity": image.get("specificity"), "image kappa": image.get("kappa"),
                "study threshold": study_threshold, "study sensitivity": study.get("sensitivity"),
                "study specificity": study.get("specificity"), "study kappa": study.get("kappa")}

    for name, p in (report.get("operating_points") or {}).items():
        label = "Youden's J" if name == "youden" else f"sensitivity >= {p['target']:.2f} on valid"
        rows[label] = row(p["threshold"], p["image"], p.get("study_threshold"), p.get("study"))
    uncal = (report.get("calibration") or {}).get("uncalibrated")
    if uncal:
        rows[f"{report.get('threshold_method', 'youden')}, uncalibrated"] = row(
            uncal["threshold"], uncal["image"], uncal.get("study_threshold"), uncal.get("study"))
    return pd.DataFrame.from_dict(rows, orient="index")


def calibration_table(*reports: dict[str, Any]) -> pd.DataFrame:
    """The calibration (fitted on valid) and ECE, NLL and Brier score before and after it, one row per
    report (valid's after figures cross-fitted; an older report's method is its temperature's)."""
    rows = {}
    for r in reports:
        c = r.get("calibration")
        if c:
            slope = c.get("slope", 1.0 / c["temperature"] if c.get("temperature") else 1.0)
            rows[r["split"]] = {"method": c["method"] if "slope" in c else "temperature",
                                "applied": c.get("applied"), "slope": slope, "intercept": c.get("intercept", 0.0),
                                "temperature": c.get("temperature"), "ECE uncalibrated": c["ece"]["uncalibrated"],
                                "ECE calibrated": c["ece"]["calibrated"], "NLL uncalibrated": c["nll"]["uncalibrated"],
                                "NLL calibrated": c["nll"]["calibrated"], "Brier uncalibrated": c["brier"]["uncalibrated"],
                                "Brier calibrated": c["brier"]["calibrated"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def per_part_table(report: dict[str, Any]) -> pd.DataFrame:
    """per_body_part as a table; on MURA runs with the DenseNet-169 baseline beside, its column saying
    that the baseline is on MURA's hidden test set (no column for other sources)."""
    table = pd.DataFrame(report["per_body_part"]).T
    baseline = report.get("baseline")
    if baseline:
        column = "MURA DenseNet-169 study kappa (hidden test set)"
        table[column] = [baseline["study_kappa"].get(part) for part in table.index]
    return table
