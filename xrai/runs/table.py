"""Runs side by side: the folder a setting trains into (``run_dir_for``) and one table of the runs under a
folder (``runs_table``), read from each run's files (config.json, history.csv, the reports). Reads only;
no torch.

A new setting (dataset, body part, model) gets a new folder, so a notebook that changes ``MODEL`` starts a
new run and one that reruns the same setting resumes it; ``runs_table`` then compares them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from xrai.config import TrainConfig
from xrai.labels import SOURCES
from xrai.recipe import RECIPES
from xrai.runs.layout import RunFolder

__all__ = ["RUNS_TABLE_COLUMNS", "run_dir_for", "runs_table"]

RUNS_TABLE_COLUMNS = ("run", "cv", "dataset", "body_part", "model", "pretrained", "recipe", "epochs",
                      "valid_auroc", "test_auroc", "valid_kappa", "test_kappa")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def run_dir_for(dataset: str, body_part: str | None = None, model: str = "mobilenet_v2", *,
                base: str = "runs") -> str:
    """The run folder of a setting: ``<base>/<dataset>[-<body part>]-<model>``.

    ``run_dir_for("mura", "wrist")`` is "runs/mura-wrist-mobilenet_v2"; ``body_part`` None or "all" is
    left out ("runs/fracatlas-resnet18"); several parts ("wrist,hand") are joined by "+".

    Raises:
        ValueError: an unknown dataset, or a body part or model that is not a plain name.
    """
    dataset = str(dataset).strip().lower()
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SOURCES)}")
    parts = [p.strip().lower() for p in str(body_part or "all").split(",") if p.strip()]
    parts = [] if parts in ([], ["all"]) else parts
    model = str(model).strip()
    for what, value in [("body part", p) for p in parts] + [("model", model)]:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{what} {value!r} is not a plain name (letters, digits, '_', '.', '-')")
    name = "-".join([dataset, *(["+".join(parts)] if parts else []), model])
    return str(Path(base) / name)


def _number(block: dict[str, Any] | None, key: str) -> float:
    value = (block or {}).get(key)
    return math.nan if value is None else float(value)


def _recipe_name(config: dict[str, Any]) -> str:
    """The name of the recipe in xrai.recipe.RECIPES the config's recipe fields match, else "custom"."""
    try:
        values = TrainConfig.from_dict(config).to_dict()  # absent recipe fields read as an older run's
    except (TypeError, ValueError):
        return "unknown"
    return next((name for name, fields in RECIPES.items()
                 if all(values.get(k) == v for k, v in fields.items())), "custom")


def _epochs(folder: RunFolder) -> float:
    """Epochs trained (history.csv rows); a CV run's longest fold; NaN before the first epoch."""
    folds = folder.cv_folds()
    histories = [folder.read_history()] if folds is None else [folder.fold(k).read_history() for k in range(folds)]
    lengths = [len(h) for h in histories if h is not None]
    return float(max(lengths)) if lengths else math.nan


def _row(folder: RunFolder) -> dict[str, Any]:
    config = folder.read_config()
    # a CV run's validation is its out-of-fold report (the operating point is chosen there)
    valid = folder.read_report("oof" if folder.is_cv else "valid") or {}
    test = folder.read_report("test") or {}
    return {
        "run": folder.path.name,
        "cv": folder.is_cv,
        "dataset": folder.source or config.get("data") or valid.get("source") or "",
        "body_part": config.get("body_part") or "all",
        "model": config.get("model", ""),
        "pretrained": config.get("pretrained"),
        "recipe": _recipe_name(config) if config else "unknown",
        "epochs": _epochs(folder),
        "valid_auroc": _number(valid.get("image"), "auroc"),
        "test_auroc": _number(test.get("image"), "auroc"),
        "valid_kappa": _number(valid.get("image"), "kappa"),
        "test_kappa": _number(test.get("image"), "kappa"),
    }


def runs_table(folder: str | Path = "runs") -> pd.DataFrame:
    """One row per run folder directly under ``folder`` (a folder holding config.json, or a CV run's
    cv.json), sorted by name; ``cv`` marks cross-validation runs, whose valid figures are out-of-fold.

    Columns: RUNS_TABLE_COLUMNS (epochs: trained so far; AUROC and kappa: image level, NaN where the
    split was not evaluated). Reads only. A missing folder gives an empty table with the columns.
    """
    base = Path(folder)
    runs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    rows = [_row(RunFolder(p)) for p in runs if RunFolder(p).config_json.is_file() or RunFolder(p).is_cv]
    return pd.DataFrame(rows, columns=list(RUNS_TABLE_COLUMNS))
