"""Named training recipes: the fields that augmentation, optimisation and checkpoint choice come from.

``RECIPES`` holds whole recipes by name, so an old default stays one config away and a comparison can
be rerun: ``recipe_config("v1", data="fracatlas", ...)`` is the recipe X-RAI used before grouped CV
chose the present defaults, "v2" (docs/recipe.md has the ablation). Only the recipe's fields are set;
everything else (data, model, epochs, machinery) comes from the caller or TrainConfig's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xrai.config import TrainConfig

__all__ = ["DEFAULT_RECIPE", "PRETRAINED_RECIPE", "RECIPE_FIELDS", "RECIPES", "WHY", "default_recipe", "describe_recipe",
           "recipe_config", "recipe_name", "recipe_of"]

# The fields a recipe sets: augmentation, optimisation, regularisation, evaluation and checkpoint choice.
RECIPE_FIELDS = (
    "resize", "crop_scale", "aug_strength", "optimizer", "scheduler", "warmup_epochs", "lr", "batch_size",
    "weight_decay", "label_smoothing", "ema_decay", "pos_weighting", "tta", "keep", "patience", "freeze",
    "freeze_epochs", "layer_decay",
)

DEFAULT_RECIPE = "v2"  # the one TrainConfig's defaults spell out (a test holds them equal): from scratch
PRETRAINED_RECIPE = "ft1"  # the default of runs that start from ImageNet weights (docs/recipe.md, "Fine-tuning")

# X-RAI's first recipe: letterbox, 0.7-1 crops with rotation and jitter, AdamW 1e-3 with a 1-epoch
# warm-up cosine, batch 32, early stopping on validation AUROC and its best checkpoint.
_V1: dict[str, Any] = dict(
    resize="letterbox", crop_scale=0.7, aug_strength=1.0, optimizer="adamw", scheduler="cosine",
    warmup_epochs=1, lr=1e-3, batch_size=32, weight_decay=1e-4, label_smoothing=0.0, ema_decay=0.0,
    pos_weighting=True, tta=False, keep="best", patience=5, freeze=False, freeze_epochs=0, layer_decay=1.0)

RECIPES: dict[str, dict[str, Any]] = {
    "v1": _V1,
    # v1 with the changes grouped CV picked on fracatlas-dev from scratch (docs/recipe.md): peak lr 2e-3,
    # images stretched to the square rather than letterboxed, flip TTA when scoring.
    "v2": {**_V1, "resize": "stretch", "lr": 2e-3, "tta": True},
    # v2 with the change grouped CV picked on fracatlas-dev fine-tuning EfficientNet-Lite0's ImageNet weights
    # (docs/recipe.md, "Fine-tuning"): a peak lr of 3e-4, not 2e-3, which washes out what the weights know
    "ft1": {**_V1, "resize": "stretch", "lr": 3e-4, "tta": True},
}


# Why each default is what it is, for the CLI, the notebooks and the model card.
WHY = {
    "v2": "chosen by grouped CV on fracatlas-dev from scratch (docs/recipe.md); the default without ImageNet weights",
    "ft1": "chosen by grouped CV on fracatlas-dev fine-tuning ImageNet weights (docs/recipe.md, Fine-tuning); "
           "the default with them",
    "v1": "X-RAI's first recipe, kept for comparison",
}


def default_recipe(pretrained: bool) -> str:
    """The recipe a run gets when none is named: ``ft1`` when it starts from ImageNet weights, else ``v2``."""
    return PRETRAINED_RECIPE if pretrained else DEFAULT_RECIPE


def recipe_name(config: TrainConfig | dict[str, Any]) -> str | None:
    """The named recipe whose fields a config (or a config.json's dict) holds exactly; None for a custom one."""
    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config)
    defaults = dataclasses.asdict(TrainConfig())
    mine = {k: values.get(k, defaults[k]) for k in RECIPE_FIELDS}
    for name in (default_recipe(bool(values.get("pretrained"))), *RECIPES):
        if mine == {k: RECIPES[name].get(k, defaults[k]) for k in RECIPE_FIELDS}:
            return name
    return None


def describe_recipe(config: TrainConfig | dict[str, Any]) -> str:
    """One line: which recipe a run used and why ("recipe ft1: chosen by ..."), or that it is custom."""
    name = recipe_name(config)
    if name is None:
        return "a custom recipe (its fields differ from every named one: see config.json)"
    return f"recipe {name}: {WHY.get(name, 'a named recipe')}"


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig with a named recipe's fields, then ``overrides`` (data, epochs, ... or recipe fields).

    Raises:
        ValueError: unknown recipe name (the message lists them).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides})


def recipe_of(config: TrainConfig) -> dict[str, Any]:
    """The recipe fields of a config, as a dict (for reports and for comparing runs)."""
    values = dataclasses.asdict(config)
    return {name: values[name] for name in RECIPE_FIELDS}
