"""SynFlow pruning at initialisation (Tanaka et al., 2020), with masks kept by torch.nn.utils.prune.

"Pruning neural networks without any data by iteratively conserving synaptic flow", NeurIPS 2020.
The score of a weight is |θ ⊙ ∂R/∂θ| where R is the sum of the output of the *linearised* network
(every parameter replaced by its absolute value, all-ones input). Pruning is iterative with an
exponential schedule and ranks all prunable weights globally. Nothing here knows about datasets.
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torchvision.ops.misc import SqueezeExcitation
from tqdm.auto import tqdm

__all__ = ["SynFlowReport", "count_nonzero", "fold_pruning", "parameter_count", "prunable_layers", "prune_synflow",
           "restore_pruning"]

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Activations that are the identity (or close to it) on the positive values the linearised network
# carries. SynFlow's theory assumes positively homogeneous activations (ReLU); on an all-positive
# network ReLU is the identity, so that is what the linearised network uses. Replacing them matters
# for the clamping ones: ReLU6 saturates at 6 on these huge positive activations and would stop every
# gradient (mobilenet_v2 would score all its weights zero). Gates (Sigmoid, Hardsigmoid) are kept.
_IDENTITY_ON_POSITIVES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.ELU)


@dataclass(kw_only=True)
class SynFlowReport:
    """What prune_synflow did. ``str()`` is the one-line summary."""

    remaining: int  # nonzero prunable weights after pruning
    total: int  # prunable weights
    sparsity: float  # the sparsity asked for
    iterations: int
    seconds: float
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (kept, total)

    @property
    def density(self) -> float:
        return self.remaining / self.total

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def empty_layers(self) -> list[str]:
        """Layers left with no weight at all."""
        return [name for name, (kept, _) in self.layers.items() if kept == 0]

    def min_layer(self) -> tuple[str, float]:
        """The layer that keeps the smallest fraction of its weights, and that fraction."""
        name, (kept, total) = min(self.layers.items(), key=lambda item: item[1][0] / item[1][1])
        return name, kept / total

    def __str__(self) -> str:
        return f"remaining parameters: {self.remaining} of {self.total} ({100 * self.density:.2f}%)"


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose ``weight`` SynFlow ranks (biases and BatchNorm are not pruned).

    Squeeze-and-excitation layers are left out: their output goes through a sigmoid gate that
    saturates at 1 in the linearised network, so their synaptic flow is exactly zero (measured: all
    of efficientnet_b0's and mobilenet_v3_large's SE weights score 0) and a global ranking would
    delete every gate first, disabling squeeze-and-excitation. SynFlow cannot rank them, so they stay
    dense and do not count towards the sparsity.
    """
    gated = {id(m) for se in model.modules() if isinstance(se, SqueezeExcitation) for m in se.modules()}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES) and id(module) not in gated
    ]


def _effective_weight(module: nn.Module) -> torch.Tensor:
    # `module.weight` of a pruned module is only refreshed by its forward pre-hook, so after an
    # optimiser step it is stale until the next forward; orig * mask is always current.
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig * module.weight_mask
    return module.weight


@torch.no_grad()
def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """(nonzero, total) over the prunable weights (entries, not tensors)."""
    nonzero = total = 0
    for _, module in prunable_layers(model):
        weight = _effective_weight(module)
        nonzero += int(torch.count_nonzero(weight))
        total += weight.numel()
    return nonzero, total


@torch.no_grad()
def parameter_count(model: nn.Module) -> dict[str, int]:
    """The model's parameters, all of them and those not zero, for "before and after pruning".

    A pruned weight counts as ``weight_orig * weight_mask`` (what the model computes with), so its masked
    entries are zeros; its mask (a buffer) is not a parameter.

    Returns:
        {"total", "nonzero"} over every parameter (entries), and {"prunable", "prunable_nonzero"}: the
        conv and linear weights SynFlow ranks (``count_nonzero``).
    """
    total = nonzero = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            value = _effective_weight(module) if name == "weight_orig" and hasattr(module, "weight_mask") else param
            total += value.numel()
            nonzero += int(torch.count_nonzero(value))
    prunable_nonzero, prunable = count_nonzero(model)
    return {"total": total, "nonzero": nonzero, "prunable": prunable, "prunable_nonzero": prunable_nonzero}


