"""One way to load what a run predicts with: the model, its config, the checkpoint's hash, and the
operating point chosen on validation for THAT checkpoint (temperature, image and study thresholds).

``evaluate``, the predict/explain CLI, the widgets and the app all go through :func:`load_run`, so a
threshold is never reused after the checkpoint changed: report_valid.json records the sha256 of the
checkpoint it was made with, and a run whose checkpoint no longer matches is re-evaluated on valid
(or, where it cannot be, falls back to 0.5 with a note saying why).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrai.models.ensemble import cv_folds, is_cv_run

__all__ = [
    "DEFAULT_THRESHOLD",
    "THRESHOLD_FILE",
    "OperatingPoint",
    "RunModel",
    "StaleThresholdWarning",
    "checkpoint_path",
    "checkpoint_sha256",
    "flip_tta_logits",
    "folds_sha256",
    "load_run",
    "one_logit",
    "operating_point",
    "operating_point_file",
    "run_checkpoint_sha256",
    "run_tta",
]

DEFAULT_THRESHOLD = 0.5
# Where a run without a validation split of its own (a final fit on all of a CV's pool) keeps the
# operating point it was given: the CV's out-of-fold one, {"threshold_from": "oof", ...}.
THRESHOLD_FILE = "threshold.json"
_TTA_EPS = 1e-6  # the mean probability is clamped to [eps, 1 - eps] before its logit


def flip_tta_logits(forward: Any, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Flip test-time augmentation: the logit of the mean probability of each image and its left-right
    mirror (the one definition training's validation, predict, explain and the app use).

    Args:
        forward: images (B, 3, H, W) -> logits (B,).
        logits: ``forward(x)`` when already computed (e.g. by a Grad-CAM pass).
    """
    z = forward(x) if logits is None else torch.as_tensor(logits, device=x.device)
    flipped = forward(torch.flip(x, dims=[3]))
    mean = (torch.sigmoid(z.float()) + torch.sigmoid(flipped.float().reshape(z.shape))) / 2
    # log(p) - log(1 - p) rather than torch.logit: the same figure, in operators every ONNX opset has
    mean = mean.clamp(_TTA_EPS, 1 - _TTA_EPS)
    return torch.log(mean) - torch.log1p(-mean)


def one_logit(model: nn.Module, x: torch.Tensor, *, amp: torch.dtype | None = None) -> torch.Tensor:
    """A one-logit classifier's logit per image, float32 (B,), without autograd; under autocast to
    ``amp`` when given (the one forward predict, explain, the run's model and their TTA share)."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        return model(x).float().reshape(x.shape[0], -1)[:, 0]


def operating_point_file(run_dir: str | Path) -> Path:
    """The file holding a run's operating point: report_valid.json; a CV run's report_oof.json (chosen on
    its out-of-fold predictions); a final fit's threshold.json (the CV's, given to it)."""
    run_dir = Path(run_dir)
    if is_cv_run(run_dir):
        return run_dir / "report_oof.json"
    if (run_dir / THRESHOLD_FILE).is_file():
        return run_dir / THRESHOLD_FILE
    return run_dir / "report_valid.json"


def run_tta(run_dir: str | Path) -> bool:
    """Whether the run's recipe scores with flip TTA (config.json "tta"; False for runs made before it existed)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text(encoding="utf-8")).get("tta", False))


class StaleThresholdWarning(UserWarning):
    """report_valid.json was chosen with another checkpoint (or does not say which)."""


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """run_dir/checkpoints/<which>.pt."""
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def run_checkpoint_sha256(run_dir: str | Path, which: str = "best") -> str:
    """The sha256 a run's operating point is bound to: its checkpoint's, or for a CV run (cv.json) the
    sha256 of its folds' checkpoint hashes in fold order (any retrained fold changes it)."""
    folds = cv_folds(run_dir)
    return checkpoint_sha256(checkpoint_path(run_dir, which)) if folds is None else folds_sha256(run_dir, folds, which)


def folds_sha256(run_dir: str | Path, folds: int, which: str = "best") -> str:
    """The sha256 of a CV run's fold checkpoints' hashes (folds/<k>/checkpoints/<which>.pt, k in order)."""
    hashes = [checkpoint_sha256(checkpoint_path(Path(run_dir) / "folds" / str(k), which)) for k in range(folds)]
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file's bytes (streamed: DenseNet-169's 50 MB take ~0.1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    def from_report(cls, report: dict[str, Any]) -> "OperatingPoint":
        """The operating point a report_valid.json holds."""
        calibration = report.get("calibration") or {}
        temperature = calibration.get("temperature")
        study = report.get("study_threshold")
        return cls(
            threshold=float(report["threshold"]),
            study_threshold=None if study is None else float(study),
            temperature=1.0 if temperature is None else float(temperature),
            calibrated=bool(calibration.get("applied", False)),
            checkpoint_sha256=(report.get("checkpoint") or {}).get("sha256"),
            source="oof" if report.get("threshold_from") == "oof" else "valid",
        )


