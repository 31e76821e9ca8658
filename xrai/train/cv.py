"""Grouped k-fold cross-validation as a run: one ordinary run folder per fold, out-of-fold predictions
and threshold, the mean and spread of every metric, the folds' ensemble, and a final fit on it all.

The CV pool is the train and valid rows of the manifest's split; the test rows are never trained on,
validated on or used to choose anything (they stay "test" in every fold's manifest). The pool is cut
into k folds by scikit-learn's StratifiedGroupKFold: stratified by label, grouped so that no patient
(or, where a source has no patient ids, no duplicate group from the audit: FracAtlas) spans two folds.
Fold k trains on the other folds and validates on fold k, with the recipe's own rules (early
stopping and best checkpoint, or the last epoch); each fold is scored once on its own valid rows,
which gives every pool image one out-of-fold (OOF) probability from the one model that never trained
on it.

    RUN_DIR/
      manifest.csv          every image: split "train" (the pool) or "test", and its `fold` (-1: test)
      audit.csv             duplicate groups; a fold's audit.csv counts those crossing its splits
      folds/<k>/            an ordinary run folder: fold k is its valid split (report_valid.json)
      predictions_oof.csv   one OOF logit and probability per pool image, with its fold
      report_oof.json       the OOF report: the run's operating point (temperature fitted and thresholds
                            chosen on the OOF predictions), bound to the sha256 of the folds' checkpoints
      config.json, cv.json  the recipe; per-fold metrics, mean/std/min/max, epochs, wall times
      final/                (final=True) one model on the whole pool for the CV's number of epochs, with
                            the OOF operating point in final/threshold.json (threshold_from "oof")

cv.json is written last: a folder holding it is a finished CV run. ``xrai.runs.load.load_run`` (and
``xrai.models.factory.load_model``) then return its folds' ``FoldEnsemble`` (probabilities averaged) with the
OOF operating point, so predict, evaluate, explain, the app and the notebooks take a CV run folder
like any run; ``evaluate --split test`` gives the ensemble its own report. The OOF figures are each
fold model's on images it never saw, so they estimate one model's performance; the ensemble's
threshold and temperature are taken from them (the ensemble has no held-out images of its own).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from xrai.config import TrainConfig
from xrai.data import audit, audit_summary, duplicate_groups, filter_body_parts, read_manifest, save_manifest
from xrai.data.audit import image_hashes, with_splits
from xrai.data.split import group_ids
from xrai.evaluate.predictions import predict
from xrai.evaluate.report import choose_selection, figure
from xrai.evaluate.run import evaluate_run, score_predictions
from xrai.labels import CLASS_NAMES
from xrai.runs.layout import CHECKPOINTS_DIR, CV_JSON, FOLDS_DIR, RunFolder, read_json, write_json
from xrai.runs.load import load_model
from xrai.runs.operating import checkpoint_sha256, folds_sha256
from xrai.train.trainer import fit

__all__ = ["CVResult", "POOL_SPLITS", "assign_folds", "cross_validate", "fit_final", "fold_manifest",
           "score_folds", "summarise_metrics"]

logger = logging.getLogger(__name__)

POOL_SPLITS = ("train", "valid")  # the rows CV trains and validates on; "test" never takes part
# What a final fit takes over from the CV's report_oof.json (xrai.runs.load.OperatingPoint reads them).
OPERATING_POINT_KEYS = ("threshold", "study_threshold", "threshold_method", "operating_points", "calibration", "tta")


@dataclass(kw_only=True)
class CVResult:
    """What cross_validate returns; everything is also in the run folder."""

    run_dir: Path
    summary: dict[str, Any]  # cv.json
    oof: pd.DataFrame  # predictions_oof.csv
    final: Any = None  # the FitResult of the final fit, when asked for


# ---- folds ---------------------------------------------------------------------------------------


def assign_folds(manifest: pd.DataFrame, *, folds: int, seed: int = 0, groups: pd.Series | None = None,
                 hashes: pd.DataFrame | None = None, progress: bool = True) -> tuple[pd.Series, str]:
    """The fold (0..folds-1) of every train/valid row, -1 for test rows, and what the folds are grouped by.

    Rows sharing a patient, a study, a path or a ``groups`` value stay in one fold. Without patient ids
    and without ``groups``, the images' duplicate groups are found (``xrai.data.duplicate_groups``).

    Args:
        manifest: the manifest (its split column says which rows form the pool).
        folds: k >= 2.
        seed: StratifiedGroupKFold's shuffle seed.
        groups: an id per manifest row (aligned by index) that must not span two folds.
        hashes: ``xrai.data.audit.image_hashes`` of the manifest's paths (in row order), to find the
            duplicate groups without hashing the images again.
    Returns:
        (fold per row as an int Series on the manifest's index, "patient" | "duplicate-group" | "group").
    Raises:
        ValueError: k < 2, or too few groups of either label for k folds (the message says how many).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    pool = manifest["split"].isin(POOL_SPLITS).to_numpy()
    rows = manifest[pool]
    has_patients = "patient_id" in rows.columns and bool((rows["patient_id"].astype(str) != "").any())
    if groups is not None:
        groups, grouping = groups[pool], "patient" if has_patients else "group"
    elif has_patients:
        grouping = "patient"
    else:
        pool_hashes = None if hashes is None else hashes[pool].reset_index(drop=True)
        groups = duplicate_groups(rows, hashes=pool_hashes, progress=progress)
        grouping = "duplicate-group"
    ids = group_ids(rows, groups)
    labels = rows["label"].to_numpy(dtype=np.int64)
    for label, name in enumerate(CLASS_NAMES):
        n_groups = len(np.unique(ids[labels == label]))
        if n_groups < folds:
            raise ValueError(f"{folds} folds need at least {folds} {grouping} groups with {name} images in the "
                             f"train+valid rows, found {n_groups}; use fewer folds")
    fold = np.full(len(manifest), -1, dtype=np.int64)
    where = np.flatnonzero(pool)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(rows)), labels, ids)):
        fold[where[valid]] = k
    return pd.Series(fold, index=manifest.index, name="fold"), grouping


