"""A run's figures in plain words, for the notebooks: every number is read from the run's reports (none is
written by hand), so the text explains this run and no other.

- ``metrics_in_words(report_valid, report_test)``: prevalence; sensitivity, specificity, PPV and NPV at the
  chosen threshold with the counts behind them; AUROC; Cohen's kappa (and the study level, with MURA's
  DenseNet-169 baseline); why the threshold comes from valid; Youden's J against the screening point;
  calibration; bootstrap intervals and their resampling unit. ``short=True``: five sentences.
- ``gradcam_in_words(run_dir)``: what Grad-CAM computes, the layer it uses for this run's model, and how to
  read ROAD and the randomisation check with this run's values.
- ``model_card_markdown(run_dir)``: the model card with the not-for-diagnosis line first.

Markdown strings: a notebook shows them with ``IPython.display.Markdown``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xrai.config import TrainConfig
from xrai.evaluate.card import model_card
from xrai.evaluate.report import calibration_words
from xrai.labels import class_names
from xrai.models.factory import create_model, gradcam_layer
from xrai.runs.layout import RunFolder

__all__ = ["NOT_FOR_DIAGNOSIS", "gradcam_in_words", "metrics_in_words", "model_card_markdown", "rate", "score"]

NOT_FOR_DIAGNOSIS = ("**Not for diagnosis.** This model is for research and teaching only: it is not a medical "
                     "device, and no output of it may inform the care of a patient.")
MURA_ABNORMAL = ("On MURA, *abnormal* is any abnormality the radiologist reported (fractures, hardware, "
                 "degenerative joint disease, lesions and more), not only fractures.")


def rate(value: float | None) -> str:
    """A proportion as the text shows it: two decimals ("undefined" for None)."""
    return "undefined" if value is None else f"{value:.2f}"


def score(value: float | None) -> str:
    """A score (AUROC, kappa, threshold, ECE) as the text shows it: three decimals ("undefined" for None)."""
    return "undefined" if value is None else f"{value:.3f}"


def _ci(interval: Any) -> str:
    return "" if not interval else f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})"


def _counts(block: dict[str, Any]) -> dict[str, int]:
    (tn, fp), (fn, tp) = block["confusion_matrix"]
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def _names(*reports: dict[str, Any]) -> tuple[str, str, str | None]:
    source = next((r.get("source") for r in reports if r.get("source")), None)
    negative, positive = class_names(source)
    return negative, positive, source


def _primary(report: dict[str, Any]) -> dict[str, Any]:
    """The image block of the primary operating point (with PPV and NPV), or the report's image block."""
    method = report.get("threshold_method", "youden")
    point = (report.get("operating_points") or {}).get(method) or {}
    return point.get("image") or report["image"]


