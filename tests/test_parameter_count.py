"""parameter_count: the model's parameters before and after SynFlow pruning (notebook 03's knob, issue 22)."""

from __future__ import annotations

import pytest
import torch

import xrai.models
from xrai.models import create_model, parameter_count
from xrai.models.pruning import count_nonzero, prune_synflow

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parameter_count_before_and_after_pruning():
    assert xrai.models.parameter_count is parameter_count
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pretrained=False)
    before = parameter_count(model)
    assert before["total"] == sum(p.numel() for p in model.parameters())
    assert before["nonzero"] == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert (before["prunable_nonzero"], before["prunable"]) == count_nonzero(model)
    report = prune_synflow(model, sparsity=0.5, iterations=2, input_shape=(1, 3, 32, 32), progress=False)
    after = parameter_count(model)
    assert after["total"] == before["total"]  # the masks are buffers, the weights stay parameters
    assert after["prunable_nonzero"] == report.remaining and after["prunable"] == report.total
    removed = before["prunable_nonzero"] - after["prunable_nonzero"]
    assert removed > 0.4 * before["prunable"] and after["nonzero"] == before["nonzero"] - removed