def fold_manifest(table: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest fold ``fold`` trains on: that fold "valid", the other folds "train", test kept."""
    folds = int(table["fold"].max()) + 1
    out = table.copy()
    k = out["fold"].to_numpy()
    out["split"] = np.where(k == fold, "valid", np.where(k >= 0, "train", "test"))
    out.attrs = {**table.attrs, "split_method": f"fold {fold} of {folds}: {table.attrs.get('split_method', '')}"}
    return out


def _prepare(config: TrainConfig, manifest: pd.DataFrame, *, folds: int, groups: pd.Series | None,
             progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest with folds: pool rows "train", test "test"; its audit table), both for config's body parts."""
    if groups is not None:  # aligned to the manifest's index, which the body-part filter renumbers
        manifest = manifest.assign(_cv_group=groups)
    table = filter_body_parts(manifest, config.body_parts())
    if groups is not None:
        groups, table = table["_cv_group"], table.drop(columns="_cv_group")
    hashes = image_hashes(table["path"].astype(str).tolist(), progress=progress)  # once, for folds and audit
    fold, grouping = assign_folds(table, folds=folds, seed=config.seed, groups=groups, hashes=hashes,
                                  progress=progress)
    pool = fold >= 0
    original = table.attrs.get("split_method", "")
    table = table.assign(split=np.where(pool, "train", "test"), fold=fold)
    table.attrs["split_method"] = (f"{folds}-fold CV of the train+valid rows of ({original}), {grouping}-grouped "
                                   f"label-stratified (StratifiedGroupKFold), seed {config.seed}")
    audit_table = audit(table, hashes=hashes, progress=progress)
    return table, audit_table


# ---- the run -------------------------------------------------------------------------------------


def cross_validate(config: TrainConfig, manifest: pd.DataFrame, run_dir: str | os.PathLike, *, folds: int = 5,
                   groups: pd.Series | None = None, resume: bool = False, final: bool = False,
                   progress: bool = True) -> CVResult:
    """Grouped, stratified k-fold CV of one recipe on the manifest's train+valid rows (see the module doc).

    Args:
        config: the recipe and run settings every fold trains with.
        manifest: the manifest, all splits (the test rows are carried along, never used).
        run_dir: the CV run folder.
        folds: k.
        groups: an id per manifest row that must not span two folds (default: patients, else the
            duplicate groups).
        resume: continue an interrupted CV in run_dir (finished folds are kept as they are).
        final: then train one model on the whole pool (``fit_final``) into run_dir/final.
        progress: tqdm bars and a line per epoch.
    Raises:
        FileExistsError: run_dir already holds a CV and resume is False.
        ValueError: too few groups for k folds; a fold without both labels; resuming with another k.
    """
    run_dir = Path(run_dir)
    say = tqdm.write if progress else logger.info
    start = time.perf_counter()
    table, audit_table = _pool_with_folds(config, manifest, RunFolder(run_dir), folds=folds, groups=groups,
                                          resume=resume, progress=progress)
    per_fold = [_run_fold(config, table, audit_table, RunFolder(run_dir), k, folds=folds, resume=resume,
                          progress=progress, say=say) for k in range(folds)]
    oof, threshold = _write_oof(run_dir, config, table, audit_table, folds)
    summary = _cv_summary(config, table, per_fold, oof, threshold, folds=folds, wall=time.perf_counter() - start)
    config.to_json(RunFolder(run_dir).config_json)
    write_json(summary, RunFolder(run_dir).cv_json)  # last: its presence marks a finished CV run
    image = summary["summary"]["image"]["auroc"]
    say(f"{folds}-fold CV AUROC {figure(image['mean'])} +- {figure(image['std'])} (fold std); OOF AUROC "
        f"{figure(summary['oof']['auroc'])}, OOF threshold {summary['oof']['threshold']:.3f}; "
        f"{summary['wall_seconds'] / 60:.1f} min")
    fitted = fit_final(run_dir, resume=resume, progress=progress) if final else None
    return CVResult(run_dir=run_dir, summary=summary, oof=oof, final=fitted)


def _pool_with_folds(config: TrainConfig, manifest: pd.DataFrame, folder: RunFolder, *, folds: int,
                     groups: pd.Series | None, resume: bool,
                     progress: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the CV manifest with its folds, its audit table): read back on resume, else made and saved.

    Raises:
        FileExistsError: the folder holds a run and resume is False. ValueError: resuming with another k.
    """
    if not resume and (folder.is_cv or folder.manifest_csv.is_file()):
        raise FileExistsError(f"{folder.path} already holds a run; pass resume=True (CLI: --resume) to continue "
                              "it, or choose a new run folder")
    if resume and folder.manifest_csv.is_file():
        table = read_manifest(folder.path)
        if "fold" not in table.columns or int(table["fold"].max()) + 1 != folds:
            raise ValueError(f"{folder.manifest_csv} is not a {folds}-fold CV manifest; resume with the "
                             "same --folds, or choose a new run folder")
        return table, folder.read_audit()
    table, audit_table = _prepare(config, manifest, folds=folds, groups=groups, progress=progress)
    save_manifest(table, folder.path)
    folder.write_audit(audit_table)
    return table, audit_table


def _run_fold(config: TrainConfig, table: pd.DataFrame, audit_table: pd.DataFrame | None, folder: RunFolder,
              k: int, *, folds: int, resume: bool, progress: bool, say) -> dict[str, Any]:
    """Train fold k (or resume it), score it on its valid rows once; its entry of cv.json "per_fold"."""
    rows = fold_manifest(table, k)
    fold_dir = folder.fold(k).path
    _write_fold_audit(audit_table, rows, fold_dir)
    n_train, n_valid = int((rows["split"] == "train").sum()), int((rows["split"] == "valid").sum())
    say(f"fold {k + 1}/{folds}: {n_train} train / {n_valid} valid images -> {fold_dir}")
    result = fit(config, rows, fold_dir, resume=resume, progress=progress)
    began = time.perf_counter()
    report = _fold_report(fold_dir) if resume else None
    if report is None:
        report = evaluate_run(fold_dir, split="valid", progress=progress, seed=config.seed, explain_images=0)
    say(f"fold {k + 1}/{folds}: valid AUROC {figure(report['image']['auroc'])} (epoch {result.best_epoch} handed on)")
    return _fold_summary(k, rows, result, report, eval_seconds=time.perf_counter() - began)


def fit_final(run_dir: str | os.PathLike, *, epochs: int | None = None, resume: bool = False,
              progress: bool = True):
    """One model on every pool image of a finished CV, into run_dir/final: the CV's recipe for the CV's
    number of epochs (cv.json "epochs"), no early stopping, no validation, the last epoch's weights, and
    the CV's OOF operating point (final/threshold.json, threshold_from "oof", bound to the final
    checkpoint's sha256; reports say so).

    Args:
        run_dir: a finished CV run folder.
        epochs: override the CV's choice.
    Returns:
        the FitResult of the final run.
    Raises:
        FileNotFoundError: run_dir is not a finished CV run.
        ValueError: the recipe uses the plateau scheduler (it needs validation).
    """
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    if not folder.is_cv:
        raise FileNotFoundError(f"no {CV_JSON} in {run_dir}: a final fit follows a finished cross-validation "
                                f"(`python -m xrai cv ... --out {run_dir}`)")
    summary = read_json(folder.cv_json)
    config = TrainConfig.from_json(folder.config_json)
    if config.scheduler == "plateau":
        raise ValueError("a final fit has no validation, so it cannot use scheduler 'plateau'; rerun the CV "
                         "with another scheduler")
    n = int(epochs or summary["epochs"]["chosen"])
    final_config = config.replace(epochs=n, patience=0, keep="last")
    table = read_manifest(run_dir)
    rows = table.assign(split=np.where(table["fold"] >= 0, "train", "test"))
    rows.attrs = {**table.attrs, "split_method": f"final fit on every CV pool image: {table.attrs['split_method']}"}
    final = RunFolder(run_dir / "final")
    final_dir = final.path
    _write_fold_audit(folder.read_audit(), rows, final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    fitted = fit(final_config, rows, final_dir, resume=resume, progress=progress)
    oof = folder.read_report("oof")
    given = {key: oof.get(key) for key in OPERATING_POINT_KEYS}
    given.update({"threshold_from": "oof",
                  "checkpoint": {"file": final.checkpoint("best").relative_to(final_dir).as_posix(),
                                 "sha256": checkpoint_sha256(final.checkpoint("best"))},
                  "chosen_on": f"the out-of-fold predictions of the {summary['folds']}-fold CV in "
                               f"{run_dir.name}/ ({folder.predictions_csv('oof').name}, "
                               f"{folder.report_json('oof').name})"})
    write_json(given, final.threshold_json)
    return fitted


def score_folds(run_dir: str | os.PathLike, *, tta: bool | None = None, which: str = "best",
                progress: bool = True) -> dict[str, Any]:
    """Valid AUROC of each fold's model with another evaluation setting (flip TTA on or off, the best or
    the last checkpoint), as {mean, std, min, max, values}: the same weights, scored again, nothing
    written. Compares evaluation choices without training anything.
    """
    run_dir = Path(run_dir)
    values = []
    for fold_dir in sorted((run_dir / FOLDS_DIR).iterdir(), key=lambda p: int(p.name)):
        model, config = load_model(fold_dir, which=which)
        rows = read_manifest(fold_dir)
        rows = rows[rows["split"] == "valid"]
        pred = predict(model, rows, config=config, tta=tta, progress=progress)
        values.append(float(roc_auc_score(pred["label"], pred["probability"])))
    stats = summarise_values(values)
    return {**stats, "tta": tta, "which": which}


def summarise_values(values: list[float | None]) -> dict[str, Any]:
    """{mean, std (n - 1), min, max, values} of per-fold values; None values are left out of the statistics."""
    kept = np.array([v for v in values if v is not None], dtype=float)
    return {"mean": float(kept.mean()) if kept.size else None,
            "std": float(kept.std(ddof=1)) if kept.size > 1 else None,
            "min": float(kept.min()) if kept.size else None,
            "max": float(kept.max()) if kept.size else None, "values": list(values)}


# ---- summaries -----------------------------------------------------------------------------------

# Scalar metrics of a report block that the CV summarises (the CIs and matrices stay in the fold reports).
SUMMARY_METRICS = ("auroc", "average_precision", "accuracy", "sensitivity", "specificity", "f1", "kappa")


def summarise_metrics(blocks: list[dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Mean, std (n - 1), min, max and the per-fold values of each of SUMMARY_METRICS over fold report
    blocks ("image" or "study"); a metric a fold cannot define (None) is left out of its statistics."""
    return {name: summarise_values([b.get(name) for b in blocks if b]) for name in SUMMARY_METRICS}


