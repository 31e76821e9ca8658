"""model_card.md per run (Mitchell et al., "Model Cards for Model Reporting", 2019), from the run's files.

Written by ``evaluate`` after every report, so it always states what the reports on disk say: the data
and its split, the training recipe, the operating point and calibration chosen on valid, metrics
with intervals per body part, the explanation scores, the intended use and the known limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from xrai import __version__
from xrai.config import TrainConfig
from xrai.data.download import DATASETS
from xrai.evaluate.report import calibration_words, figure
from xrai.recipe import describe_recipe
from xrai.runs.layout import AUDIT_CSV, RunFolder, read_json

__all__ = ["INTENDED_USE", "model_card", "write_model_card"]

INTENDED_USE = "research and teaching, not diagnosis"
_DATA_NAMES = {"mura": "MURA v1.1 (Stanford AIMI)", "fracatlas": "FracAtlas (Abedeen et al. 2023, CC BY 4.0)",
               "synthetic": "X-RAI's synthetic phantoms (generated; not real X-rays)",
               "folder": "class folders", "multiregion": "Kaggle multi-region bone fracture set",
               "bonefracture": "Kaggle bone fracture detection set"}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _data_section(run: RunFolder, reports: dict[str, dict], meta: dict[str, Any], source: str) -> list[str]:
    lines = ["## Data", "",
             f"- Source: {_DATA_NAMES.get(source, source or 'unknown')}"
             + (f"; Kaggle dataset `{DATASETS[source]}`" if source in DATASETS else ""),
             f"- Split: {meta.get('split_method') or 'unknown'}"]
    if run.manifest_csv.is_file():
        # only the counts: four columns read as read_manifest reads them ("" for none), without
        # looking for the images (the card does not need them)
        ids = ("split", "study_id", "patient_id")
        manifest = pd.read_csv(run.manifest_csv, usecols=[*ids, "label"],
                               dtype=dict.fromkeys(ids, str)).fillna(dict.fromkeys(ids, ""))
        rows = []
        for split, frame in manifest.groupby("split", sort=False):
            studies = frame["study_id"].replace("", pd.NA).nunique()
            patients = frame["patient_id"].replace("", pd.NA).nunique()
            rows.append([str(split) or "(none)", f"{len(frame):,}", f"{studies:,}" if studies else "-",
                         f"{patients:,}" if patients else "-", f"{frame['label'].mean():.1%}"])
        lines += ["", *_table(["split", "images", "studies", "patients", "abnormal"], rows)]
    audit = next((r.get("audit") for r in reports.values() if r.get("audit")), None) or {}
    if audit.get("cross_split_groups") is None:
        lines += ["", f"- Leakage audit: not run (no {AUDIT_CSV}); `python -m xrai audit` fills it"]
    else:
        lines += ["", f"- Leakage audit (exact and near duplicates): {audit['cross_split_groups']} duplicate groups "
                  f"cross a split, {audit['cross_label_groups']} carry both labels"]
    return lines + [""]


def _image_size(config: dict[str, Any]) -> str:
    try:
        return str(TrainConfig.from_dict(config).image_size)
    except (TypeError, ValueError):  # a config.json from another version: say what it holds
        return str(config.get("img_size") or "default")


def _recipe_section(run: RunFolder, reports: dict[str, dict]) -> list[str]:
    config = run.read_config()
    lines = ["## Model and training recipe", ""]
    if config:
        lines += [f"- Architecture: {config.get('model')} with a {config.get('head')} one-logit head "
                  f"(ImageNet weights: {'yes' if config.get('pretrained') else 'no'}; frozen backbone: "
                  f"{'yes' if config.get('freeze') else 'no'}; dropout {config.get('dropout')})",
                  f"- Body parts: {config.get('body_part')}; input {_image_size(config)} px (centre crop of the "
                  f"{'stretched' if config.get('resize') == 'stretch' else 'letterboxed'} image"
                  f"{'; flip test-time augmentation' if config.get('tta') else ''})",
                  f"- Optimiser {config.get('optimizer')}, lr {config.get('lr')}, weight decay "
                  f"{config.get('weight_decay')}, batch {config.get('batch_size')}, scheduler "
                  f"{config.get('scheduler')}, up to {config.get('epochs')} epochs (patience "
                  f"{config.get('patience')} on validation {config.get('monitor')}), seed {config.get('seed')}",
                  f"- Training {describe_recipe(config)}"]
        if config.get("prune_sparsity"):
            lines.append(f"- SynFlow pruning at init to {config['prune_sparsity']:.0%} sparsity")
    h = run.read_history()
    if h is not None:
        if len(h) and "val_auroc" in h and h["val_auroc"].notna().any():
            best = h.loc[h["val_auroc"].idxmax()]
            lines.append(f"- Trained {len(h)} epochs; best validation AUROC {best['val_auroc']:.4f} at epoch "
                         f"{int(best['epoch'])}")
    checkpoint = next((r.get("checkpoint") for r in reports.values() if r.get("checkpoint")), None)
    if checkpoint:
        lines.append(f"- Checkpoint `{checkpoint['file']}`, sha256 `{checkpoint['sha256']}`")
    return lines + [""]


def _operating_section(valid: dict[str, Any] | None) -> list[str]:
    where = "the out-of-fold predictions of a grouped CV" if (valid or {}).get("threshold_from") == "oof" else "valid"
    short = "the OOF predictions" if where != "valid" else "valid"
    lines = [f"## Operating point and calibration (chosen on {where})", ""]
    if valid is None:
        return lines + ["Not evaluated on valid yet.", ""]
    cal = valid.get("calibration") or {}
    lines += [f"- Image threshold {figure(valid['threshold'])} and study threshold {figure(valid.get('study_threshold'))} "
              f"on calibrated probabilities ({valid.get('threshold_method', 'youden')}, chosen on "
              f"{valid['threshold_from']}); a study's probability is the mean of its images'"]
    points = valid.get("operating_points") or {}
    if "sensitivity" in points:
        p = points["sensitivity"]
        lines.append(f"- Screening operating point (sensitivity >= {p['target']:.2f} on {short}): image threshold "
                     f"{figure(p['threshold'])}, study threshold {figure(p.get('study_threshold'))}")
    if cal:
        lines.append(f"- {calibration_words(cal, short)}; ECE over {cal['bins']} {cal['binning']}")
    return lines + [""]


def _metrics_section(reports: dict[str, dict]) -> list[str]:
    lines = ["## Performance", ""]
    rows = []
    for split, r in reports.items():
        for level in ("image", "study"):
            block = r.get(level)
            if not block:
                continue
            t = r["threshold"] if level == "image" else r.get("study_threshold")
            rows.append([split, level, str(block["n"]), figure(block["auroc"], block.get("auroc_ci")),
                         figure(block["kappa"], block.get("kappa_ci")), figure(block["sensitivity"]),
                         figure(block["specificity"]), figure(t)])
    lines += _table(["split", "level", "n", "AUROC [95% CI]", "kappa [95% CI]", "sensitivity", "specificity",
                     "threshold"], rows)
    unit = next((r.get("resampling_unit") for r in reports.values() if r.get("resampling_unit")), None)
    if unit:
        lines += ["", f"Intervals: percentile bootstrap, {unit.get('replicates')} replicates, resampling "
                  f"{unit.get('image')} (studies: {unit.get('study') or 'n/a'})."]
    cal_rows = [[s, figure(r["calibration"]["ece"]["uncalibrated"]), figure(r["calibration"]["ece"]["calibrated"]),
                 figure(r["calibration"]["nll"]["uncalibrated"]), figure(r["calibration"]["nll"]["calibrated"])]
                for s, r in reports.items() if r.get("calibration")]
    if cal_rows:
        lines += ["", *_table(["split", "ECE uncalibrated", "ECE calibrated", "NLL uncalibrated",
                               "NLL calibrated"], cal_rows)]
    split = "test" if "test" in reports else next(iter(reports))
    parts = reports[split].get("per_body_part") or {}
    if parts:
        lines += ["", f"Per body part ({split}):", "",
                  *_table(["body part", "n", "AUROC [95% CI]", "kappa [95% CI]", "study kappa [95% CI]"],
                          [[p, str(v["n"]), figure(v["auroc"], v.get("auroc_ci")),
                            figure(v["kappa"], v.get("kappa_ci")),
                            figure(v.get("study_kappa"), v.get("study_kappa_ci"))] for p, v in parts.items()])]
    baseline = reports[split].get("baseline")
    if baseline:
        lines += ["", f"MURA DenseNet-169 study kappa {baseline['study_kappa']['overall']:.3f} overall: "
                  f"{baseline['caveat']}."]
    return lines + [""]


def _explain_section(reports: dict[str, dict]) -> list[str]:
    split = "test" if (reports.get("test") or {}).get("explain") else next(
        (s for s, r in reports.items() if r.get("explain")), None)
    lines = ["## Explanations (Grad-CAM, Grad-CAM++, EigenCAM)", ""]
    if split is None:
        return lines + ["Not measured (evaluated with explain_images=0).", ""]
    block = reports[split]["explain"]
    rows = []
    for method, v in block["methods"].items():
        point = v.get("pointing_game") or {}
        rows.append([method, figure(v["road_combined"]["mean"]), figure(v["confidence_change"]["mean"]),
                     figure(v["randomisation"]["spearman_mean"]), "passes" if v["randomisation"]["passes"] else "FAILS",
                     "n/a" if not point else f"{point['pointing_game']:.2f} (chance {point['chance']:.2f})"])
    noise = block["noise_map"]
    rows.append(["noise map (reference)", figure(noise["road_combined"]["mean"]), figure(noise["confidence_change"]["mean"]),
                 "", "", ""])
    sample = block["sample"]
    lines += [f"On {sample['n_images']} {split} images (seed {sample['seed']}; ROAD on {sample['road_images']}, "
              f"percentiles {block['road_percentiles']}), each explained for {sample['explained_class']}; "
              f"scores in {sample['units']}.", "",
              *_table(["method", "ROAD", "confidence change", "Spearman vs random weights", "randomisation check",
                       "pointing game"], rows)]
    return lines + [""]


def _limits(reports: dict[str, dict], source: str) -> list[str]:
    lines = ["## Known limits", "",
             "- Thresholds and the temperature come from this run's valid split; another hospital, scanner or "
             "population needs its own validation before any number here applies to it.",
             "- Bootstrap intervals cover resampling of the evaluated split only, not a shift of site or case mix.",
             "- Grad-CAM-style maps are coarse (the last feature map's grid) and show where the model's evidence "
             "is, not why; a map on the bone is not proof of a correct reason.",
             "- The model sees one image at a time; MURA's study level averages views without reading them together."]
    for split, r in reports.items():
        for method, v in ((r.get("explain") or {}).get("methods") or {}).items():
            if not v["randomisation"]["passes"]:
                lines.append(f"- {method} failed the randomisation check on {split}: its maps from random weights "
                             f"correlate {v['randomisation']['spearman_mean']:.2f} (Spearman) with the trained "
                             "model's, so they show the image more than the model; do not read them as evidence.")
    if source == "synthetic":
        lines.append("- Trained and tested on synthetic phantoms: the figures show the pipeline works, not that "
                     "a model reads real X-rays.")
    if source == "fracatlas":
        lines.append("- FracAtlas has no patient ids: splits and intervals keep duplicate pictures together, "
                     "but two different pictures of one patient may still fall in different splits.")
    if source == "mura":
        lines.append("- MURA's labels are study-level reports, not per-image findings; the DenseNet-169 "
                     "baseline is on MURA's hidden test set, which this run cannot score.")
    return lines + [""]


def model_card(run_dir: str | Path) -> str:
    """The model card of a run, as Markdown, from the reports and files present."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    reports = {s: r for s in ("valid", "oof", "test") if (r := run.read_report(s))}
    # a CV run's operating point is its out-of-fold report's; a final fit's, the one its CV gave it
    point = reports.get("valid") or read_json(run.operating_point_file)
    meta = read_json(run.manifest_json) or {}
    source = meta.get("source") or next((r.get("source") for r in reports.values() if r.get("source")), "") or ""
    lines = [f"# Model card: {run_dir.name}", "",
             f"**Intended use: {INTENDED_USE}.** Not a medical device; no output of this model may inform the "
             "care of a patient.", ""]
    lines += _recipe_section(run, reports) + _data_section(run, reports, meta, source)
    lines += _operating_section(point)
    if reports:
        lines += _metrics_section(reports) + _explain_section(reports)
    lines += ["## Intended use", "",
              f"- {INTENDED_USE[0].upper() + INTENDED_USE[1:]}: learning how musculoskeletal X-ray classifiers are "
              "trained, evaluated and explained, and research on methods.",
              "- Out of scope: any clinical decision, triage or screening of real patients.", ""]
    lines += _limits(reports, source)
    lines.append(f"_Written by X-RAI {__version__} from the run folder's reports._")
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    """Write run_dir/model_card.md atomically; returns its path."""
    return RunFolder(run_dir).write_model_card(model_card(run_dir))
