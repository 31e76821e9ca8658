"""Named training recipes: the fields that augmentation, optimisation and checkpoint choice come from.

``RECIPES`` holds whole recipes by name, so an old default stays one config away and a comparison can
be rerun: ``recipe_config("v1", data="fracatlas", ...)`` is the recipe X-RAI used before grouped CV
chose the present defaults, "v2" (docs/recipe.md has the ablation). Only the recipe's fields are set;
everything else (data, model, epochs, machinery) comes from the caller or TrainConfig's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from xrai.config import TrainConfig
from xrai.runs.layout import RunFolder, read_json

__all__ = ["CPU_BUDGET", "DEFAULT_RECIPE", "QUICK_BUDGET", "RECIPE_FIELDS", "RECIPES", "bench_recipe", "cv_recipe", "recipe_config",
           "recipe_of"]

# The fields a recipe sets: augmentation, optimisation, regularisation, evaluation and checkpoint choice.
RECIPE_FIELDS = (
    "resize", "crop_scale", "aug_strength", "optimizer", "scheduler", "warmup_epochs", "lr", "batch_size",
    "weight_decay", "label_smoothing", "ema_decay", "pos_weighting", "tta", "keep", "patience",
)

DEFAULT_RECIPE = "v2"  # the one TrainConfig's defaults spell out (a test holds them equal)

# X-RAI's first recipe: letterbox, 0.7-1 crops with rotation and jitter, AdamW 1e-3 with a 1-epoch
# warm-up cosine, batch 32, early stopping on validation AUROC and its best checkpoint.
_V1: dict[str, Any] = dict(
    resize="letterbox", crop_scale=0.7, aug_strength=1.0, optimizer="adamw", scheduler="cosine",
    warmup_epochs=1, lr=1e-3, batch_size=32, weight_decay=1e-4, label_smoothing=0.0, ema_decay=0.0,
    pos_weighting=True, tta=False, keep="best", patience=5)

RECIPES: dict[str, dict[str, Any]] = {
    "v1": _V1,
    # v1 with the changes grouped CV picked on fracatlas-dev from scratch (docs/recipe.md): peak lr 2e-3,
    # images stretched to the square rather than letterboxed, flip TTA when scoring.
    "v2": {**_V1, "resize": "stretch", "lr": 2e-3, "tta": True},
}


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


# The budget grouped CV compares recipes at on a CPU (docs/recipe.md): from scratch, 128 px, 12 epochs, 5 folds.
CPU_BUDGET = {"folds": 5, "img_size": 128, "epochs": 12}


def cv_recipe(recipe: str, *, out: str | Path, data: str = "fracatlas", root: str | Path | None = None,
              folds: int = CPU_BUDGET["folds"], img_size: int = CPU_BUDGET["img_size"],
              epochs: int = CPU_BUDGET["epochs"], seed: int = 0, model: str = "mobilenet_v2",
              changes: dict[str, Any] | None = None, variants: bool = False, progress: bool = True) -> dict[str, Any]:
    """Grouped k-fold CV of a named recipe (plus ``changes``) from scratch on the CPU, cached input path.

    A CV already in ``out`` is resumed (or just read back when finished), so a killed search goes on
    where it stopped. The test split is never scored.

    Args:
        recipe: a name in RECIPES.
        out: the CV run folder.
        variants: also score the same fold models with the other flip-TTA setting and the other
            checkpoint (evaluation only).
    Returns:
        {"cv_auroc": {mean, std, min, max, values}, "oof_auroc", "epochs", "train_seconds",
         "recipe": recipe_of(config), "budget", "machine"[, "variants"]}.
    """
    # deliberate: the CLI imports this module at start-up (DEFAULT_RECIPE); data and training load when used
    from xrai.data import load
    from xrai.train.cv import cross_validate, score_folds

    config = recipe_config(recipe, **{**dict(data=data, root=None if root is None else str(root), model=model,
                                             pretrained=False, img_size=img_size, epochs=epochs, seed=seed,
                                             device="cpu", input_path="cached"), **(changes or {})})
    out = Path(out)
    folder = RunFolder(out)
    if folder.is_cv:
        summary = read_json(folder.cv_json)
    else:
        manifest = load(data, root=root, seed=seed, progress=progress)
        summary = cross_validate(config, manifest, out, folds=folds, resume=folder.manifest_csv.is_file(),
                                 progress=progress).summary
    auroc = summary["summary"]["image"]["auroc"]
    figures: dict[str, Any] = {
        "cv_auroc": {k: auroc[k] for k in ("mean", "std", "min", "max", "values")},
        "oof_auroc": summary["oof"]["auroc"], "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
        "cv_wall_seconds": summary["wall_seconds"], "recipe": recipe_of(config),
        "budget": {"folds": folds, "img_size": img_size, "epochs": epochs, "seed": seed, "model": model,
                   "pretrained": False}, "machine": summary["machine"],
    }
    if variants:
        figures["variants"] = {
            "other_tta": score_folds(out, tta=not config.tta, progress=progress),
            "other_checkpoint": score_folds(out, which="last" if config.keep == "best" else "best", progress=progress),
        }
    return figures


# The reduced budget candidates are ranked at before the winner is confirmed at CPU_BUDGET.
QUICK_BUDGET = {"folds": 3, "img_size": 96, "epochs": 8}


def bench_recipe(recipe: str, *, data: str = "fracatlas", root: str | Path | None = None, quick: bool = False,
                 out: str | Path | None = None, seed: int = 0, json_path: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """``python -m xrai bench --recipe``: the recipe's grouped CV AUROC from scratch on the CPU, at
    CPU_BUDGET (or QUICK_BUDGET), with a fixed seed; prints one line, optionally writes the JSON.

    The run folder (default runs/bench_recipe/<recipe>_<folds>f<img>px<epochs>e_seed<seed>) is resumed
    when it exists, and read back when finished, so the figure is measured once and reprinted after.
    """
    budget = QUICK_BUDGET if quick else CPU_BUDGET
    tag = f"{recipe}_{budget['folds']}f{budget['img_size']}px{budget['epochs']}e_seed{seed}"
    out = Path(out) if out is not None else Path("runs") / "bench_recipe" / tag
    # threads that sleep rather than spin while they wait (see tools/recipe_search.py); before any torch op
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    figures = cv_recipe(recipe, out=out, data=data, root=root, seed=seed, progress=progress, **budget)
    figures.update({"recipe_name": recipe, "data": data, "run_dir": str(out)})
    cv, machine = figures["cv_auroc"], figures["machine"]
    print(f"recipe {recipe} on {data}, from scratch, {budget['folds']}-fold grouped CV, {budget['img_size']} px, "
          f"{budget['epochs']} epochs, seed {seed}: CV AUROC {cv['mean']:.4f} +- {cv['std']:.4f} (fold std; per "
          f"fold {', '.join(f'{v:.3f}' for v in cv['values'])}), out-of-fold AUROC {figures['oof_auroc']:.4f}; "
          f"{figures['cv_wall_seconds'] / 60:.1f} min wall on {machine['cpu']} ({machine['torch_threads']} threads)")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
    return figures