def _write_fold_audit(audit_table: pd.DataFrame | None, rows: pd.DataFrame, run_dir: Path) -> None:
    """run_dir/audit.csv: the CV's duplicate groups with the crossings under this run's splits."""
    if audit_table is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = pd.Series(rows["split"].to_numpy(), index=rows["path"].to_numpy())
    RunFolder(run_dir).write_audit(with_splits(audit_table, splits))


def _fold_report(fold_dir: Path) -> dict[str, Any] | None:
    """A resumed fold's report_valid.json when it was made with the fold's current checkpoint, else None."""
    folder = RunFolder(fold_dir)
    best, path = folder.checkpoint("best"), folder.report_json("valid")
    if not (best.is_file() and path.is_file() and folder.predictions_csv("valid").is_file()):
        return None
    report = read_json(path)
    return report if (report.get("checkpoint") or {}).get("sha256") == checkpoint_sha256(best) else None


def _fold_summary(k: int, rows: pd.DataFrame, result, report: dict[str, Any], *, eval_seconds: float) -> dict:
    history = result.history

    def pick(block: dict[str, Any] | None) -> dict[str, Any] | None:
        return {m: block.get(m) for m in SUMMARY_METRICS} if block else None

    return {"fold": k, "n_train": int((rows["split"] == "train").sum()), "n_valid": int((rows["split"] == "valid").sum()),
            "epochs_run": int(len(history)), "best_epoch": int(result.best_epoch),
            "stopped_early": bool(result.stopped_early), "threshold": report["threshold"],
            "train_seconds": float(history["seconds"].sum()), "eval_seconds": float(eval_seconds),
            "image": pick(report["image"]), "study": pick(report.get("study"))}


