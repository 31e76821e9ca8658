"""A run's operating point: the temperature and thresholds chosen on validation for one checkpoint.

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
from xrai.labels import DEFAULT_THRESHOLD
from xrai.runs.layout import RunFolder, read_json

__all__ = [
    "OperatingPoint",
    "OperatingPointError",
    "StaleOperatingPointError",
    "apply_temperature",
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
    a temperature that is not positive); the message names the file and the field."""


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """sigmoid(logit / T) in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return expit(np.asarray(logits, dtype=np.float64) / float(temperature))


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file's bytes (streamed: DenseNet-169's 50 MB take ~0.1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            open_low: bool = False) -> float:
    value = report[key] if key in report else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OperatingPointError(f"{where}: {key} is {value!r}, not a number; {_REDO}") from None
    inside = (low < number if open_low else low <= number) and number <= high
    if math.isnan(number) or not inside:
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
        temperature: the temperature the logits are divided by (1.0 when uncalibrated).
        calibrated: whether a temperature was fitted.
        checkpoint_sha256: the checkpoint these were chosen with; None for the defaults.
        source: "valid" (read from report_valid.json), "oof" (chosen on a CV's out-of-fold predictions:
            report_oof.json or threshold.json) or "default".
        note: why the defaults are in use, for people ("" when source is "valid").
    """

    threshold: float = DEFAULT_THRESHOLD
    study_threshold: float | None = None
    temperature: float = 1.0
    calibrated: bool = False
    checkpoint_sha256: str | None = None
    source: str = "default"
    note: str = ""

    @classmethod
    def from_report(cls, report: dict[str, Any], where: str = "the report") -> OperatingPoint:
        """The operating point a report_valid.json (or report_oof.json, threshold.json) holds.

        Raises:
            OperatingPointError: a threshold that is NaN or outside [0, 1], a temperature that is not a
                positive number; the message names ``where`` and the field.
        """
        calibration = report.get("calibration") or {}
        temperature = calibration.get("temperature")
        study = report.get("study_threshold")
        return cls(
            threshold=_number(report, "threshold", where, low=0.0, high=1.0),
            study_threshold=None if study is None else _number(report, "study_threshold", where, low=0.0, high=1.0),
            temperature=1.0 if temperature is None else _number(calibration, "temperature", where, low=0.0,
                                                                 high=math.inf, open_low=True),
            calibrated=bool(calibration.get("applied", False)),
            checkpoint_sha256=(report.get("checkpoint") or {}).get("sha256"),
            source="oof" if report.get("threshold_from") == "oof" else "valid",
        )

    def calibrate(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities sigmoid(logit / T) for logits (any array-like)."""
        return apply_temperature(logits, self.temperature)


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
