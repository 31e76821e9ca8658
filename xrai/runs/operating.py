"""A run's operating point: the calibration and thresholds chosen on validation for one checkpoint.

The calibration is :class:`Calibration`, p = sigmoid(slope * logit + intercept): Platt scaling (slope
and intercept fitted on valid) or temperature scaling (slope 1/T, intercept 0), or none (1, 0). Only
Platt can undo the shift positive-class weighting puts on every logit (BCE pos_weight w moves them by
about log w), so it is the default; the fit lives in ``xrai.evaluate.calibration``.

The file that holds it (report_valid.json, a CV's report_oof.json, a final fit's threshold.json; see
``RunFolder.operating_point_file``) records the sha256 of the checkpoint it was chosen with. A point
made with another checkpoint is stale: nothing but ``evaluate`` chooses it again.
"""

from __future__ import annotations

import hashlib
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from xrai.errors import UserError
from xrai.fileio import sha256_file
from xrai.labels import DEFAULT_THRESHOLD
from xrai.runs.layout import RunFolder, read_json

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "OperatingPoint",
    "OperatingPointError",
    "NO_CALIBRATION",
    "StaleOperatingPointError",
    "apply_temperature",
    "calibration_from_report",
    "checkpoint_sha256",
    "evaluate_command",
    "folds_sha256",
    "operating_point",
    "run_checkpoint_sha256",
]


class StaleOperatingPointError(UserError):
    """The operating point was chosen with another checkpoint (or does not say which); the message
    names the command that chooses it again."""


class OperatingPointError(UserError, ValueError):
    """The operating-point file holds a number that cannot be one (NaN, a threshold outside [0, 1],
    a temperature or calibration slope that is not positive); the message names the file and the field."""


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """sigmoid(logit / T) in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return expit(np.asarray(logits, dtype=np.float64) / float(temperature))


CALIBRATION_METHODS = ("platt", "temperature")  # what evaluate can fit; "none" is the identity


@dataclass(frozen=True)
class Calibration:
    """p(abnormal) = sigmoid(slope * logit + intercept), the run's calibrated probability.

    ``slope`` > 0 keeps the order of the logits (AUROC, and which side of a threshold an image falls),
    so thresholds chosen on calibrated probabilities follow the calibrator.

    Attributes:
        method: "platt" (slope and intercept fitted on valid), "temperature" (slope 1/T, intercept 0)
            or "none" (slope 1, intercept 0: the raw sigmoid(logit)).
    """

    method: str = "none"
    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in (*CALIBRATION_METHODS, "none"):
            raise ValueError(f"unknown calibration method {self.method!r}; "
                             f"choose one of: {', '.join(CALIBRATION_METHODS)}")
        if not (math.isfinite(self.slope) and self.slope > 0):
            raise ValueError(f"calibration slope must be a finite number > 0, got {self.slope}")
        if not math.isfinite(self.intercept):
            raise ValueError(f"calibration intercept must be finite, got {self.intercept}")
        if self.method != "platt" and self.intercept != 0:
            raise ValueError(f"{self.method} calibration has intercept 0, got {self.intercept}")
        if self.method == "none" and self.slope != 1:
            raise ValueError(f"no calibration has slope 1, got {self.slope}")

    @classmethod
    def from_temperature(cls, temperature: float) -> Calibration:
        """Temperature scaling sigmoid(logit / T) as a calibrator (T = 1: none)."""
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return cls() if temperature == 1 else cls("temperature", 1.0 / float(temperature), 0.0)

    @property
    def temperature(self) -> float:
        """1 / slope: the temperature for "temperature" (and 1 for "none"); for "platt" only the scale
        part (the intercept is not in it: use :meth:`apply`)."""
        return 1.0 / self.slope

    @property
    def is_identity(self) -> bool:
        return self.slope == 1 and self.intercept == 0

    def apply(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities sigmoid(slope * logit + intercept), float64."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            return expit(z / self.temperature)  # exactly apply_temperature's number
        return expit(self.slope * z + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        """method, slope, intercept (and temperature for the "temperature" method), for the report."""
        out: dict[str, Any] = {"method": self.method, "slope": float(self.slope), "intercept": float(self.intercept)}
        if self.method == "temperature":
            out["temperature"] = self.temperature
        return out


NO_CALIBRATION = Calibration()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file's bytes (streamed: DenseNet-169's 50 MB take ~0.1 s)."""
    return sha256_file(path)


def folds_sha256(run_dir: str | Path, folds: int, which: str = "best") -> str:
    """The sha256 of a CV run's fold checkpoints' hashes (folds/<k>/checkpoints/<which>.pt, k in order)."""
    run = RunFolder(run_dir)
    hashes = [checkpoint_sha256(run.fold(k).checkpoint(which)) for k in range(folds)]
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def run_checkpoint_sha256(run_dir: str | Path, which: str = "best") -> str:
    """The sha256 a run's operating point is bound to: its checkpoint's, or for a CV run (cv.json) the
    sha256 of its folds' checkpoint hashes in fold order (any retrained fold changes it)."""
    run = RunFolder(run_dir)
    folds = run.cv_folds()
    return checkpoint_sha256(run.checkpoint(which)) if folds is None else folds_sha256(run_dir, folds, which)


def evaluate_command(run_dir: str | Path) -> str:
    """The command that chooses a run's operating point on valid again."""
    return f"python -m xrai evaluate --run {shlex.quote(str(run_dir))} --split valid"


