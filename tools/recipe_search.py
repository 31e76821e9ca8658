"""Rank training-recipe changes by grouped k-fold CV on a real set, one change at a time, and log each
result the moment it is done (docs/recipe.md holds the outcome).

    nice -n 15 python tools/recipe_search.py --root ../shared/data/fracatlas-dev --out runs/recipe_search \\
        --folds 3 --img-size 96 --epochs 8 --candidates v1,onecycle,lr2e-3

Every candidate is the base recipe (``--base``, default v1: the recipe before this search) with one
change, or a combination ("a+b" applies both); all run the same folds (same seed) from scratch on the
CPU. Each finished candidate appends one JSON line to OUT/results.jsonl (CV AUROC mean and std over
folds, per-fold values, the OOF AUROC, wall time) and is skipped when the script runs again, so a
killed search loses at most the candidate it was on. Besides the recipe as configured, every
candidate is also scored with the other flip-TTA setting (evaluation only, same weights), so TTA is
measured on every recipe at no training cost. The test split is never scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# One change each against the base recipe (TrainConfig fields); "a+b" combines them.
CHANGES: dict[str, dict] = {
    "v1": {},
    "base": {},  # the base recipe unchanged (with --base v2: v2 itself)
    "last": {"keep": "last", "patience": 0},
    "onecycle": {"scheduler": "onecycle"},
    "lr2e-3": {"lr": 2e-3},
    "lr4e-3": {"lr": 4e-3},
    "bs64": {"batch_size": 64},
    "wd0.05": {"weight_decay": 0.05},
    "ls0.1": {"label_smoothing": 0.1},
    "ema0.99": {"ema_decay": 0.99},
    "nopw": {"pos_weighting": False},
    "stretch": {"resize": "stretch"},
    "crop0.35": {"crop_scale": 0.35},
    "crop0.08": {"crop_scale": 0.08},
    "aug0": {"aug_strength": 0.0},
    "aug2": {"aug_strength": 2.0},
    "tta": {"tta": True},
    # fine-tuning ImageNet weights (--pretrained): lower peak rates, the backbone frozen throughout
    "lr3e-4": {"lr": 3e-4},
    "lr1e-3": {"lr": 1e-3},
    "freeze": {"freeze": True},
    "fe1": {"freeze_epochs": 1},  # the head warms up alone for an epoch, then the whole network trains
    "ld0.7": {"layer_decay": 0.7},
}


def candidate_changes(name: str) -> dict:
    """The TrainConfig changes of a candidate name: one of CHANGES or several joined by '+'."""
    changes: dict = {}
    for part in name.split("+"):
        if part not in CHANGES:
            raise ValueError(f"unknown candidate {part!r}; choose from: {', '.join(CHANGES)} (join with '+')")
        changes.update(CHANGES[part])
    return changes


def read_results(log: Path) -> list[dict]:
    """The logged results, in the order they finished."""
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def markdown_table(results: list[dict], base: str) -> str:
    """The ablation table of docs/recipe.md: CV AUROC (mean +- std over folds), the paired change against
    ``base`` on the same folds, and the evaluation-only variants (the other TTA setting, the other checkpoint)."""
    by_name = {r["name"]: r for r in results}
    ref = np.array(by_name[base]["cv_auroc"]["values"]) if base in by_name else None
    lines = ["| candidate | change | CV AUROC (mean +- std over folds) | per fold | paired change vs "
             f"{base} (mean +- std) | same weights, other TTA | same weights, other checkpoint | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        values = np.array(r["cv_auroc"]["values"])
        if ref is not None and len(ref) == len(values):
            delta = values - ref
            paired = f"{delta.mean():+.4f} +- {delta.std(ddof=1):.4f}"
        else:
            paired = "n/a"
        v = r.get("variants", {})

        def other(key: str, v: dict = v) -> str:
            return f"{v[key]['mean']:.4f} +- {v[key]['std']:.4f}" if key in v else "n/a"

        change = ", ".join(f"{k}={val}" for k, val in r["changes"].items()) or "(base)"
        lines.append(f"| {r['name']} | {change} | {values.mean():.4f} +- {values.std(ddof=1):.4f} | "
                     f"{', '.join(f'{x:.3f}' for x in values)} | {paired} | {other('other_tta')} | "
                     f"{other('other_checkpoint')} | {r['wall_seconds'] / 60:.0f} min |")
    return "\n".join(lines)


def done_names(log: Path) -> set[str]:
    if not log.is_file():
        return set()
    return {json.loads(line)["name"] for line in log.read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fracatlas")
    parser.add_argument("--root", default=None, help="the dataset folder (e.g. ../shared/data/fracatlas-dev)")
    parser.add_argument("--out", required=True, help="folder for the candidates' CV runs and results.jsonl")
    parser.add_argument("--candidates", default="", help="comma-separated names (see CHANGES); a+b combines")
    parser.add_argument("--table", action="store_true", help="print the markdown table of OUT/results.jsonl and stop")
    parser.add_argument("--base", default="v1", help="the recipe every change is made to (xrai.recipe.RECIPES)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--pretrained", action="store_true", help="start from the model's ImageNet weights")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--tag", default="", help="appended to every result's name (e.g. the budget)")
    args = parser.parse_args(argv)
    # Before torch loads OpenMP: threads that sleep rather than spin while they wait. On a shared machine
    # a niced process's spinning threads burn their share waiting for a descheduled partner: one
    # MobileNetV2 step at 96 px took 24 s with the default policy and 0.6 s with PASSIVE here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from xrai.bench.recipe import cv_recipe

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log = out / "results.jsonl"
    if args.table:
        print(markdown_table(read_results(log), args.base + args.tag))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    for name in names:
        candidate_changes(name)  # fail on a typo before hours of training, not after
    for name in names:
        label = name + args.tag
        if label in done_names(log):
            print(f"{label}: already in {log}, skipped", flush=True)
            continue
        start = time.perf_counter()
        result = cv_recipe(args.base, data=args.data, root=args.root, out=out / label, folds=args.folds,
                           img_size=args.img_size, epochs=args.epochs, seed=args.seed, model=args.model,
                           pretrained=args.pretrained, changes=candidate_changes(name), variants=True, progress=False)
        result.update({"name": label, "changes": candidate_changes(name), "base": args.base,
                       "wall_seconds": time.perf_counter() - start})
        with open(log, "a") as f:
            f.write(json.dumps(result) + "\n")
        cv = result["cv_auroc"]
        print(f"{label}: CV AUROC {cv['mean']:.4f} +- {cv['std']:.4f} (per fold "
              f"{', '.join(f'{v:.3f}' for v in cv['values'])}); other TTA {result['variants']['other_tta']['mean']:.4f}; "
              f"{result['wall_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
