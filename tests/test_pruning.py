"""SynFlow pruning at initialisation: sparsity, schedule, masks through training, report and counting."""

from __future__ import annotations

import re

import pytest
import torch
from _checks import strict_warnings
from torch import nn
from torch.nn.utils import prune

from xrai.models.factory import create_model
from xrai.models.pruning import (
    SynFlowReport,
    count_nonzero,
    prunable_layers,
    prune_synflow,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pruned_mobilenet():
    """mobilenet_v2 pruned to 95% with the paper's 100 iterations at 64 px, and its weights before."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pretrained=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with strict_warnings():  # no layer may be emptied
        report = prune_synflow(model, sparsity=0.95, iterations=100, input_shape=(1, 3, 64, 64), progress=False)
    return model, report, before


def test_reaches_the_asked_sparsity(pruned_mobilenet):
    model, report, _ = pruned_mobilenet
    nonzero, total = count_nonzero(model)
    assert (report.remaining, report.total) == (nonzero, total)
    assert total == sum(m.weight.numel() for _, m in prunable_layers(model))
    assert abs((1 - nonzero / total) - 0.95) <= 0.005
    assert abs(report.achieved_sparsity - 0.95) <= 0.005


def test_every_layer_keeps_weights(pruned_mobilenet, record_property):
    _, report, _ = pruned_mobilenet
    name, density = report.min_layer()
    record_property("min_layer", f"{name}: {density:.4%}")
    print(f"\nSynFlow mobilenet_v2 95%: per-layer minimum density {density:.4%} ({name})")
    assert not report.empty_layers
    assert density > 0.001, f"{name} keeps only {density:.4%} of its weights"
    head = report.layers["head.0"]
    assert head[0] > 0


def test_report_text(pruned_mobilenet):
    _, report, _ = pruned_mobilenet
    text = str(report)
    match = re.fullmatch(r"remaining parameters: (\d+) of (\d+) \((\d+\.\d+)%\)", text)
    assert match, text
    assert int(match[1]) == report.remaining and int(match[2]) == report.total
    assert float(match[3]) == pytest.approx(100 * report.remaining / report.total, abs=0.01)


def test_original_values_signs_and_mode_are_kept(pruned_mobilenet):
    model, _, before = pruned_mobilenet
    assert model.training
    state = model.state_dict()
    for name, module in prunable_layers(model):
        assert torch.equal(state[f"{name}.weight_orig"], before[f"{name}.weight"])  # signs restored
        mask = state[f"{name}.weight_mask"]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(module.weight, before[f"{name}.weight"] * mask)
    for key, value in before.items():  # biases, BatchNorm parameters and running statistics untouched
        if key in state:
            assert torch.equal(state[key], value), key


def test_masked_weights_stay_zero_through_training():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pretrained=False)
    report = prune_synflow(model, sparsity=0.8, iterations=20, input_shape=(1, 3, 32, 32), progress=False)
    assert abs(report.achieved_sparsity - 0.8) <= 0.005
    masks = {name: module.weight_mask.clone() for name, module in prunable_layers(model)}
    origs = {name: module.weight_orig.detach().clone() for name, module in prunable_layers(model)}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 1)).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model(torch.randn(2, 3, 32, 32))  # refresh each module's `weight` from weight_orig * weight_mask

    changed = False
    for name, module in prunable_layers(model):
        assert torch.equal(module.weight_mask, masks[name])
        assert (module.weight[masks[name] == 0] == 0).all(), name
        changed |= not torch.equal(module.weight_orig.detach(), origs[name])
    assert changed  # it did train
    assert count_nonzero(model) == (report.remaining, report.total)


def test_squeeze_excitation_layers_stay_dense():
    from torchvision.ops.misc import SqueezeExcitation

    torch.manual_seed(0)
    model = create_model("efficientnet_b0", pretrained=False)
    se_blocks = [se for se in model.modules() if isinstance(se, SqueezeExcitation)]
    se_convs = [m for se in se_blocks for m in se.modules() if isinstance(m, nn.Conv2d)]
    assert se_convs and not {id(m) for m in se_convs} & {id(m) for _, m in prunable_layers(model)}
    report = prune_synflow(model, sparsity=0.9, iterations=3, input_shape=(1, 3, 32, 32), progress=False)
    assert abs(report.achieved_sparsity - 0.9) <= 0.005
    assert all(not prune.is_pruned(m) and bool((m.weight != 0).all()) for m in se_convs)


def test_count_nonzero_counts_entries_not_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    total = 4 * 3 * 3 * 3 + 4 * 6 * 6  # conv and linear weights only: no biases, no BatchNorm
    assert count_nonzero(model) == (total, total)
    with torch.no_grad():
        model[0].weight[0].zero_()  # 27 entries of one tensor
    assert count_nonzero(model) == (total - 27, total)
    mask = torch.ones_like(model[4].weight)
    mask[0, :10] = 0
    prune.custom_from_mask(model[4], "weight", mask)
    assert count_nonzero(model) == (total - 37, total)


def test_iterating_avoids_the_layer_collapse_of_one_shot_pruning():
    """The paper's point: one-shot SynFlow at high sparsity cuts the network; the iterative one does not."""

    def pruned(iterations: int) -> nn.Module:
        torch.manual_seed(0)
        model = create_model("mobilenet_v2", pretrained=False)
        prune_synflow(model, sparsity=0.9, iterations=iterations, input_shape=(1, 3, 32, 32), progress=False)
        return model

    with pytest.raises(RuntimeError, match="disconnect"):
        pruned(1)
    first, second = pruned(10), pruned(10)
    for (_, a), (_, b) in zip(prunable_layers(first), prunable_layers(second)):
        assert torch.equal(a.weight_mask, b.weight_mask)  # deterministic
        assert a.weight_mask.sum() > 0


def test_a_disconnected_network_is_refused_and_left_unpruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    prune.custom_from_mask(model[2], "weight", torch.zeros_like(model[2].weight))  # cut the middle layer
    with pytest.raises(RuntimeError, match="disconnect"):
        prune_synflow(model, sparsity=0.5, iterations=2, input_shape=(1, 3, 8, 8), progress=False)
    assert not prune.is_pruned(model[0]) and not prune.is_pruned(model[4])


@pytest.mark.parametrize(("keyword", "value"), [("sparsity", 0.0), ("sparsity", 1.0), ("iterations", 0)])
def test_bad_arguments(keyword, value):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    with pytest.raises(ValueError, match=keyword):
        prune_synflow(model, **{keyword: value}, input_shape=(1, 3, 2, 2), progress=False)


def test_report_helpers():
    layers = {"a": (5, 10), "b": (0, 10)}
    report = SynFlowReport(remaining=5, total=20, sparsity=0.75, iterations=1, seconds=0.0, layers=layers)
    assert str(report) == "remaining parameters: 5 of 20 (25.00%)"
    assert report.achieved_sparsity == 0.75 and report.empty_layers == ["b"] and report.min_layer() == ("b", 0.0)
