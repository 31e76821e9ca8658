"""Calibrated probabilities: Platt or temperature scaling fitted on validation logits, ECE and reliability bins.

Platt scaling (Platt, "Probabilistic Outputs for Support Vector Machines", 1999) fits
p = sigmoid(a * z + b) to the validation logits by minimising the negative log-likelihood, with
Platt's smoothed targets ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives) so a
small or separable validation set cannot drive a to infinity; a > 0 is kept (the search runs on
log a). It can shift as well as scale: training with BCE pos_weight w moves every logit up by
about log w, which a temperature (scale only) cannot undo. It is the default (DEFAULT_CALIBRATION).

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides the
logit by one number T > 0 fitted on the validation split by minimising the negative log-likelihood.
It is monotonic, so image-level ranking (AUROC) and the partition a threshold makes are unchanged;
what changes is how far the probabilities can be read as frequencies, and the study-level mean of
several views' probabilities. Pure numpy / scipy: nothing here knows of models or files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit

from xrai.evaluate.metrics import binary_arrays
from xrai.runs.operating import CALIBRATION_METHODS, NO_CALIBRATION, Calibration, apply_temperature

__all__ = [
    "CALIBRATION_METHODS",
    "CROSS_FIT_FOLDS",
    "DEFAULT_CALIBRATION",
    "ECE_BINS",
    "ECE_BINNING",
    "SLOPE_BOUNDS",
    "TEMPERATURE_BOUNDS",
    "Calibration",
    "apply_temperature",
    "brier_score",
    "calibration_summary",
    "choose_calibration",
    "cross_fitted_probabilities",
    "expected_calibration_error",
    "fit_calibration",
    "fit_platt",
    "fit_temperature",
    "log_loss",
    "reliability_bins",
]

ECE_BINS = 15
ECE_BINNING = ("equal-width bins of p(abnormal) over [0, 1]; ECE = sum over bins of "
               "(images in bin / images) * |mean p(abnormal) - fraction abnormal|")
# A wider range than any trained network needs; the search runs on log T inside it.
TEMPERATURE_BOUNDS = (0.05, 20.0)
SLOPE_BOUNDS = (1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0])  # Platt's a, the same range as 1/T
DEFAULT_CALIBRATION = "platt"
CROSS_FIT_FOLDS = 5
_EPS = 1e-12


def _arrays(labels: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    return binary_arrays(labels, values, purpose="calibrate", what="logits or probabilities")


def log_loss(labels: Any, probs: Any) -> float:
    """Mean negative log-likelihood of 0/1 labels under probabilities of class 1."""
    y, p = _arrays(labels, probs)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def brier_score(labels: Any, probs: Any) -> float:
    """Mean squared difference between p(abnormal) and the 0/1 label."""
    y, p = _arrays(labels, probs)
    return float(np.mean((p - y) ** 2))


def fit_temperature(logits: Any, labels: Any, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature minimising the NLL of sigmoid(logit / T) on VALIDATION logits (never test).

    A bounded 1-D search (Brent's method on log T) instead of LBFGS: one parameter, a smooth convex
    objective in 1/T, and no learning rate or iteration count to tune.

    Raises:
        ValueError: one class only (the NLL would push T to a bound), or bad inputs.
    """
    y, z = _arrays(labels, logits)
    if len(np.unique(y)) < 2:
        raise ValueError(f"fitting a temperature needs both classes; the {y.size} validation images are one class")
    sign = 2.0 * y - 1.0

    def nll(log_t: float) -> float:
        # -log sigmoid(s * z / T), computed without overflow
        return float(np.mean(np.logaddexp(0.0, -sign * z / np.exp(log_t))))

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def fit_platt(logits: Any, labels: Any, *, bounds: tuple[float, float] = SLOPE_BOUNDS) -> tuple[float, float]:
    """(a, b) minimising the NLL of sigmoid(a * logit + b) on VALIDATION logits against Platt's targets.

    The targets are smoothed ((N+ + 1) / (N+ + 2), 1 / (N- + 2)), so a separable set gives a finite a;
    a is searched as log a inside ``bounds`` (a > 0: the logits' order is kept).

    Raises:
        ValueError: one class only, or bad inputs.
    """
    y, z = _arrays(labels, logits)
    if len(np.unique(y)) < 2:
        raise ValueError(f"fitting a calibration needs both classes; the {y.size} validation images are one class")
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    scale = max(float(np.std(z)), 1e-6)  # the search is on z / scale: a well-conditioned problem

    def nll(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = np.exp(params[0]), params[1]
        u = a * z / scale + b
        # cross-entropy against soft targets, without overflow: log(1 + e^u) - t * u
        loss = np.logaddexp(0.0, u) - target * u
        r = expit(u) - target
        grad = np.array([np.mean(r * u - r * b), np.mean(r)])  # d/dlog a = mean(r * a z / scale)
        return float(np.mean(loss)), grad

    lo, hi = np.log(bounds[0] * scale), np.log(bounds[1] * scale)
    start = np.array([np.clip(np.log(scale), lo, hi), 0.0])  # a = 1, b = 0: the raw logit
    result = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=[(lo, hi), (None, None)])
    return float(np.exp(result.x[0]) / scale), float(result.x[1])


