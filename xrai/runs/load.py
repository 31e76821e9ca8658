"""Loading a run to predict with: its model (a CV run's fold ensemble), its config, the checkpoint's hash
and the operating point chosen on validation for THAT checkpoint. Loading never writes to the run folder:
a stale operating point is refused in one line that names the command choosing it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from xrai.config import TrainConfig
from xrai.env import autocast_dtype, get_device
from xrai.errors import first_lines
from xrai.models.checkpoint import CheckpointError, load_checkpoint
from xrai.models.ensemble import FoldEnsemble
from xrai.models.factory import XraiClassifier, create_model
from xrai.models.logits import flip_tta_logits, one_logit
from xrai.models.pruning import fold_pruning
from xrai.runs.layout import RunFolder
from xrai.runs.operating import (
    Calibration,
    OperatingPoint,
    StaleOperatingPointError,
    evaluate_command,
    operating_point,
    run_checkpoint_sha256,
)

__all__ = ["STALE", "RunModel", "StaleThresholdWarning", "load_ensemble", "load_model", "load_run", "run_tta"]

# What load_run does with a stale operating point: refuse it (every consumer), or use the defaults with
# a note (evaluate, which chooses it again on valid).
STALE = ("refuse", "default")


class StaleThresholdWarning(UserWarning):
    """The operating point was chosen with another checkpoint: evaluate chooses it again."""


def run_tta(run_dir: str | Path) -> bool:
    """Whether the run's recipe scores with flip TTA (config.json "tta"; False for runs made before it existed)."""
    return bool(RunFolder(run_dir).read_config().get("tta", False))