def _write_oof(run_dir: Path, config: TrainConfig, table: pd.DataFrame, audit_table: pd.DataFrame | None,
               folds: int) -> tuple[pd.DataFrame, float]:
    """predictions_oof.csv and report_oof.json from the folds' valid predictions: the temperature is
    fitted and the thresholds chosen on the OOF logits, as evaluate does on a valid split; returns
    (the OOF predictions, the OOF threshold)."""
    folder = RunFolder(run_dir)
    parts = []
    for k in range(folds):
        pred = folder.fold(k).read_predictions("valid")
        parts.append(pred.assign(fold=k))
    oof = pd.concat(parts, ignore_index=True)
    selection = choose_selection(oof, method="youden")  # on the logits, never a fold's own temperature
    oof["probability"] = selection.calibration.apply(oof["logit"])
    folder.write_predictions("oof", oof)
    folds_of = pd.Series(table["fold"].map(lambda f: f"fold{f}" if f >= 0 else "test").to_numpy(),
                         index=table["path"].to_numpy())
    counts = audit_summary(with_splits(audit_table, folds_of)) if audit_table is not None else \
        {"cross_split_groups": None, "cross_label_groups": None}
    checkpoint = {"file": f"{FOLDS_DIR}/*/{CHECKPOINTS_DIR}/best.pt", "sha256": folds_sha256(run_dir, folds, "best")}
    attrs = {"split_method": table.attrs.get("split_method"), "source": table.attrs.get("source", config.data)}
    report = score_predictions(oof.drop(columns="fold"), selection, split="oof", threshold_from="oof",
                               checkpoint=checkpoint, rows_attrs=attrs, audit=counts, tta=config.tta,
                               n_bootstrap=1000, seed=config.seed)
    folder.write_report("oof", report)
    return oof, selection.threshold


