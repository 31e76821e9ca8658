"""The model registry: each name's torchvision builder, family and pinned ImageNet weights (as timm's
``_registry``); ``create_model`` (xrai.models.factory) builds from it."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

__all__ = ["CLASSIFIER_ATTR", "DEFAULT_MODEL", "MODELS", "ModelSpec", "list_models", "model_spec", "register_model"]

DEFAULT_MODEL = "mobilenet_v2"


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
    if family not in CLASSIFIER_ATTR:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(CLASSIFIER_ATTR)}")
    MODELS[name] = spec = ModelSpec(name=name, family=family, weights=weights)
    return spec


# Which attribute holds torchvision's ImageNet classifier, per family.
CLASSIFIER_ATTR = {"mobilenet": "classifier", "resnet": "fc", "densenet": "classifier", "efficientnet": "classifier"}


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


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name fails with the list of known ones."""
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(str(name), MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; choose one of: {', '.join(MODELS)}")