def operating_point(run_dir: str | Path, sha256: str) -> tuple[OperatingPoint | None, str]:
    """The run's operating point if report_valid.json was made with the checkpoint ``sha256``.

    Returns:
        (point, "") when current; (None, reason) when missing or stale, the reason in words.
    """
    path = operating_point_file(run_dir)
    if not path.is_file():
        return None, "the run has not been evaluated"
    report = json.loads(path.read_text(encoding="utf-8"))
    recorded = (report.get("checkpoint") or {}).get("sha256")
    if recorded is None:
        return None, f"{path.name} does not record the checkpoint its threshold was chosen with"
    if recorded != sha256:
        return None, (f"{path.name} was made with checkpoint sha256 {recorded[:12]}, "
                      f"but the checkpoint is now {sha256[:12]}")
    return OperatingPoint.from_report(report), ""


@dataclass(kw_only=True, eq=False)
class RunModel:
    """A run's model with the operating point it predicts at.

    ``probabilities(x)`` gives calibrated and raw probabilities of "abnormal" for a normalised batch;
    a prediction is abnormal when the calibrated probability reaches ``threshold``.
    """

    model: nn.Module
    config: Any
    run_dir: Path
    which: str = "best"
    checkpoint_sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    point: OperatingPoint = field(default_factory=OperatingPoint)

    @property
    def threshold(self) -> float:
        return self.point.threshold

    @property
    def study_threshold(self) -> float | None:
        return self.point.study_threshold

    @property
    def temperature(self) -> float:
        return self.point.temperature

    @property
    def calibrated(self) -> bool:
        return self.point.calibrated

    @property
    def threshold_from(self) -> str:
        """Where the thresholds came from, in words."""
        if self.point.source in ("valid", "oof"):
            return (f"{self.point.source} ({operating_point_file(self.run_dir).name}, "
                    f"checkpoint sha256 {self.checkpoint_sha256[:12]})")
        return f"default {DEFAULT_THRESHOLD}: {self.point.note}"

    @property
    def checkpoint_file(self) -> str:
        """The checkpoint(s) behind the model, relative to the run folder."""
        if is_cv_run(self.run_dir):
            return f"folds/*/checkpoints/{self.which}.pt"
        return f"checkpoints/{self.which}.pt"

    def tta_logits(self, x: torch.Tensor, logits: Any = None) -> torch.Tensor:
        """The logits the run decides with: with the recipe's flip TTA (config.tta) when it has it.

        Args:
            logits: the unflipped batch's logits when already computed (a Grad-CAM pass).
        """
        if not getattr(self.config, "tta", False):
            return self.logits(x) if logits is None else torch.as_tensor(logits)
        return flip_tta_logits(self.logits, x.to(self.device), logits)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logit per image, float32 (B,), on the run's device."""
        from xrai.env import autocast_dtype

        amp = autocast_dtype(self.device) if self.device.type == "cuda" else None
        return one_logit(self.model, x.to(self.device), amp=amp)

    def calibrate(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities sigmoid(logit / T) for logits (any array-like)."""
        from xrai.evaluate.calibration import apply_temperature

        return apply_temperature(np.asarray(logits, dtype=np.float64), self.temperature)

    def probabilities(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, raw) probabilities of "abnormal" for a normalised batch (B, 3, H, W), with the
        recipe's flip TTA when it has one (as its thresholds were chosen)."""
        from scipy.special import expit

        z = self.tta_logits(x).cpu().numpy().astype(np.float64)
        return self.calibrate(z), expit(z)


def load_run(
    run_dir: str | Path, *, which: str = "best", device: str | torch.device = "cpu", refresh: bool = True
) -> RunModel:
    """Load a run's model and the operating point chosen on valid for this very checkpoint.

    When report_valid.json is missing, does not record its checkpoint, or records another one, and
    ``refresh`` is True, the run is evaluated on valid again (thresholds and temperature recomputed,
    report_valid.json rewritten) before loading, with a StaleThresholdWarning. Where that cannot be
    done (no manifest.csv, a read-only run folder, ``refresh=False``) the defaults are used: threshold
    0.5, no calibration, and ``point.note`` says why.

    Raises:
        FileNotFoundError: no such checkpoint (from ``xrai.models.factory.load_model``).
    """
    from xrai.env import get_device
    from xrai.models.factory import load_model

    run_dir = Path(run_dir)
    dev = get_device(device) if isinstance(device, str) else torch.device(device)
    model, config = load_model(run_dir, which=which, device=dev)  # a CV run: its folds' ensemble
    sha = run_checkpoint_sha256(run_dir, which)
    point, reason = operating_point(run_dir, sha)
    if point is None and refresh and operating_point_file(run_dir).is_file():  # there, but stale
        if operating_point_file(run_dir).name != "report_valid.json":
            reason += "; an out-of-fold threshold cannot be chosen again here (rerun the CV)"
        elif not (run_dir / "manifest.csv").is_file() or not os.access(run_dir, os.W_OK):
            reason += "; it cannot be re-evaluated here (no manifest.csv, or a read-only run folder)"
        else:
            from xrai.evaluate.run import evaluate_run

            warnings.warn(f"{run_dir}: {reason}; re-evaluating on valid to choose the threshold again",
                          StaleThresholdWarning, stacklevel=2)
            evaluate_run(run_dir, split="valid", which=which, device=str(dev), progress=False, explain_images=0)
            point, reason = operating_point(run_dir, sha)
    if point is None:
        point = OperatingPoint(note=reason)
    return RunModel(model=model, config=config, run_dir=run_dir, which=which, checkpoint_sha256=sha,
                    device=dev, point=point)
