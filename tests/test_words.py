"""The metrics and Grad-CAM in plain words: every topic present, every number the report's (issue 22)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from xrai.evaluate.report import calibration_words, choose_selection
from xrai.evaluate.run import evaluate_run, score_predictions
from xrai.evaluate.words import (
    MURA_ABNORMAL,
    NOT_FOR_DIAGNOSIS,
    gradcam_in_words,
    metrics_in_words,
    model_card_markdown,
)
from xrai.runs.layout import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")


def _predictions(n: int, seed: int) -> pd.DataFrame:
    """Scores that separate the classes imperfectly, grouped in patients and two-image studies."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 3 == 0).astype(int)  # prevalence one third
    logit = rng.normal(0.0, 1.0, n) + 1.6 * label + 0.7  # raw probabilities pushed up, as pos_weight does
    study = [f"s{i // 2}-{label[i]}" for i in range(n)]
    return pd.DataFrame({"path": [f"img{i}.png" for i in range(n)], "label": label, "logit": logit,
                         "probability": 0.0, "body_part": "wrist", "patient_id": [f"p{i // 4}" for i in range(n)],
                         "study_id": study})


def _reports(source: str) -> tuple[dict, dict]:
    valid, test = _predictions(300, 1), _predictions(360, 2)
    selection = choose_selection(valid)
    out = []
    for split, pred in (("valid", valid), ("test", test)):
        pred = pred.assign(probability=selection.calibration.apply(pred["logit"]))
        out.append(score_predictions(pred, selection, split=split, threshold_from="valid",
                                     checkpoint={"file": "checkpoints/best.pt", "sha256": "0" * 64},
                                     rows_attrs={"source": source, "split_method": "official"},
                                     audit={"cross_split_groups": 0, "cross_label_groups": 0}, tta=False,
                                     n_bootstrap=50, seed=0))
    return out[0], out[1]


@pytest.fixture(scope="module")
def mura() -> tuple[dict, dict]:
    return _reports("mura")


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+|\d+", text))


def test_every_topic_is_there_with_the_reports_numbers(mura):
    valid, test = mura
    text = metrics_in_words(valid, test)
    (tn, fp), (fn, tp) = test["image"]["confusion_matrix"]
    image, point = test["image"], test["operating_points"]["youden"]["image"]
    n, abnormal = tn + fp + fn + tp, fn + tp
    expected = [
        f"The test split holds {n} images: {abnormal} abnormal and {tn + fp} normal, a prevalence of "
        f"{abnormal / n:.1%}",
        f"at threshold {test['threshold']:.3f}",
        f"Of the {abnormal} abnormal test images the model called {tp} abnormal: sensitivity {image['sensitivity']:.2f}",
        f"Of the {tn + fp} normal test images it called {tn} normal: specificity {image['specificity']:.2f}",
        f"Of the {tp + fp} images it called abnormal, {tp} were: PPV (precision) {point['ppv']:.2f}",
        f"Of the {tn + fn} images it called normal, {tn} were: NPV {point['npv']:.2f}",
        f"**AUROC.** {image['auroc']:.3f} on test (95% interval {image['auroc_ci'][0]:.3f} to "
        f"{image['auroc_ci'][1]:.3f}), {valid['image']['auroc']:.3f} on valid",
        f"**Cohen's kappa.** {image['kappa']:.3f} at image level (95% interval {image['kappa_ci'][0]:.3f} to "
        f"{image['kappa_ci'][1]:.3f})",
        f"study threshold {test['study_threshold']:.3f}) kappa is {test['study']['kappa']:.3f}",
        f"over {test['study']['n']} studies",
        f"DenseNet-169 baseline reached a study-level kappa of {test['baseline']['study_kappa']['overall']:.3f}",
        test["baseline"]["caveat"],
        "**Why the threshold comes from valid.**",
        f"the validation split ({valid['image']['n']} images), never on test",
        MURA_ABNORMAL,
    ]
    for piece in expected:
        assert piece in text, piece
    for topic in ("Prevalence", "Sensitivity", "specificity", "PPV", "NPV", "AUROC", "kappa", "Youden",
                  "screening", "Calibration", "ECE", "reliability diagram", "Bootstrap", "resampled"):
        assert topic in text, topic


def test_youden_screening_calibration_and_bootstrap_figures(mura):
    valid, test = mura
    text = metrics_in_words(valid, test)
    youden, screen = test["operating_points"]["youden"], test["operating_points"]["sensitivity"]
    assert (f"largest on valid at threshold {youden['threshold']:.3f}; on test it gives sensitivity "
            f"{youden['image']['sensitivity']:.2f} and specificity {youden['image']['specificity']:.2f}") in text
    reached = valid["operating_points"]["sensitivity"]["image"]["sensitivity"]
    assert (f"reaches sensitivity {screen['target']:.2f} on valid: {screen['threshold']:.3f} (valid sensitivity "
            f"{reached:.2f}); on test it gives sensitivity {screen['image']['sensitivity']:.2f} and specificity "
            f"{screen['image']['specificity']:.2f}") in text
    fp = (youden["image"]["confusion_matrix"][0][1], screen["image"]["confusion_matrix"][0][1])
    assert f"at the cost of {fp[1]} false alarms instead of {fp[0]}" in text
    cal_v, cal_t = valid["calibration"], test["calibration"]
    assert calibration_words(cal_v) in text
    assert (f"on valid {cal_v['ece']['uncalibrated']:.3f} before and {cal_v['ece']['calibrated']:.3f} after "
            "(cross-fitted") in text
    assert f"on test {cal_t['ece']['uncalibrated']:.3f} before and {cal_t['ece']['calibrated']:.3f} after" in text
    unit = test["resampling_unit"]
    assert f"resampled {unit['replicates']} times with replacement" in text
    assert f"drew whole {unit['image']}, not single images" in text and unit["image"] == "patients"


