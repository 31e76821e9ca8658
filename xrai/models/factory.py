"""Model registry over torchvision backbones, one-logit heads, Grad-CAM target layers and checkpoint loading.

Every model is an ``XraiClassifier``: a torchvision ``backbone`` whose ImageNet classifier is removed
(it returns pooled features) and a ``head`` that maps them to one logit (1 = abnormal). Pruning lives in
``xrai.models.pruning`` and is re-exported here.
"""

from __future__ import annotations

import difflib
import fnmatch
import http.client
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from xrai.config import HEADS, TrainConfig
from xrai.errors import UserError, first_lines
from xrai.models.checkpoint import CheckpointError, load_checkpoint
from xrai.models.pruning import (
    SynFlowReport,
    count_nonzero,
    fold_pruning,
    prunable_layers,
    prune_synflow,
    restore_pruning,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "DenseNetBackbone",
    "ModelSpec",
    "PretrainedWeightsError",
    "SynFlowReport",
    "XraiClassifier",
    "count_nonzero",
    "create_model",
    "fold_pruning",
    "gradcam_layer",
    "gradcam_layers",
    "list_models",
    "load_model",
    "prunable_layers",
    "prune_synflow",
    "register_model",
    "restore_pruning",
]

DEFAULT_MODEL = "mobilenet_v2"
CONNECT_TIMEOUT_S = 3.0


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for but can be neither found on disk nor downloaded."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One registry entry: the torchvision builder's name, its family and the pinned weights.

    The weights are pinned by name (not ``DEFAULT``) so a torchvision upgrade that moves ``DEFAULT``
    cannot silently change what a run starts from.
    """

    name: str
    family: str  # mobilenet, resnet, densenet or efficientnet: decides the classifier and Grad-CAM layer
    weights: str  # e.g. "MobileNet_V2_Weights.IMAGENET1K_V2"


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, family: str, weights: str) -> ModelSpec:
    """Add a torchvision architecture to the registry (as timm's ``register_model`` does)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if family not in _CLASSIFIER_ATTR:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(_CLASSIFIER_ATTR)}")
    MODELS[name] = spec = ModelSpec(name=name, family=family, weights=weights)
    return spec


# Which attribute holds torchvision's ImageNet classifier, per family.
_CLASSIFIER_ATTR = {"mobilenet": "classifier", "resnet": "fc", "densenet": "classifier", "efficientnet": "classifier"}

for _name, _family, _weights in (
    ("mobilenet_v2", "mobilenet", "MobileNet_V2_Weights.IMAGENET1K_V2"),
    ("mobilenet_v3_large", "mobilenet", "MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
    ("resnet18", "resnet", "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet50", "resnet", "ResNet50_Weights.IMAGENET1K_V2"),
    ("densenet169", "densenet", "DenseNet169_Weights.IMAGENET1K_V1"),  # MURA's published baseline
    ("efficientnet_b0", "efficientnet", "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    ("efficientnet_b1", "efficientnet", "EfficientNet_B1_Weights.IMAGENET1K_V2"),
    ("efficientnet_b2", "efficientnet", "EfficientNet_B2_Weights.IMAGENET1K_V1"),
    ("efficientnet_b3", "efficientnet", "EfficientNet_B3_Weights.IMAGENET1K_V1"),
    ("efficientnet_b4", "efficientnet", "EfficientNet_B4_Weights.IMAGENET1K_V1"),
    ("efficientnet_b5", "efficientnet", "EfficientNet_B5_Weights.IMAGENET1K_V1"),
    ("efficientnet_b6", "efficientnet", "EfficientNet_B6_Weights.IMAGENET1K_V1"),
    ("efficientnet_b7", "efficientnet", "EfficientNet_B7_Weights.IMAGENET1K_V1"),
):
    register_model(_name, family=_family, weights=_weights)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, default model first."""
    return [name for name in MODELS if fnmatch.fnmatchcase(name, pattern)]


class XraiClassifier(nn.Module):
    """A feature backbone and a one-logit head.

    With ``frozen_backbone`` the backbone's parameters do not train and the whole backbone stays in
    eval mode under ``model.train()``: its BatchNorm running statistics must not drift (they are part
    of the frozen feature extractor) and its dropout / stochastic depth, which only make sense for
    layers that learn, stay off.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, frozen_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> XraiClassifier:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DenseNetBackbone(nn.Module):
    """torchvision's DenseNet trunk (``features``, ending in ``norm5``), its final ReLU as an out-of-place
    module, global average pooling: DenseNet.forward without the classifier.

    Why not torchvision's forward: it applies that ReLU functionally *in place* on norm5's output, after
    a forward hook on norm5 has stored it; grad-cam's stored activation is then the post-ReLU tensor on
    a CPU (the same storage) but a pre-ReLU copy on CUDA, so the map depended on the device. Here the
    ReLU is a module whose output nothing modifies, and it is the Grad-CAM layer. The state dict keys
    (``features.*``) are torchvision's, so earlier checkpoints load unchanged.
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.relu(self.features(x))), 1)


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    pretrained: bool = True,
    head: str = "linear",
    freeze: bool = False,
    dropout: float = 0.0,
) -> XraiClassifier:
    """Build a registered backbone with a one-logit head.

    Args:
        name: a name from ``list_models()``.
        pretrained: start from the pinned ImageNet weights (see ``MODELS[name].weights``).
        head: ``"linear"`` (Dropout(dropout) when > 0, then Linear(features, 1)) or ``"mlp"``
            (Linear(features, 256), ReLU, Dropout(0.5), Linear(256, 1)).
        freeze: train the head alone; the backbone is frozen and stays in eval mode.
        dropout: dropout before the linear head.

    Returns:
        The model in train mode, with ``model.xrai_name = name``.

    Raises:
        ValueError: unknown name or head, dropout outside [0, 1).
        PretrainedWeightsError: ``pretrained=True`` and the weights are neither cached nor reachable.
    """
    spec = _spec(name)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    builder = torchvision.models.get_model_builder(spec.name)
    weights = _pretrained_weights(spec) if pretrained else None
    try:
        backbone = builder(weights=weights)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:  # the host answered, the download failed
        raise PretrainedWeightsError(_weights_help(spec, f"downloading them failed ({err})")) from err
    features = _remove_classifier(backbone, spec.family)
    if spec.family == "densenet":
        backbone = DenseNetBackbone(backbone.features)
    if head == "linear":
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        head_module = nn.Sequential(*layers, nn.Linear(features, 1))
    else:
        head_module = nn.Sequential(nn.Linear(features, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, 1))
    model = XraiClassifier(backbone, head_module, frozen_backbone=freeze)
    model.xrai_name = spec.name
    return model


def gradcam_layers(model: nn.Module) -> list[nn.Module]:
    """The Grad-CAM target layers: ``[gradcam_layer(model)]``, or one per member of a fold ensemble
    (grad-cam then averages the members' maps)."""
    members = getattr(model, "members", None)
    return [gradcam_layer(m) for m in members] if members is not None else [gradcam_layer(model)]


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM target layer: the last block of the convolutional feature extractor.

    mobilenet and efficientnet: ``features[-1]`` (the last conv-BN-activation block); resnet:
    ``layer4[-1]``; densenet: ``DenseNetBackbone.relu``, the ReLU after ``norm5``: its output is the
    1664-channel map the head pools (the standard Grad-CAM feature map A), and since nothing modifies it
    in place the map is the same on every device (see DenseNetBackbone).
    """
    backbone = getattr(model, "backbone", model)
    if isinstance(backbone, DenseNetBackbone):
        return backbone.relu
    if hasattr(backbone, "layer4"):
        return backbone.layer4[-1]
    if isinstance(getattr(backbone, "features", None), nn.Sequential):
        return backbone.features[-1]
    name = getattr(model, "xrai_name", type(model).__name__)
    raise ValueError(f"no Grad-CAM layer known for model {name!r}; build it with create_model({', '.join(MODELS)})")


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
    from xrai.models.ensemble import is_cv_run, load_ensemble

    if is_cv_run(path):  # a cross-validation run: its folds' ensemble (xrai.models.ensemble)

        return load_ensemble(path, which=which, device=device)
    if path.suffix in (".pt", ".pth"):
        checkpoint_path, run_dir = path, path.parent.parent
    else:
        checkpoint_path, run_dir = path / "checkpoints" / f"{which}.pt", path
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
        from xrai.env import get_device

        device = get_device("auto")
    return model.to(device).eval(), config


# ---- helpers ---------------------------------------------------------------------------------


def _spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(str(name), MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; choose one of: {', '.join(MODELS)}")


def _remove_classifier(backbone: nn.Module, family: str) -> int:
    """Replace torchvision's ImageNet classifier so the backbone returns pooled features; their count."""
    attr = _CLASSIFIER_ATTR[family]
    classifier = getattr(backbone, attr)
    if isinstance(classifier, nn.Linear):  # resnet.fc, densenet.classifier
        setattr(backbone, attr, nn.Identity())
        return classifier.in_features
    last = classifier[-1]
    if isinstance(backbone, torchvision.models.MobileNetV3):
        # MobileNetV3's classifier starts with a pretrained 960 -> 1280 projection + Hardswish: that is
        # feature extraction, so keep it and drop only its Dropout and the ImageNet layer; our head's
        # dropout governs regularisation for every family alike.
        setattr(backbone, attr, nn.Sequential(classifier[0], classifier[1]))
    else:  # mobilenet_v2, efficientnet: Dropout + Linear
        setattr(backbone, attr, nn.Identity())
    return last.in_features


def _pretrained_weights(spec: ModelSpec) -> torchvision.models.WeightsEnum:
    """The weights enum, after checking that it can be had without hanging on a dead network."""
    weights = torchvision.models.get_weight(spec.weights)
    if _cached_weights_file(weights).is_file():
        return weights  # torch.hub loads a cached file without touching the network
    if not _can_reach(weights.url, timeout=CONNECT_TIMEOUT_S):
        host = urllib.parse.urlsplit(weights.url).hostname
        raise PretrainedWeightsError(_weights_help(spec, f"{host} is unreachable (no network?)"))
    return weights


def _cached_weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch.hub keeps (and first looks for) a weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(weights.url).path).name


def _weights_help(spec: ModelSpec, reason: str) -> str:
    weights = torchvision.models.get_weight(spec.weights)
    file = _cached_weights_file(weights)
    return (
        f"cannot get the pretrained weights {spec.weights} for {spec.name}: {reason}. Either build "
        f"without them (create_model({spec.name!r}, pretrained=False), or --no-pretrained on the command "
        f"line), or turn the network on (Kaggle: Settings > Internet on), or download {weights.url} "
        f"elsewhere and put the file {file.name} in {file.parent} (torch.hub.get_dir()/checkpoints; "
        f"TORCH_HOME moves it)."
    )


def _can_reach(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a HEAD request for the URL gets any HTTP answer within ``timeout`` seconds.

    It goes through urllib as torch.hub's download does, so proxies, TLS interception and captive
    networks count the same way for both. It runs in a daemon thread because name resolution ignores
    socket timeouts and can hang for long on a machine with no network.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server answered: the download will report what it says
            result.append(True)
        except (OSError, http.client.HTTPException, ValueError):  # no DNS, refused, timed out, TLS failed
            result.append(False)

    thread = threading.Thread(target=probe, name="xrai-weights-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the key prefixes torch.compile (``_orig_mod.``) and DataParallel (``module.``) add."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
