"""The loss and the weights' EMA of a training recipe (label smoothing, positive weighting, EMA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xrai.config import TrainConfig

__all__ = ["SmoothedBCEWithLogitsLoss", "build_criterion", "make_ema"]


class SmoothedBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """BCEWithLogitsLoss against labels pulled towards 0.5: y * (1 - smoothing) + smoothing / 2."""

    def __init__(self, smoothing: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.smoothing = float(smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, target * (1.0 - self.smoothing) + 0.5 * self.smoothing)


def build_criterion(config: TrainConfig, pos_weight: float | None,
                    device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(training loss, validation loss). Both weigh positives by ``pos_weight`` (None: unweighted); only
    training smooths the labels, so validation losses of runs with and without smoothing compare."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32, device=device)
    evaluation = nn.BCEWithLogitsLoss(pos_weight=weight)
    if config.label_smoothing > 0:
        return SmoothedBCEWithLogitsLoss(config.label_smoothing, pos_weight=weight), evaluation
    return evaluation, evaluation


def make_ema(model: nn.Module, config: TrainConfig) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (torch's AveragedModel),
    updated after every optimizer step; None when ``config.ema_decay`` is 0 (off)."""
    if config.ema_decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