def _prevalence(test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    c, negative, positive = _counts(test["image"]), names[0], names[1]
    n, abnormal = sum(c.values()), c["fn"] + c["tp"]
    text = (f"**Prevalence.** The test split holds {n} images: {abnormal} {positive} and {n - abnormal} {negative}, "
            f"a prevalence of {abnormal / n:.1%}. PPV and NPV below depend on it: on a population with fewer "
            f"{positive} images the same model has a lower PPV and a higher NPV.")
    return text + (f" {MURA_ABNORMAL}" if names[2] == "mura" else "")


def _decisions(test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    c, negative, positive = _counts(test["image"]), names[0], names[1]
    block, image = _primary(test), test["image"]
    return (f"**Sensitivity, specificity, PPV and NPV at threshold {score(test['threshold'])}.** An image is called "
            f"{positive} when its calibrated probability is at least {score(test['threshold'])}. "
            f"Of the {c['fn'] + c['tp']} {positive} test images the model called {c['tp']} {positive}: "
            f"sensitivity {rate(image['sensitivity'])} (it missed {c['fn']}). "
            f"Of the {c['tn'] + c['fp']} {negative} test images it called {c['tn']} {negative}: specificity "
            f"{rate(image['specificity'])} ({c['fp']} false alarms). "
            f"Of the {c['tp'] + c['fp']} images it called {positive}, {c['tp']} were: PPV (precision) "
            f"{rate(block.get('ppv'))}. Of the {c['tn'] + c['fn']} images it called {negative}, {c['tn']} were: NPV "
            f"{rate(block.get('npv'))}.")


def _auroc(valid: dict[str, Any], test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    image = test["image"]
    return (f"**AUROC.** {score(image['auroc'])} on test{_ci(image.get('auroc_ci'))}, "
            f"{score(valid['image']['auroc'])} on valid: the chance that a randomly chosen {names[1]} image scores "
            f"higher than a randomly chosen {names[0]} one (0.5 is a coin toss, 1 a perfect ranking). It does not "
            "depend on the threshold: it grades the ranking, the threshold then picks one point on the ROC curve.")


def _kappa(test: dict[str, Any]) -> str:
    image = test["image"]
    text = (f"**Cohen's kappa.** {score(image['kappa'])} at image level{_ci(image.get('kappa_ci'))}: the "
            "agreement between the model's calls and the labels beyond the agreement chance alone would give "
            "at these rates (0 is chance, 1 perfect agreement); unlike accuracy it is not flattered by a "
            "large majority class.")
    study = test.get("study")
    if study:
        text += (f" At study level (a study's probability is the mean of its images', called at the study "
                 f"threshold {score(test.get('study_threshold'))}) kappa is {score(study['kappa'])}"
                 f"{_ci(study.get('kappa_ci'))} over {study['n']} studies.")
    baseline = test.get("baseline")
    if baseline:
        text += (f" MURA's DenseNet-169 baseline reached a study-level kappa of "
                 f"{score(baseline['study_kappa']['overall'])} ({baseline['reference']}); {baseline['caveat']}.")
    return text


def _from_valid(valid: dict[str, Any], test: dict[str, Any]) -> str:
    oof = valid.get("threshold_from") == "oof" or test.get("threshold_from") == "oof"
    where = ("the out-of-fold predictions of the cross-validation" if oof
             else f"the validation split ({valid['image']['n']} images)")
    return (f"**Why the threshold comes from valid.** The threshold {score(test['threshold'])} and the calibration "
            f"were chosen on {where}, never on test. Chosen on test, they would be tuned to the very images they "
            "are judged on and every test figure would be optimistic; test only applies them, as a new hospital "
            "would.")


def _points(valid: dict[str, Any], test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    points, valid_points = test.get("operating_points") or {}, valid.get("operating_points") or {}
    if "youden" not in points or "sensitivity" not in points:
        return "**Youden's J and the screening point.** Not in this report."
    youden, screen = points["youden"], points["sensitivity"]
    reached = ((valid_points.get("sensitivity") or {}).get("image") or {}).get("sensitivity")
    fp_youden, fp_screen = _counts(youden["image"])["fp"], _counts(screen["image"])["fp"]
    fn_youden, fn_screen = _counts(youden["image"])["fn"], _counts(screen["image"])["fn"]
    return (f"**Youden's J against the screening point.** Youden's J (sensitivity + specificity - 1) is largest on "
            f"valid at threshold {score(youden['threshold'])}; on test it gives sensitivity "
            f"{rate(youden['image']['sensitivity'])} and specificity {rate(youden['image']['specificity'])}. "
            f"The screening point is the highest threshold that reaches sensitivity {rate(screen['target'])} on "
            f"valid: {score(screen['threshold'])} (valid sensitivity {rate(reached)}); on test it gives sensitivity "
            f"{rate(screen['image']['sensitivity'])} and specificity {rate(screen['image']['specificity'])}. "
            f"A screening tool takes the second: it misses {fn_screen} {names[1]} test images instead of "
            f"{fn_youden}, at the cost of {fp_screen} false alarms instead of {fp_youden}.")


def _calibration(valid: dict[str, Any], test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    cal_valid, cal_test = valid.get("calibration") or {}, test.get("calibration") or {}
    if not cal_valid or "ece" not in cal_valid:
        return "**Calibration.** Not in this report."
    text = (f"**Calibration.** {calibration_words(cal_valid)}. ECE (expected calibration error, over "
            f"{cal_valid.get('bins', 15)} equal-width bins: the mean gap between the predicted probability and the "
            f"observed fraction of {names[1]} images, weighted by the images per bin) on valid "
            f"{score(cal_valid['ece']['uncalibrated'])} before and {score(cal_valid['ece']['calibrated'])} after "
            "(cross-fitted: each image calibrated by a fit that never saw it)")
    if cal_test.get("ece"):
        text += (f", on test {score(cal_test['ece']['uncalibrated'])} before and "
                 f"{score(cal_test['ece']['calibrated'])} after")
    fix = ("the calibration undoes that. It keeps the order of the scores, so AUROC and the images on each side "
           "of a threshold stay the same." if cal_valid.get("applied") else
           "here the fit did not lower valid's cross-fitted NLL, so the probabilities shown are the raw ones.")
    return text + (f". The reliability diagram (reliability_test.png) plots, per bin, the fraction of {names[1]} "
                   "images against the mean predicted probability: on the diagonal the probabilities can be read "
                   "as frequencies; below it the model is over-confident, above it under-confident. Training "
                   f"weights the {names[1]} class, which pushes raw probabilities up; {fix}")


def _bootstrap(test: dict[str, Any]) -> str:
    unit = test.get("resampling_unit") or {}
    if not unit.get("replicates"):
        return ("**Bootstrap intervals.** Not in this report (evaluated without a bootstrap, or before reports "
                "recorded their resampling unit).")
    replicates, images, studies = unit["replicates"], unit.get("image") or "images", unit.get("study")
    text = (f"**Bootstrap intervals.** The ranges in brackets are 95% percentile bootstrap intervals: the test "
            f"split was resampled {replicates} times with replacement, each metric recomputed on every resample, and "
            f"the middle 95% of the results kept. Each resample drew whole {images}, not single images, so "
            "images that belong together go in or out together and the interval is not falsely narrow")
    text += f" (study-level figures resampled {studies})." if studies else "."
    return text + (" An interval covers the luck of which images ended up in test, not a change of hospital, "
                   "scanner or population.")


def metrics_in_words(report_valid: dict[str, Any], report_test: dict[str, Any], *, short: bool = False) -> str:
    """Markdown explaining a run's metrics with its own numbers (all read from the two reports).

    Args:
        report_valid: report_valid.json (or a CV run's report_oof.json): where the threshold, the
            calibration and the screening point were chosen.
        report_test: report_test.json: the figures explained.
        short: five sentences (prevalence, sensitivity and specificity with their counts, AUROC, kappa,
            where the threshold came from) instead of the full text.
    """
    names = _names(report_test, report_valid)
    if short:
        return _short(report_valid, report_test, names)
    sections = [_prevalence(report_test, names), _decisions(report_test, names),
                _auroc(report_valid, report_test, names), _kappa(report_test), _from_valid(report_valid, report_test),
                _points(report_valid, report_test, names), _calibration(report_valid, report_test, names),
                _bootstrap(report_test)]
    return "\n\n".join(sections) + "\n"


def _short(valid: dict[str, Any], test: dict[str, Any], names: tuple[str, str, str | None]) -> str:
    c, image, (negative, positive, source) = _counts(test["image"]), test["image"], names
    n, abnormal = sum(c.values()), c["fn"] + c["tp"]
    sentences = [
        f"The test split holds {n} images, {abnormal} of them {positive} (prevalence {abnormal / n:.1%}).",
        f"At threshold {score(test['threshold'])}, chosen on valid and never on test, the model called {c['tp']} "
        f"of the {abnormal} {positive} images {positive} (sensitivity {rate(image['sensitivity'])}) and "
        f"{c['tn']} of the {n - abnormal} {negative} images {negative} (specificity {rate(image['specificity'])}).",
        f"Of the {c['tp'] + c['fp']} images it called {positive}, {c['tp']} were (PPV "
        f"{rate(_primary(test).get('ppv'))}).",
        f"AUROC {score(image['auroc'])}{_ci(image.get('auroc_ci'))} grades its ranking whatever the threshold "
        "(0.5 is chance), and Cohen's kappa "
        f"{score(image['kappa'])} its agreement with the labels beyond chance (0 is chance, 1 perfect).",
        "Notebook 04 explains each figure, the calibration and the intervals in full.",
    ]
    if source == "mura":
        sentences.insert(1, MURA_ABNORMAL)
    return " ".join(sentences) + "\n"


# ---- Grad-CAM -----------------------------------------------------------------------------------


def _layer(config: TrainConfig) -> tuple[str, int, tuple[int, int]]:
    """(module name, channels, spatial size) of the Grad-CAM layer of the run's architecture at its input size."""
    model = create_model(config.model, pretrained=False, head=config.head, dropout=config.dropout).eval()
    layer = gradcam_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    seen: list[tuple[int, ...]] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, config.image_size, config.image_size))
    finally:
        hook.remove()
    return name, int(seen[-1][1]), (int(seen[-1][2]), int(seen[-1][3]))


def _road_words(report: dict[str, Any] | None, split: str) -> str:
    block = (report or {}).get("explain")
    if not block:
        why = f"report_{split}.json is not there" if report is None else "it was evaluated with explain_images=0"
        return (f"**ROAD and the randomisation check on this run.** Not measured ({why}; "
                f"`python -m xrai evaluate --split {split}` measures them).")
    gradcam, noise, sample = block["methods"].get("gradcam") or {}, block["noise_map"], block["sample"]
    if not gradcam:
        return "**ROAD and the randomisation check on this run.** Not measured for Grad-CAM."
    road, random = gradcam["road_combined"]["mean"], gradcam["randomisation"]
    verdict = ("passes: the maps depend on what the model learned" if random["passes"] else
               "FAILS: the maps barely depend on the weights, so they show the image more than the model; do not "
               "read them as evidence")
    return (f"**ROAD and the randomisation check on this run** ({sample['n_images']} {split} images, seed "
            f"{sample['seed']}). ROAD (Rong et al. 2022) removes the pixels the map ranks most relevant and, "
            "separately, the least relevant (at several percentiles), and compares how much the model's logit for "
            "the explained class falls: higher means the map points at pixels the model really uses. Grad-CAM "
            f"scores {score(road)}, a map of random noise {score(noise['road_combined']['mean'])}: a map is only "
            "informative where it beats the noise. The randomisation check (Adebayo et al. 2018) draws the maps "
            "again with randomly initialised weights; their Spearman rank correlation with the trained model's "
            f"maps is {score(random['spearman_mean'])} (a method fails at 0.5 or above): Grad-CAM {verdict}.")


def gradcam_in_words(run_dir: str | Path, split: str = "test") -> str:
    """Markdown on what Grad-CAM computes, the layer it uses for this run's model (name, channels and
    spatial size at the run's input size) and this run's ROAD and randomisation figures from
    report_<split>.json ("not measured" where absent).

    Raises:
        FileNotFoundError: the run folder has no config.json.
    """
    folder = RunFolder(run_dir)
    if not folder.config_json.is_file():
        raise FileNotFoundError(f"no {folder.config_json.name} in {folder.path}: not a run folder (notebooks/03_train"
                                f".ipynb or `python -m xrai train --out {folder.path}` makes one)")
    config = TrainConfig.from_json(folder.config_json)
    name, channels, (h, w) = _layer(config)
    size = config.image_size
    positive = folder.class_names()[1]
    what = (f"**What Grad-CAM computes.** Grad-CAM (Selvaraju et al. 2017) takes the feature maps of the last "
            f"convolutional block, weights each map by the mean gradient of the {positive} logit with respect to it "
            "(how much that map pushes the score up), sums the weighted maps, keeps the positive part (ReLU) and "
            "upsamples the result to the image. Red is where evidence for the explained class lies; it says where, "
            "not why, and a map on the bone is no proof of a correct reason.")
    layer = (f"**The layer for this run.** {config.model} explains `{name}`: {channels} feature maps of {h} x {w} "
             f"cells at the run's {size} px input, so each cell covers about {size // max(h, 1)} px of the model's "
             "input; finer detail than a cell cannot show in the map.")
    shortcut = ("**Shortcuts to look for.** A map that lights up a side marker (the L/R letter), burnt-in text, a "
                "ruler, a cast or plaster, or metal hardware is a warning: the model may score what comes with "
                f"{positive} images in this dataset rather than the bone itself.")
    return "\n\n".join([what, layer, _road_words(folder.read_report(split), split), shortcut]) + "\n"


def model_card_markdown(run_dir: str | Path) -> str:
    """The run's model card (``xrai.evaluate.card.model_card``, made from the reports on disk) with the
    not-for-diagnosis line first."""
    return f"{NOT_FOR_DIAGNOSIS}\n\n{model_card(run_dir)}"