def load_model(
    path_or_run_dir: str | Path, *, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[XraiClassifier, TrainConfig]:
    """Rebuild a trained model from a run folder (``checkpoints/<which>.pt``) or a checkpoint file.

    Pruning reparametrisation (``x.weight_orig`` and ``x.weight_mask``) is folded into ``x.weight``, so
    the returned model is a plain one with the pruned weights at zero.

    Returns:
        (model in eval mode on ``device``, the run's TrainConfig). For a cross-validation run folder
        (cv.json) the model is its folds' ``xrai.models.ensemble.FoldEnsemble``.

    Raises:
        FileNotFoundError: no such checkpoint; says which notebook or command makes it.
        ValueError: the file is not an xrai checkpoint (CheckpointError: it cannot be read at all).
    """
    path = Path(path_or_run_dir)
    if RunFolder(path).is_cv:  # a cross-validation run: its folds' ensemble
        return load_ensemble(path, which=which, device=device)
    if path.suffix in (".pt", ".pth"):
        checkpoint_path, run_dir = path, path.parent.parent
    else:
        checkpoint_path, run_dir = RunFolder(path).checkpoint(which), path
    if not checkpoint_path.is_file():
        found = sorted(p.name for p in checkpoint_path.parent.glob("*.pt")) if checkpoint_path.parent.is_dir() else []
        raise FileNotFoundError(
            f"no checkpoint {checkpoint_path} (run folder {run_dir}; checkpoints there: {found or 'none'}). "
            f"A run folder's checkpoints are made by notebooks/03_train.ipynb or "
            f"`python -m xrai train --out {run_dir}`"
        )
    checkpoint = load_checkpoint(checkpoint_path)  # a torn or foreign file: CheckpointError naming it
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{checkpoint_path} is not an xrai checkpoint: expected keys 'model' and 'config', got {keys}")
    config = TrainConfig.from_dict(checkpoint["config"])
    model = create_model(
        config.model, pretrained=False, head=config.head, dropout=config.dropout, freeze=config.freeze
    )
    # last.pt of a run with an EMA keeps the raw weights for resuming and the EMA's (the ones validated) apart
    state = checkpoint.get("ema") or checkpoint["model"]
    state = {k: v for k, v in state.items() if k != "n_averaged"}  # AveragedModel's counter
    try:
        model.load_state_dict(fold_pruning(_strip_wrappers(state)), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights: a file edited or mixed up
        raise CheckpointError(f"{checkpoint_path}: its weights do not fit the {config.model} its config names "
                              f"({first_lines(err)}); the file was altered or mixed up with another run's") from err
    if str(device) == "auto":
        device = get_device("auto")
    return model.to(device).eval(), config


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the key prefixes torch.compile (``_orig_mod.``) and DataParallel (``module.``) add."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_ensemble(run_dir: str | Path, *, which: str = "best",
                  device: str | torch.device = "cpu") -> tuple[FoldEnsemble, TrainConfig]:
    """The fold ensemble of a CV run folder and the config its folds were trained with.

    Args:
        run_dir: the CV run folder (cv.json, config.json, folds/<k>/checkpoints/).
        which: the folds' checkpoint, "best" (the weights each fold hands on) or "last".
        device: where the ensemble goes ("auto": CUDA when there is one).
    Raises:
        FileNotFoundError: no cv.json, or a fold's checkpoint is missing (the message names it).
    """
    run = RunFolder(run_dir)
    folds = run.cv_folds()
    if folds is None:
        raise FileNotFoundError(f"no {run.cv_json.name} in {run.path}: not a finished cross-validation run; make "
                                f"one with `python -m xrai cv --data SOURCE --out {run.path}`")
    members, config = [], TrainConfig.from_json(run.config_json)
    for fold in range(folds):
        model, fold_config = load_model(run.fold(fold).path, which=which, device=device)
        if (fold_config.image_size, fold_config.resize_size, fold_config.resize) != (
                config.image_size, config.resize_size, config.resize):
            raise ValueError(f"fold {fold} of {run.path} was trained with other input settings than "
                             f"{run.config_json}; rerun the CV into a new folder")
        members.append(model)
    ensemble = FoldEnsemble(members).to(next(members[0].parameters()).device).eval()
    ensemble.xrai_name = f"{config.model} ({len(members)}-fold ensemble)"
    return ensemble, config


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
    def calibration(self) -> Calibration:
        """sigmoid(slope * logit + intercept): what ``calibrate`` applies."""
        return self.point.calibration

    @property
    def calibrated(self) -> bool:
        return self.point.calibrated

    @property
    def threshold_from(self) -> str:
        """Where the thresholds came from, in words."""
        if self.point.source in ("valid", "oof"):
            return (f"{self.point.source} ({RunFolder(self.run_dir).operating_point_file.name}, "
                    f"checkpoint sha256 {self.checkpoint_sha256[:12]})")
        return f"default {self.point.threshold}: {self.point.note}"

    @property
    def checkpoint_file(self) -> str:
        """The checkpoint(s) behind the model, relative to the run folder."""
        if RunFolder(self.run_dir).is_cv:
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
        amp = autocast_dtype(self.device) if self.device.type == "cuda" else None
        return one_logit(self.model, x.to(self.device), amp=amp)

    def calibrate(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities sigmoid(slope * logit + intercept) for logits (any array-like)."""
        return self.point.calibrate(logits)

    def probabilities(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, raw) probabilities of "abnormal" for a normalised batch (B, 3, H, W), with the
        recipe's flip TTA when it has one (as its thresholds were chosen)."""
        z = self.tta_logits(x).cpu().numpy().astype(np.float64)
        return self.calibrate(z), expit(z)


def load_run(
    run_dir: str | Path, *, which: str = "best", device: str | torch.device = "cpu", stale: str = "refuse"
) -> RunModel:
    """Load a run's model and the operating point chosen on valid for this very checkpoint. Reads only.

    A run never evaluated predicts at the defaults (threshold 0.5, no calibration; ``point.note`` says
    why). An operating point chosen with another checkpoint (or that does not say which) is stale.

    Args:
        stale: "refuse" (a StaleOperatingPointError naming ``python -m xrai evaluate``), or "default":
            the defaults with the reason in ``point.note`` (evaluate, which chooses the point again).

    Raises:
        FileNotFoundError: no such checkpoint (from ``load_model``).
        StaleOperatingPointError: a stale operating point and ``stale="refuse"``.
        OperatingPointError: the operating-point file holds a NaN or out-of-range number.
    """
    if stale not in STALE:
        raise ValueError(f"stale must be one of {STALE}, got {stale!r}")
    run_dir = Path(run_dir)
    dev = get_device(device) if isinstance(device, str) else torch.device(device)
    model, config = load_model(run_dir, which=which, device=dev)  # a CV run: its folds' ensemble
    sha = run_checkpoint_sha256(run_dir, which)
    point, reason = operating_point(run_dir, sha)
    where = RunFolder(run_dir).operating_point_file
    if point is None and where.is_file():  # there, but stale
        again = ("rerun the CV (`python -m xrai cv`) into a new folder" if where.name != "report_valid.json"
                 else f"choose it again with `{evaluate_command(run_dir)}`")
        if stale == "refuse":
            raise StaleOperatingPointError(f"{run_dir}: {reason}; {again}")
        reason += f"; {again}"
    if point is None:
        point = OperatingPoint(note=reason)
    return RunModel(model=model, config=config, run_dir=run_dir, which=which, checkpoint_sha256=sha,
                    device=dev, point=point)