def _cv_summary(config: TrainConfig, table: pd.DataFrame, per_fold: list[dict], oof: pd.DataFrame,
                threshold: float, *, folds: int, wall: float) -> dict[str, Any]:
    keep_last = config.keep == "last"
    per_epoch = [f["epochs_run"] if keep_last else f["best_epoch"] for f in per_fold]
    chosen = max(1, int(round(float(np.median(per_epoch)))))
    rule = ("the epochs each fold ran (keep='last'), median" if keep_last
            else "the median of the folds' best epochs (keep='best')")
    pool = table[table["fold"] >= 0]
    return {
        "folds": folds,
        "seed": config.seed,
        "split_method": table.attrs.get("split_method", ""),
        "pool": {"n": int(len(pool)), "abnormal": int(pool["label"].sum())},
        "test_rows_untouched": int((table["fold"] < 0).sum()),
        "per_fold": per_fold,
        "summary": {"image": summarise_metrics([f["image"] for f in per_fold]),
                    "study": summarise_metrics([f["study"] for f in per_fold])
                    if any(f["study"] for f in per_fold) else None},
        "oof": {"n": int(len(oof)), "auroc": float(roc_auc_score(oof["label"], oof["probability"]))
                if oof["label"].nunique() == 2 else None,
                "threshold": threshold, "threshold_from": "oof", "threshold_method": "youden",
                "report": RunFolder(".").report_json("oof").name,
                "predictions": RunFolder(".").predictions_csv("oof").name},
        "epochs": {"per_fold": per_epoch, "chosen": chosen, "rule": rule},
        "wall_seconds": float(wall),
        "train_seconds": float(sum(f["train_seconds"] for f in per_fold)),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "config": config.to_dict(),
    }


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
