"""Calibrated probabilities: temperature scaling fitted on validation logits, ECE and reliability bins.

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
from scipy.optimize import minimize_scalar

from xrai.evaluate.metrics import binary_arrays
from xrai.runs.operating import apply_temperature

__all__ = [
    "ECE_BINS",
    "ECE_BINNING",
    "TEMPERATURE_BOUNDS",
    "apply_temperature",
    "brier_score",
    "calibration_summary",
    "expected_calibration_error",
    "fit_temperature",
    "log_loss",
    "reliability_bins",
]

ECE_BINS = 15
ECE_BINNING = ("equal-width bins of p(abnormal) over [0, 1]; ECE = sum over bins of "
               "(images in bin / images) * |mean p(abnormal) - fraction abnormal|")
# A wider range than any trained network needs; the search runs on log T inside it.
TEMPERATURE_BOUNDS = (0.05, 20.0)
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


def calibration_summary(labels: Any, logits: Any, temperature: float, *, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, NLL and Brier score before (T = 1) and after temperature scaling, side by side."""
    y, z = _arrays(labels, logits)
    raw, cal = apply_temperature(z, 1.0), apply_temperature(z, temperature)
    return {
        "bins": int(n_bins),
        "binning": ECE_BINNING,
        "ece": {"uncalibrated": expected_calibration_error(y, raw, n_bins=n_bins),
                "calibrated": expected_calibration_error(y, cal, n_bins=n_bins)},
        "nll": {"uncalibrated": log_loss(y, raw), "calibrated": log_loss(y, cal)},
        "brier": {"uncalibrated": brier_score(y, raw), "calibrated": brier_score(y, cal)},
    }
