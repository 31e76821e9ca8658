"""Score a run: predictions per image, report_<split>.json (docs/design.md, extended), the model card.

The threshold discipline: the temperature and the decision thresholds (image and study level, at
Youden's J and at a target sensitivity) are chosen on the validation split only and written in
report_valid.json with the sha256 of the checkpoint they were chosen with; every other split (test,
an external set) reads them from there and never chooses its own. When the checkpoint changed
since, valid is evaluated again first.

The metric maths lives in ``xrai.evaluate.metrics``, the calibration maths in ``xrai.evaluate.calibration``, the
report's blocks in ``xrai.evaluate.report`` (re-exported here: compute_metrics, study_level, bootstrap_ci,
choose_threshold, MURA_BASELINE, build_report, per_body_part).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from xrai.data import audit_summary, filter_body_parts, read_manifest
from xrai.evaluate.card import write_model_card
from xrai.evaluate.metrics import (
    MURA_BASELINE,
    MURA_BASELINE_SOURCE,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    mura_baseline,
    study_level,
)
from xrai.evaluate.predictions import PREDICTION_COLUMNS, predict
from xrai.evaluate.report import (
    DEFAULT_TARGET_SENSITIVITY,
    REPORT_KEYS,
    Selection,
    build_report,
    calibration_block,
    calibration_table,
    choose_selection,
    operating_points,
    per_body_part,
    per_part_table,
    selection_from_report,
    thresholds_table,
)
from xrai.evaluate.scores import EXPLAIN_IMAGES, measure_explanations
from xrai.runs.layout import (
    RunFolder,
    read_json,
    read_predictions,
    write_json,
)
from xrai.runs.load import RunModel, StaleThresholdWarning, load_run, run_tta

__all__ = [
    "MURA_BASELINE",
    "MURA_BASELINE_SOURCE",
    "PREDICTION_COLUMNS",
    "REPORT_KEYS",
    "bootstrap_ci",
    "build_report",
    "calibration_table",
    "choose_threshold",
    "compute_metrics",
    "evaluate_external",
    "evaluate_run",
    "per_body_part",
    "per_part_table",
    "predict",
    "read_predictions",
    "run_threshold",
    "score_predictions",
    "study_level",
    "thresholds_table",
    "write_json",
]

# ---- writing a run's reports --------------------------------------------------------------------


def _audit_counts(run_dir: Path) -> dict[str, int | None]:
    """Counts from run_dir/audit.csv; null counts (not zeros: "not audited" is not "clean") without it."""
    table = RunFolder(run_dir).read_audit()
    if table is None:
        warnings.warn(f"no audit.csv in {run_dir}: the report's audit counts are null; run "
                      f"`python -m xrai audit` (or notebooks/02_eda.ipynb) to fill them", UserWarning, stacklevel=3)
        return {"cross_split_groups": None, "cross_label_groups": None}
    return {k: int(v) for k, v in audit_summary(table).items()}


def run_threshold(run_dir: str | Path) -> float:
    """The run's image-level decision threshold, as chosen on validation (report_valid.json), or, for a
    run without a validation split of its own, on the CV's out-of-fold predictions (a CV run's
    report_oof.json, a final fit's threshold.json).

    This reads the number as it stands; ``xrai.runs.load.load_run`` also checks that it was chosen
    with the current checkpoint (and re-chooses it when not).

    Raises:
        FileNotFoundError: the run was never evaluated on valid; the message says how.
    """
    path = RunFolder(run_dir).operating_point_file
    if not path.is_file():
        raise FileNotFoundError(f"no report_valid.json in {run_dir}: the threshold is chosen on validation; "
                                f"run `python -m xrai evaluate --run {run_dir} --split valid` first")
    return float(read_json(path)["threshold"])


def _split_rows(run_dir: Path, split: str, config: Any) -> pd.DataFrame:
    manifest = read_manifest(run_dir, splits=(split,))  # this split's images only: a fresh Colab runtime extracts them
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        present = manifest["split"].value_counts().to_dict()
        raise ValueError(f"no {split!r} images in {RunFolder(run_dir).manifest_csv} (splits present: {present})")
    rows = filter_body_parts(rows, config.body_parts())
    rows.attrs = dict(manifest.attrs)
    return rows


def _valid_selection(run: RunModel, *, tta: bool, **valid_options: Any) -> Selection:
    """The Selection in report_valid.json, after evaluating valid when it is missing or was made with
    another checkpoint (or without TTA when TTA is asked for now, or the other way round).

    ``run`` is loaded with ``stale="default"``: its point is the defaults exactly when the file is
    missing or stale, with the reason in ``point.note`` (so the checkpoint is hashed once per evaluation).

    A run whose operating point was chosen on a CV's out-of-fold predictions (a CV run, a final fit)
    cannot choose it again here: when it no longer fits, the error says to rerun the CV.
    """
    run_dir = run.run_dir
    path = RunFolder(run_dir).operating_point_file
    current = run.point.source != "default"
    reason = run.point.note
    report = read_json(path) if current else {}
    oof = path != RunFolder(run_dir).report_json("valid")
    if current and bool(report.get("tta", False)) != tta:
        current = False
        reason = (f"its threshold was chosen with tta={report.get('tta', False)}; evaluate with that setting" if oof
                  else f"report_valid.json was made with tta={report.get('tta', False)}, now tta={tta}")
    if oof:
        if not current:
            raise ValueError(f"{path}: {reason}; the out-of-fold threshold cannot be chosen again here "
                             f"(rerun `python -m xrai cv` into a new folder)")
        return selection_from_report(report)
    if not current:
        if RunFolder(run_dir).report_json("valid").is_file():
            warnings.warn(f"{run_dir}: {reason}; evaluating valid again first", StaleThresholdWarning, stacklevel=3)
        report = evaluate_run(run_dir, split="valid", which=run.which, tta=tta, **valid_options)
    return selection_from_report(report)


def _describe_split(split: str, split_method: str | None) -> str:
    """What the figures are on, in words, for the baseline caveat."""
    method = split_method or ""
    if method.startswith("external"):
        return f"an external set ({split})"
    if split == "test" and "carved" in method:
        return "a test split carved from MURA's train split"
    if split == "valid":
        return "MURA's public valid split" if method.startswith("official") else "this run's valid split"
    return f"this run's {split} split"


def _threshold_from(selection: Selection) -> str:
    """The report's ``threshold_from`` for a selection read back from the run's operating point."""
    return "oof" if selection.source == "oof" else "valid"


def _score(run: RunModel, pred: pd.DataFrame, selection: Selection, **options: Any) -> dict[str, Any]:
    """score_predictions for a loaded run's predictions."""
    checkpoint = {"file": run.checkpoint_file, "sha256": run.checkpoint_sha256}
    return score_predictions(pred, selection, checkpoint=checkpoint, **options)


