"""The fold ensemble of a cross-validation run: one model whose probability is the mean of the folds'.

``FoldEnsemble`` keeps the one-logit contract of every xrai model (the logit of the mean probability),
so ``predict``, ``evaluate``, the app and Grad-CAM take it where they take a single model;
``xrai.models.factory.load_model`` returns it for a CV run folder (one holding cv.json, made by
``xrai.train.cv.cross_validate``). Probabilities, not logits, are averaged: a fold that is very sure cannot
outvote the others by the size of its logit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from xrai.config import TrainConfig

__all__ = ["CV_FILE", "FoldEnsemble", "cv_folds", "is_cv_run", "load_ensemble"]

CV_FILE = "cv.json"  # marks a cross-validation run folder
_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the logit, so it stays finite


class FoldEnsemble(nn.Module):
    """Average the probabilities of one-logit members; return the logit of that mean, shape (B, 1).

    Args:
        members: the folds' models (same input size and preprocessing).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("FoldEnsemble needs at least one member model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(x).float().reshape(x.shape[0], -1)[:, :1]) for m in self.members])
        return torch.logit(probs.mean(0), eps=_EPS)


def is_cv_run(run_dir: str | Path) -> bool:
    """Whether a folder is a cross-validation run (it holds cv.json)."""
    return (Path(run_dir) / CV_FILE).is_file()


def cv_folds(run_dir: str | Path) -> int | None:
    """A cross-validation run's number of folds (cv.json "folds"); None when the folder is not one."""
    if not is_cv_run(run_dir):
        return None
    return int(json.loads((Path(run_dir) / CV_FILE).read_text(encoding="utf-8"))["folds"])


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
    from xrai.models.factory import load_model

    run_dir = Path(run_dir)
    folds = cv_folds(run_dir)
    if folds is None:
        raise FileNotFoundError(f"no {CV_FILE} in {run_dir}: not a finished cross-validation run; make one with "
                                f"`python -m xrai cv --data SOURCE --out {run_dir}`")
    members, config = [], TrainConfig.from_json(run_dir / "config.json")
    for fold in range(folds):
        model, fold_config = load_model(run_dir / "folds" / str(fold), which=which, device=device)
        if (fold_config.image_size, fold_config.resize_size, fold_config.resize) != (
                config.image_size, config.resize_size, config.resize):
            raise ValueError(f"fold {fold} of {run_dir} was trained with other input settings than "
                             f"{run_dir / 'config.json'}; rerun the CV into a new folder")
        members.append(model)
    ensemble = FoldEnsemble(members).to(next(members[0].parameters()).device).eval()
    ensemble.xrai_name = f"{config.model} ({len(members)}-fold ensemble)"
    return ensemble, config