def fit_calibration(logits: Any, labels: Any, method: str = DEFAULT_CALIBRATION) -> Calibration:
    """The calibrator ``method`` ("platt" or "temperature") fitted on VALIDATION logits.

    Raises:
        ValueError: an unknown method, one class only, or bad inputs.
    """
    if method == "platt":
        return Calibration("platt", *fit_platt(logits, labels))
    if method == "temperature":
        return Calibration("temperature", 1.0 / fit_temperature(logits, labels), 0.0)
    raise ValueError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per image, stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    fold = np.empty(y.size, dtype=int)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)] = np.arange(idx.size) % k
    return fold


def cross_fitted_probabilities(logits: Any, labels: Any, method: str = DEFAULT_CALIBRATION, *,
                               folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> tuple[np.ndarray, int]:
    """(probabilities, folds used): each image calibrated by a ``method`` fit on the other folds of valid.

    Stratified folds (fewer where a class has fewer images than ``folds``): pooled, these figures were
    not the ones any fit was chosen on, unlike the same calibrator scored on the images it was fitted to.

    Raises:
        ValueError: a class with fewer than 2 images (no fold could be held out with both classes left).
    """
    y, z = _arrays(labels, logits)
    k = int(min(folds, y.sum(), y.size - y.sum()))
    if k < 2:
        raise ValueError(f"cross-fitting a calibration needs 2 images of each class; valid has "
                         f"{int(y.sum())} abnormal and {int(y.size - y.sum())} normal")
    fold = _folds(y, k, seed)
    out = np.empty(y.size, dtype=np.float64)
    for f in range(k):
        held = fold == f
        out[held] = fit_calibration(z[~held], y[~held], method).apply(z[held])
    return out, k


def choose_calibration(logits: Any, labels: Any, method: str = DEFAULT_CALIBRATION, *,
                       folds: int = CROSS_FIT_FOLDS, seed: int = 0,
                       n_bins: int = ECE_BINS) -> tuple[Calibration, bool, dict[str, Any]]:
    """(fitted calibrator, applied, cross-fitted figures) on VALIDATION logits.

    The calibrator is fitted on all of valid; ``applied`` is whether it lowers valid's NLL cross-fitted
    (:func:`cross_fitted_probabilities`): where it does not, consumers use the raw probability. The
    figures are ECE / NLL / Brier uncalibrated and cross-fitted, with ``folds`` the number used.

    Raises:
        ValueError: an unknown method, one class only, or a class with fewer than 2 images.
    """
    y, z = _arrays(labels, logits)
    fitted = fit_calibration(z, y, method)
    cross, k = cross_fitted_probabilities(z, y, method, folds=folds, seed=seed)
    figures = _figures(y, expit(z), cross, n_bins=n_bins)
    figures.update(folds=k, n=int(y.size))
    applied = figures["nll"]["calibrated"] < figures["nll"]["uncalibrated"]
    return fitted, bool(applied), figures


def _figures(y: np.ndarray, raw: np.ndarray, cal: np.ndarray, *, n_bins: int) -> dict[str, Any]:
    return {
        "ece": {"uncalibrated": expected_calibration_error(y, raw, n_bins=n_bins),
                "calibrated": expected_calibration_error(y, cal, n_bins=n_bins)},
        "nll": {"uncalibrated": log_loss(y, raw), "calibrated": log_loss(y, cal)},
        "brier": {"uncalibrated": brier_score(y, raw), "calibrated": brier_score(y, cal)},
    }


def reliability_bins(labels: Any, probs: Any, *, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width bin of p(abnormal): lower, upper, n, mean_probability, fraction_abnormal.

    The last bin is closed on the right (p = 1 falls in it). Empty bins have n = 0 and NaN means.
    """
    y, p = _arrays(labels, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    n = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=n_bins) / n
        frac = np.bincount(which, weights=y, minlength=n_bins) / n
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "n": n.astype(int),
                         "mean_probability": mean_p, "fraction_abnormal": frac})


def expected_calibration_error(labels: Any, probs: Any, *, n_bins: int = ECE_BINS) -> float:
    """ECE over equal-width bins of p(abnormal) (see ECE_BINNING)."""
    bins = reliability_bins(labels, probs, n_bins=n_bins)
    full = bins[bins["n"] > 0]
    gap = (full["mean_probability"] - full["fraction_abnormal"]).abs()
    return float((full["n"] * gap).sum() / full["n"].sum())


def calibration_summary(labels: Any, logits: Any, calibration: Calibration | float | None,
                        *, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, NLL and Brier score before and after a calibration, side by side, on the same images.

    Args:
        calibration: a :class:`Calibration`, a temperature T (sigmoid(logit / T)), or None (none).
    """
    y, z = _arrays(labels, logits)
    if calibration is None:
        calibration = NO_CALIBRATION
    elif not isinstance(calibration, Calibration):
        calibration = Calibration.from_temperature(float(calibration))
    return {"bins": int(n_bins), "binning": ECE_BINNING,
            **_figures(y, apply_temperature(z, 1.0), calibration.apply(z), n_bins=n_bins)}