def score_predictions(pred: pd.DataFrame, selection: Selection, *, split: str, threshold_from: str,
                      checkpoint: dict[str, Any], rows_attrs: dict[str, Any], audit: dict[str, int | None],
                      tta: bool, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The whole report for calibrated predictions: docs/design.md's blocks, then the extensions.

    Args:
        checkpoint: {"file", "sha256"} of what made the predictions (the report's thresholds are bound to it).
    """
    report = build_report(pred, split=split, threshold=selection.threshold, threshold_from=threshold_from,
                          split_method=rows_attrs.get("split_method"), audit=audit,
                          study_threshold=selection.study_threshold, n_bootstrap=n_bootstrap, seed=seed)
    source = str(rows_attrs.get("source") or "")
    report.update({
        "threshold_method": selection.method,
        "operating_points": operating_points(pred, selection),
        "calibration": calibration_block(pred, selection),
        "checkpoint": checkpoint,
        "tta": bool(tta),
        "source": source or None,
        "baseline": mura_baseline(source, _describe_split(split, rows_attrs.get("split_method"))),
        "explain": None,
    })
    return report


def _given_valid_report(run_dir: Path) -> dict[str, Any] | None:
    """A CV run's "valid": its out-of-fold report, as the CV wrote it; None for a run with a valid split.

    Raises:
        ValueError: a final fit (its operating point is given in threshold.json; it has no valid split).
    """
    folder = RunFolder(run_dir)
    given = folder.operating_point_file
    if given == folder.report_json("oof"):  # a CV run's validation
        return read_json(given)
    if given == folder.threshold_json:
        raise ValueError(f"{run_dir} has no validation split of its own (its threshold comes from {given}); "
                         f"score the test split or an external set")
    return None


def _calibrate(pred: pd.DataFrame, selection: Selection | None, *, method: str,
               target: float) -> tuple[Selection, str]:
    """The predictions' probabilities through the selection's calibration; valid (selection None) chooses its own.
    Returns (the selection, the report's threshold_from)."""
    if selection is None:  # valid chooses its own; its source says whether that succeeded
        selection = choose_selection(pred, method=method, target=target)
        threshold_from = selection.source
    else:
        threshold_from = _threshold_from(selection)
    pred["probability"] = selection.calibration.apply(pred["logit"])
    return selection, threshold_from


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "valid",
    tta: bool | None = None,
    which: str = "best",
    progress: bool = True,
    threshold_method: str = "youden",
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    explain_images: int | None = None,
) -> dict[str, Any]:
    """Score one split of a run; write predictions_<split>.csv, report_<split>.json and model_card.md.

    On "valid" the temperature is fitted and the thresholds are chosen here (``threshold_method``,
    "youden" or "sensitivity", is the primary one; both are reported, the sensitivity point at
    ``target_sensitivity``). On any other split they are read from report_valid.json, which is made
    first when missing or when it was made with another checkpoint. A split never chooses its own.

    Args:
        explain_images: images sampled (seeded) from the split for the explanation scores (ROAD,
            confidence change, the randomisation check, and the pointing game on the synthetic set);
            None takes ``xrai.evaluate.scores.EXPLAIN_IMAGES``, 0 skips them (``explain`` is then null).
        tta: flip test-time augmentation; None: as the run's recipe says (config.json "tta").

    A cross-validation run (cv.json) has no valid split of its own: its "valid" is the out-of-fold
    report written by the CV (report_oof.json: every pool image scored by the fold model that never
    trained on it, the temperature and thresholds chosen there), returned as it is. A final fit has
    none at all; its other splits use the CV's out-of-fold operating point (threshold.json).

    Returns:
        the report dict (as written).
    Raises:
        ValueError: split "valid" of a final fit (it has none).
    """
    run_dir = Path(run_dir)
    tta = run_tta(run_dir) if tta is None else bool(tta)
    if split == "valid" and (given := _given_valid_report(run_dir)) is not None:
        return given
    # valid evaluated first only for its thresholds: its explanation scores are not what was asked for
    options = dict(progress=progress, threshold_method=threshold_method, target_sensitivity=target_sensitivity,
                   n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size, device=device, explain_images=0)
    run = load_run(run_dir, which=which, device=device, stale="default")
    selection = None if split == "valid" else _valid_selection(run, tta=tta, **options)
    rows = _split_rows(run_dir, split, run.config)
    pred = predict(run, rows, temperature=1.0, batch_size=batch_size, tta=tta, progress=progress)
    selection, threshold_from = _calibrate(pred, selection, method=threshold_method, target=target_sensitivity)
    RunFolder(run_dir).write_predictions(split, pred)
    report = _score(run, pred, selection, split=split, threshold_from=threshold_from, rows_attrs=rows.attrs,
                    audit=_audit_counts(run_dir), tta=tta, n_bootstrap=n_bootstrap, seed=seed)
    if explain_images != 0:
        report["explain"] = measure_explanations(
            run, pred, split=split, threshold=selection.threshold, seed=seed, progress=progress, manifest=rows,
            n_images=EXPLAIN_IMAGES if explain_images is None else explain_images)
    RunFolder(run_dir).write_report(split, report)
    write_model_card(run_dir)
    return report


def evaluate_external(
    run_dir: str | Path,
    manifest: pd.DataFrame,
    *,
    name: str = "external",
    tta: bool | None = None,
    which: str = "best",
    progress: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Score every image of another dataset at the run's validation temperature and thresholds.

    All rows of ``manifest`` are used whatever their split, and no body-part filter is applied (filter
    the manifest first to compare like with like). Writes predictions_<name>.csv and
    report_<name>.json; ``audit`` counts are null (the external set is not part of the run's audit).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in ("train", "valid", "test"):
        raise ValueError(f"external report name {name!r} must be a plain word other than train/valid/test")
    run_dir = Path(run_dir)
    tta = run_tta(run_dir) if tta is None else bool(tta)
    run = load_run(run_dir, which=which, device=device, stale="default")
    selection = _valid_selection(run, tta=tta, progress=progress, n_bootstrap=n_bootstrap,
                                 seed=seed, batch_size=batch_size, device=device, explain_images=0)
    pred = predict(run, manifest, calibration=selection.calibration, batch_size=batch_size, tta=tta,
                   progress=progress)
    RunFolder(run_dir).write_predictions(name, pred)
    source = manifest.attrs.get("source") or (manifest["source"].iloc[0] if "source" in manifest.columns else "")
    attrs = {"source": source, "split_method": f"external: every image of {source or 'the given manifest'}"}
    report = _score(run, pred, selection, split=name, threshold_from=_threshold_from(selection), rows_attrs=attrs,
                    audit={"cross_split_groups": None, "cross_label_groups": None}, tta=tta,
                    n_bootstrap=n_bootstrap, seed=seed)
    RunFolder(run_dir).write_report(name, report)
    return report