def test_no_number_in_the_text_that_is_not_the_reports(mura):
    """Every number written is one of the reports' values in the text's format (or a fixed constant)."""
    valid, test = mura
    allowed = {"0", "1", "0.5", "95", "2017", "2018", "2022", "169", "04"}  # chance, perfect, years, names

    def collect(obj):
        if isinstance(obj, bool) or obj is None:
            return
        if isinstance(obj, (int, float)):
            obj = abs(obj)  # the text's "-" is not part of the number the pattern reads
            allowed.update({str(obj), f"{obj:.2f}", f"{obj:.3f}", f"{obj:.1f}"})
        elif isinstance(obj, dict):
            for v in obj.values():
                collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                collect(v)
        elif isinstance(obj, str):
            allowed.update(_numbers(obj))

    collect(valid)
    collect(test)
    (tn, fp), (fn, tp) = test["image"]["confusion_matrix"]
    allowed.update({str(fn + tp), str(tn + fp), str(tp + fp), str(tn + fn), f"{100 * (fn + tp) / (tn + fp + fn + tp):.1f}"})
    for text in (metrics_in_words(valid, test), metrics_in_words(valid, test, short=True)):
        stray = _numbers(text) - allowed
        assert not stray, f"numbers not from the reports: {sorted(stray)}"


def test_short_version_is_a_few_sentences_with_the_same_numbers(mura):
    valid, test = mura
    short = metrics_in_words(valid, test, short=True)
    sentences = [s for s in re.split(r"(?<=[.)])\s+(?=[A-Z])", short.strip()) if s]
    assert 4 <= len(sentences) <= 7, sentences  # five, plus MURA's meaning of "abnormal"
    (tn, fp), (fn, tp) = test["image"]["confusion_matrix"]
    assert f"called {tp} of the {fn + tp} abnormal images abnormal (sensitivity {test['image']['sensitivity']:.2f})" in short
    assert f"AUROC {test['image']['auroc']:.3f}" in short and f"kappa {test['image']['kappa']:.3f}" in short
    assert MURA_ABNORMAL in short and len(short) < len(metrics_in_words(valid, test)) / 2


def test_fracatlas_words_and_no_mura_baseline():
    valid, test = _reports("fracatlas")
    text = metrics_in_words(valid, test)
    (tn, fp), (fn, tp) = test["image"]["confusion_matrix"]
    assert f"Of the {fn + tp} fractured test images the model called {tp} fractured" in text
    assert f"Of the {tn + fp} not fractured test images it called {tn} not fractured" in text
    assert "abnormal" not in text and "DenseNet" not in text and MURA_ABNORMAL not in text


@pytest.fixture(scope="module")
def tested_run(evaluated_run, tmp_path_factory):
    """The session's evaluated run, copied, with its test split scored and its explanations measured."""
    run = shutil.copytree(evaluated_run, tmp_path_factory.mktemp("words") / "run")
    with pytest.warns(UserWarning, match="audit"):
        evaluate_run(run, split="test", progress=False, n_bootstrap=20, device="cpu", explain_images=4)
    return run


def test_words_from_a_real_run_folder(tested_run):
    folder = RunFolder(tested_run)
    valid, test = folder.read_report("valid"), folder.read_report("test")
    text = metrics_in_words(valid, test)
    assert f"at threshold {test['threshold']:.3f}" in text and "DenseNet" not in text


def test_gradcam_in_words_names_this_runs_layer_and_values(tested_run, evaluated_run):
    text = gradcam_in_words(tested_run)
    assert "gradient" in text and "ReLU" in text and "upsamples" in text
    assert "`backbone.features.18`: 1280 feature maps of 2 x 2 cells at the run's 64 px input" in text
    block = RunFolder(tested_run).read_report("test")["explain"]
    gradcam = block["methods"]["gradcam"]
    assert f"Grad-CAM scores {gradcam['road_combined']['mean']:.3f}" in text
    assert f"random noise {block['noise_map']['road_combined']['mean']:.3f}" in text
    assert f"maps is {gradcam['randomisation']['spearman_mean']:.3f}" in text
    assert ("passes" if gradcam["randomisation"]["passes"] else "FAILS") in text
    assert "marker" in text  # the shortcut to look for
    assert "Not measured" in gradcam_in_words(evaluated_run)  # no report_test.json there
    assert "Not measured" in gradcam_in_words(tested_run, split="valid")  # evaluated with explain_images=0


def test_model_card_markdown_puts_not_for_diagnosis_first(evaluated_run):
    card = model_card_markdown(evaluated_run)
    assert card.startswith(NOT_FOR_DIAGNOSIS)
    assert card.splitlines()[2].startswith("# Model card: ")
    assert "## Performance" in card
