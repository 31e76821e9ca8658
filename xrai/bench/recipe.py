"""A recipe's grouped-CV AUROC on a real set on the CPU (``python -m xrai bench --recipe``,
tools/recipe_search.py): how docs/recipe.md's tables are measured. The recipes themselves are
``xrai.recipe``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xrai.data import load
from xrai.recipe import recipe_config, recipe_of
from xrai.runs.layout import RunFolder, read_json
from xrai.train.cv import cross_validate, score_folds

__all__ = ["CPU_BUDGET", "QUICK_BUDGET", "bench_recipe", "cv_recipe"]

# The budget grouped CV compares recipes at on a CPU (docs/recipe.md): from scratch, 128 px, 12 epochs, 5 folds.
CPU_BUDGET = {"folds": 5, "img_size": 128, "epochs": 12}


def cv_recipe(recipe: str, *, out: str | Path, data: str = "fracatlas", root: str | Path | None = None,
              folds: int = CPU_BUDGET["folds"], img_size: int = CPU_BUDGET["img_size"],
              epochs: int = CPU_BUDGET["epochs"], seed: int = 0, model: str = "mobilenet_v2",
              pretrained: bool = False, changes: dict[str, Any] | None = None, variants: bool = False, progress: bool = True) -> dict[str, Any]:
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
    config = recipe_config(recipe, **{**dict(data=data, root=None if root is None else str(root), model=model,
                                             pretrained=pretrained, img_size=img_size, epochs=epochs, seed=seed,
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
                   "pretrained": pretrained}, "machine": summary["machine"],
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