def _number(report: dict[str, Any], key: str, where: str, *, low: float, high: float,
            open_low: bool = False, finite: bool = False) -> float:
    value = report[key] if key in report else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OperatingPointError(f"{where}: {key} is {value!r}, not a number; {_REDO}") from None
    inside = (low < number if open_low else low <= number) and number <= high
    if math.isnan(number) or not inside or (finite and math.isinf(number)):
        raise OperatingPointError(f"{where}: {key} is {number}, outside {'(' if open_low else '['}{low}, {high}]; "
                                  f"{_REDO}")
    return number


_REDO = "the file was edited or damaged: choose the operating point again with `python -m xrai evaluate`"


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """What a run decides with, all chosen on the validation split for one checkpoint.

    Attributes:
        threshold: image-level threshold on calibrated probabilities.
        study_threshold: study-level threshold on the mean of a study's calibrated probabilities;
            None where the source has no studies.
        calibration: the calibrator, sigmoid(slope * logit + intercept) (none: the raw probability);
            ``temperature`` is its 1 / slope.
        calibrated: whether a calibration was fitted and applied.
        checkpoint_sha256: the checkpoint these were chosen with; None for the defaults.
        source: "valid" (read from report_valid.json), "oof" (chosen on a CV's out-of-fold predictions:
            report_oof.json or threshold.json) or "default".
        note: why the defaults are in use, for people ("" when source is "valid").
    """

    threshold: float = DEFAULT_THRESHOLD
    study_threshold: float | None = None
    calibration: Calibration = NO_CALIBRATION
    calibrated: bool = False
    checkpoint_sha256: str | None = None
    source: str = "default"
    note: str = ""

    @property
    def temperature(self) -> float:
        """The calibration's 1 / slope (see :attr:`Calibration.temperature`; 1.0 when uncalibrated)."""
        return self.calibration.temperature

    @classmethod
    def from_report(cls, report: dict[str, Any], where: str = "the report") -> OperatingPoint:
        """The operating point a report_valid.json (or report_oof.json, threshold.json) holds.

        Reads the calibration's ``slope`` and ``intercept``, or an older report's ``temperature`` alone
        (slope 1/T, intercept 0). A calibration not ``applied`` is none: the raw probability.

        Raises:
            OperatingPointError: a threshold that is NaN or outside [0, 1], a temperature or slope that is
                not a positive number, an intercept that is not finite; the message names ``where`` and the field.
        """
        study = report.get("study_threshold")
        calibration, applied = calibration_from_report(report, where)
        return cls(
            threshold=_number(report, "threshold", where, low=0.0, high=1.0),
            study_threshold=None if study is None else _number(report, "study_threshold", where, low=0.0, high=1.0),
            calibration=calibration,
            calibrated=applied,
            checkpoint_sha256=(report.get("checkpoint") or {}).get("sha256"),
            source="oof" if report.get("threshold_from") == "oof" else "valid",
        )

    def calibrate(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities sigmoid(slope * logit + intercept) for logits (any array-like)."""
        return self.calibration.apply(logits)


def calibration_from_report(report: dict[str, Any], where: str = "the report") -> tuple[Calibration, bool]:
    """(the calibrator consumers apply, whether it was applied) from a report's "calibration" section.

    New reports state ``method``, ``slope`` and ``intercept``; older ones only ``temperature`` (slope 1/T,
    intercept 0). Not ``applied``: no calibration (the raw probability), whatever was fitted.

    Raises:
        OperatingPointError: a slope or temperature that is not a positive number, a NaN or infinite intercept.
    """
    section = report.get("calibration") or {}
    applied = bool(section.get("applied", False))
    if "slope" in section:
        slope = _number(section, "slope", where, low=0.0, high=math.inf, open_low=True, finite=True)
        intercept = _number(section, "intercept", where, low=-math.inf, high=math.inf, finite=True)
        method = section.get("method")
        try:
            calibration = Calibration(method, slope, intercept)
        except ValueError as e:
            raise OperatingPointError(f"{where}: calibration {e}; {_REDO}") from None
    elif section.get("temperature") is not None:
        temperature = _number(section, "temperature", where, low=0.0, high=math.inf, open_low=True, finite=True)
        calibration = Calibration.from_temperature(temperature)
    else:
        calibration = NO_CALIBRATION
    if not applied and "slope" in section:
        return NO_CALIBRATION, False
    return calibration, applied


def operating_point(run_dir: str | Path, sha256: str) -> tuple[OperatingPoint | None, str]:
    """The run's operating point if its file was made with the checkpoint ``sha256``.

    Returns:
        (point, "") when current; (None, reason) when missing or stale, the reason in words.
    Raises:
        OperatingPointError: the file holds a NaN or out-of-range number.
    """
    path = RunFolder(run_dir).operating_point_file
    report = read_json(path)
    if report is None:
        return None, "the run has not been evaluated"
    recorded = (report.get("checkpoint") or {}).get("sha256")
    if recorded is None:
        return None, f"{path.name} does not record the checkpoint its threshold was chosen with"
    if recorded != sha256:
        return None, (f"{path.name} was made with checkpoint sha256 {recorded[:12]}, "
                      f"but the checkpoint is now {sha256[:12]}")
    return OperatingPoint.from_report(report, str(path)), ""