def prune_synflow(
    model: nn.Module,
    *,
    sparsity: float = 0.95,
    iterations: int = 100,
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    progress: bool = True,
) -> SynFlowReport:
    """Prune ``model`` in place at initialisation with iterative SynFlow; no data needed.

    At step k of ``iterations`` the weights keeping the top (1 - sparsity)^(k / iterations) fraction of
    scores survive, so the last step reaches ``sparsity`` exactly. Masks go on through
    ``torch.nn.utils.prune.custom_from_mask`` and stay applied through training. The model's weights,
    signs and train/eval mode are left as they were: scoring runs on a float64 copy.

    Args:
        model: any module with conv / linear layers; already-pruned layers keep their masks.
        sparsity: fraction of the prunable weights to remove, in (0, 1).
        iterations: pruning rounds (the paper uses 100).
        input_shape: shape of the all-ones input, batch of one.
        progress: show a progress bar.

    Raises:
        ValueError: sparsity or iterations out of range, or no prunable layer.
        FloatingPointError: the linearised output overflowed even in float64.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    layers = prunable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no conv or linear layer to prune")
    start = time.perf_counter()
    device = next(model.parameters()).device

    linear = _linearised_copy(model)
    modules = dict(linear.named_modules())
    weights = [modules[name].weight for name, _ in layers]
    ones = torch.ones(input_shape, dtype=torch.float64, device=device)
    flat_mask = _initial_mask(layers, weights, device)
    sizes = [w.numel() for w in weights]
    _synflow_rounds(linear, weights, flat_mask, ones, sparsity=sparsity, iterations=iterations, progress=progress)
    masks = [m.view_as(w) for m, w in zip(torch.split(flat_mask, sizes), weights)]
    _check_connected(linear, weights, masks, ones, sparsity)

    report_layers = _apply_masks(layers, masks)
    remaining, counted = count_nonzero(model)
    report = SynFlowReport(remaining=remaining, total=counted, sparsity=sparsity, iterations=iterations,
                           seconds=time.perf_counter() - start, layers=report_layers)
    if report.empty_layers:
        _warn_empty(report)
    return report


def _apply_masks(layers: list[tuple[str, nn.Module]], masks: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Put each mask on its layer (``prune.custom_from_mask``); name -> (kept, total) per layer."""
    report_layers = {}
    for (name, module), mask in zip(layers, masks):
        prune.custom_from_mask(module, "weight", mask.to(device=module.weight.device, dtype=module.weight.dtype))
        report_layers[name] = (int(mask.sum().item()), mask.numel())
    return report_layers


def _warn_empty(report: SynFlowReport) -> None:
    """Warn (naming prune_synflow's caller) about the layers pruning emptied.

    Seen on ResNet's 1x1 downsample shortcuts: a parallel branch that carries little flow beside the
    main path can be emptied; the network stays connected (prune_synflow checked it)."""
    warnings.warn(
        f"SynFlow at sparsity {report.sparsity} emptied {len(report.empty_layers)} layer(s) on parallel "
        f"paths: {', '.join(report.empty_layers)}; the input still reaches the output",
        stacklevel=3,
    )


def _initial_mask(layers: list[tuple[str, nn.Module]], weights: list[torch.Tensor],
                  device: torch.device) -> torch.Tensor:
    """The flat float64 mask of every prunable weight: an already-pruned layer's mask, ones elsewhere."""
    return torch.cat(
        [
            (module.weight_mask.detach().flatten().to(device) > 0).double()
            if hasattr(module, "weight_mask")
            else torch.ones(weight.numel(), dtype=torch.float64, device=device)
            for (_, module), weight in zip(layers, weights)
        ]
    )


