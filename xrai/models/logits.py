"""The one-logit contract's arithmetic: a model's logit per image, the logit of a mean probability (fold
ensembles, flip TTA) and flip test-time augmentation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["flip_tta_logits", "mean_probability_logit", "one_logit"]

_EPS = 1e-6  # a mean probability is clamped to [eps, 1 - eps] before its logit, so the logit stays finite


def mean_probability_logit(probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The logit of the mean of ``probabilities`` along ``dim``: how flip TTA and a fold ensemble combine.

    Probabilities, not logits, are averaged, so one very sure member cannot outvote the others by the size
    of its logit. log(p) - log(1 - p) rather than torch.logit: the same figure, in operators every ONNX
    opset has.
    """
    mean = probabilities.mean(dim).clamp(_EPS, 1 - _EPS)
    return torch.log(mean) - torch.log1p(-mean)


def flip_tta_logits(forward: Any, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Flip test-time augmentation: the logit of the mean probability of each image and its left-right
    mirror (the one definition training's validation, predict, explain and the app use).

    Args:
        forward: images (B, 3, H, W) -> logits (B,).
        logits: ``forward(x)`` when already computed (e.g. by a Grad-CAM pass).
    """
    z = forward(x) if logits is None else torch.as_tensor(logits, device=x.device)
    flipped = forward(torch.flip(x, dims=[3]))
    return mean_probability_logit(torch.stack([torch.sigmoid(z.float()),
                                               torch.sigmoid(flipped.float().reshape(z.shape))]))


def one_logit(model: nn.Module, x: torch.Tensor, *, amp: torch.dtype | None = None) -> torch.Tensor:
    """A one-logit classifier's logit per image, float32 (B,), without autograd; under autocast to
    ``amp`` when given (the one forward predict, explain, the run's model and their TTA share)."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        return model(x).float().reshape(x.shape[0], -1)[:, 0]
