"""Temperature scaling, ECE and the operating points chosen on valid (image and study level)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from xrai.evaluate.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from xrai.evaluate.report import (
    calibration_block,
    choose_selection,
    operating_points,
    selection_from_report,
)
from xrai.runs.operating import apply_temperature


def _overconfident(n: int = 20_000, temperature: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probability is sigmoid(z / temperature): a model that is too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.random(n) < expit(z / temperature)).astype(int)
    return z, y


def test_fit_temperature_recovers_the_true_temperature():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert 2.3 < t < 2.7
    summary = calibration_summary(y, z, t)
    assert summary["ece"]["calibrated"] < 0.02 < summary["ece"]["uncalibrated"]
    assert summary["nll"]["calibrated"] < summary["nll"]["uncalibrated"]
    assert summary["brier"]["calibrated"] < summary["brier"]["uncalibrated"]
    assert summary["bins"] == 15 and "equal-width" in summary["binning"]
    # a calibrated model keeps T near 1
    z2 = z / 2.5
    assert 0.9 < fit_temperature(z2, y) < 1.1


def test_fit_temperature_refuses_one_class():
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1.0, 2.0, 3.0], [1, 1, 1])


def test_ece_by_hand():
    # two bins: [0, .5) holds p = .1, .2 (labels 0, 1): gap |.15 - .5| = .35, weight 2/4;
    # [.5, 1] holds p = .9, 1.0 (labels 1, 1): gap |.95 - 1| = .05, weight 2/4
    y, p = [0, 1, 1, 1], [0.1, 0.2, 0.9, 1.0]
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)
    bins = reliability_bins(y, p, n_bins=2)
    assert bins["n"].tolist() == [2, 2]  # p = 1.0 falls in the last, closed bin
    assert bins["fraction_abnormal"].tolist() == [0.5, 1.0]


def test_apply_temperature_is_monotonic_and_checks_t():
    z = np.linspace(-30, 30, 61)
    p = apply_temperature(z, 3.0)
    assert np.all(np.diff(p) > 0) and np.isfinite(p).all()
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(z, 0.0)


def _studies(seed: int = 1) -> pd.DataFrame:
    """Valid predictions of 120 studies of 1-4 views where the study threshold and the image one differ:
    abnormal studies have one clearly abnormal view among normal-looking ones, so their means are low."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(120):
        label = int(s % 3 == 0)
        views = rng.integers(1, 5)
        for v in range(views):
            z = rng.normal(3.0 if (label and v == 0) else -1.5, 1.0)
            rows.append({"path": f"s{s}/v{v}.png", "label": label, "logit": z, "body_part": "wrist",
                         "patient_id": f"p{s}", "study_id": f"s{s}"})
    return pd.DataFrame(rows)


def test_study_threshold_is_chosen_on_study_means():
    pred = _studies()
    sel = choose_selection(pred, method="youden", target=0.95)
    assert sel.source == "valid" and sel.calibrated and sel.temperature > 0
    assert set(sel.image) == {"youden", "sensitivity"} and set(sel.study) == {"youden", "sensitivity"}
    assert sel.threshold == sel.image["youden"] and sel.study_threshold == sel.study["youden"]
    assert sel.study_threshold < sel.threshold  # diluted study means need a lower cut
    pred = pred.assign(probability=apply_temperature(pred["logit"], sel.temperature))
    points = operating_points(pred, sel)
    assert points["sensitivity"]["image"]["sensitivity"] >= 0.95
    assert points["sensitivity"]["study"]["sensitivity"] >= 0.95
    assert points["sensitivity"]["target"] == 0.95
    # applying the image threshold to study means (what X-RAI did before) does worse on studies
    from xrai.evaluate.metrics import study_level

    s = study_level(pred)
    own = points["youden"]["study"]["kappa"]
    borrowed = pd.Series((s["probability"] >= sel.threshold).astype(int))
    from sklearn.metrics import cohen_kappa_score

    assert own > cohen_kappa_score(s["label"], borrowed)


def test_selection_round_trips_through_a_report_and_keeps_the_uncalibrated_figures():
    pred = _studies()
    sel = choose_selection(pred)
    pred = pred.assign(probability=apply_temperature(pred["logit"], sel.temperature))
    block = calibration_block(pred, sel)
    assert block["fitted_on"] == "valid" and block["applied"] and block["temperature"] == sel.temperature
    assert {"uncalibrated", "calibrated"} == set(block["ece"])
    # temperature scaling is monotonic: the image-level decisions are the same either way
    uncal = block["uncalibrated"]["image"]
    cal = operating_points(pred, sel)["youden"]["image"]
    assert uncal["confusion_matrix"] == cal["confusion_matrix"]
    report = {"threshold": sel.threshold, "study_threshold": sel.study_threshold, "threshold_from": "valid",
              "threshold_method": "youden", "operating_points": operating_points(pred, sel), "calibration": block}
    back = selection_from_report(report)
    assert back.image == sel.image and back.study == sel.study
    assert back.temperature == sel.temperature and back.raw_image == sel.raw_image


def test_one_class_valid_falls_back_with_warnings():
    pred = pd.DataFrame({"path": list("abc"), "label": [1, 1, 1], "logit": [0.1, 2.0, -1.0],
                         "body_part": "hand", "patient_id": "", "study_id": ""})
    with pytest.warns(UserWarning, match="one class"):
        sel = choose_selection(pred)
    assert sel.source == "default" and not sel.calibrated and sel.temperature == 1.0
    assert sel.threshold == 0.5 and sel.study is None