def _synflow_rounds(linear: nn.Module, weights: list[torch.Tensor], flat_mask: torch.Tensor, ones: torch.Tensor,
                    *, sparsity: float, iterations: int, progress: bool) -> None:
    """The iterative schedule: each round scores the surviving weights and zeroes the lowest in ``flat_mask``."""
    sizes = [w.numel() for w in weights]
    total = sum(sizes)
    # Flat positions of the surviving weights: selecting among them alone, and removing only the
    # lowest, is several times cheaper than re-ranking every weight at every step.
    alive = torch.nonzero(flat_mask, as_tuple=True)[0]
    for step in tqdm(range(1, iterations + 1), desc="SynFlow", disable=not progress, leave=False):
        keep = round(total * (1.0 - sparsity) ** (step / iterations))
        n_remove = alive.numel() - keep
        if n_remove <= 0:
            continue
        _apply(weights, torch.split(flat_mask, sizes))
        flow = linear(ones).sum()
        if not torch.isfinite(flow):
            raise FloatingPointError(
                f"SynFlow's linearised output is {flow.item()} even in float64; try a smaller input_shape"
            )
        grads = torch.autograd.grad(flow, weights)
        with torch.no_grad():
            flat_grad = torch.cat([g.flatten() for g in grads])
            flat_weight = torch.cat([w.flatten() for w in weights])
            scores = (flat_grad[alive] * flat_weight[alive]).abs()
            lowest = torch.topk(scores, n_remove, largest=False, sorted=False).indices
            flat_mask[alive[lowest]] = 0.0
            survivors = torch.ones_like(alive, dtype=torch.bool)
            survivors[lowest] = False
            alive = alive[survivors]


@torch.no_grad()
def _apply(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    for weight, mask in zip(weights, masks):
        weight.mul_(mask.view_as(weight))


def _check_connected(
    linear: nn.Module, weights: list[torch.Tensor], masks: list[torch.Tensor], ones: torch.Tensor, sparsity: float
) -> None:
    """Raise before touching the model when the masks cut every path from the input to the output."""
    _apply(weights, masks)
    probe = ones.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(linear(probe).sum(), probe)
    if not bool((grad != 0).any()):
        raise RuntimeError(
            f"SynFlow at sparsity {sparsity} would disconnect the input from the output (layer collapse); "
            f"the model was left unpruned. Ask for a lower sparsity or more iterations."
        )


@torch.no_grad()
def _linearised_copy(model: nn.Module) -> nn.Module:
    """A float64 copy in eval mode with |every parameter and buffer| and identity activations.

    As the reference implementation (ganguli-lab/Synaptic-Flow: prune.py calls ``model.eval()`` before
    the pruning loop and ``SynFlow.score`` takes ``abs_()`` of every ``state_dict()`` entry), BatchNorm
    runs in eval mode on its (absolute) running statistics, i.e. as a fixed positive per-channel affine
    map, and dropout / stochastic depth are off. float64 because the flow through 50+ blocks of
    positive weights reaches 1e100-1e145 (efficientnet_b7, densenet169 at 224 px) and would overflow
    float32; the reference's float32 was enough for its VGG / ResNet.
    """
    # A pruned module's `weight` is orig * mask, a non-leaf tensor that deepcopy refuses; hand deepcopy
    # detached stand-ins instead (prune.remove below recomputes the weight from orig and mask anyway).
    memo = {
        id(module.weight): module.weight.detach().clone()
        for module in model.modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and not module.weight.is_leaf
    }
    linear = copy.deepcopy(model, memo)
    for module in linear.modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")  # the copy needs a plain weight to overwrite
    for module in list(linear.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _IDENTITY_ON_POSITIVES):
                setattr(module, child_name, nn.Identity())
    linear.double().eval()
    for tensor in itertools.chain(linear.parameters(), linear.buffers()):
        if tensor.is_floating_point():
            tensor.abs_()
    linear.requires_grad_(False)
    for _, module in prunable_layers(linear):
        module.weight.requires_grad_(True)
    return linear


def fold_pruning(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace ``x_orig`` and ``x_mask`` pairs of a pruned state dict by ``x = x_orig * x_mask``."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in state_dict:
            out[base] = state_dict[key] * state_dict[base + "_mask"].to(state_dict[key].dtype)
            del out[key], out[base + "_mask"]
    return out


def restore_pruning(model: nn.Module, state_dict: dict[str, Any]) -> int:
    """Re-apply the masks found in a pruned state dict so it loads strictly (e.g. when resuming).

    Returns:
        How many tensors were reparametrised.
    """
    modules = dict(model.named_modules())
    restored = 0
    for key, mask in state_dict.items():
        if not key.endswith("_mask"):
            continue
        module_name, _, tensor_name = key[: -len("_mask")].rpartition(".")
        module = modules.get(module_name)
        if module is None or hasattr(module, tensor_name + "_mask"):
            continue
        weight = getattr(module, tensor_name)
        prune.custom_from_mask(module, tensor_name, mask.to(device=weight.device, dtype=weight.dtype))
        restored += 1
    return restored
