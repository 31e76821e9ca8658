"""The fold ensemble of a cross-validation run: one model whose probability is the mean of the folds'.

``FoldEnsemble`` keeps the one-logit contract of every xrai model (the logit of the mean probability,
``xrai.models.logits.mean_probability_logit``), so ``predict``, ``evaluate``, the app and Grad-CAM take
it where they take a single model; ``xrai.runs.load.load_model`` returns it for a CV run folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xrai.models.logits import mean_probability_logit

__all__ = ["FoldEnsemble"]


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
        return mean_probability_logit(probs)
