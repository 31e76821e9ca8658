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
    sel = choose_selection(pred, method="youden", target=0.95, calibration="temperature")
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
    sel = choose_selection(pred, calibration="temperature")
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


# ---- Platt scaling: a calibrator that shifts as well as scales (issue 25) -------------------------


def _shifted(n: int = 20_000, shift: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits every one of which is ``shift`` too high (BCE pos_weight e^shift does this): the true
    probability is sigmoid(z - shift), about 18% abnormal at shift 1.5."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < expit(z - shift)).astype(int)
    return z, y


def test_platt_recovers_a_shift_that_temperature_cannot():
    from xrai.evaluate.calibration import choose_calibration, fit_platt

    z, y = _shifted()
    a, b = fit_platt(z, y)
    assert 0.93 < a < 1.07 and -1.65 < b < -1.35
    platt, applied, cross = choose_calibration(z, y, "platt")
    assert applied and platt.method == "platt" and (platt.slope, platt.intercept) == (a, b)
    assert cross["ece"]["calibrated"] < 0.02 and cross["ece"]["uncalibrated"] > 0.15 and cross["folds"] == 5
    temp, _, t_cross = choose_calibration(z, y, "temperature")
    assert temp.intercept == 0 and t_cross["ece"]["calibrated"] > 0.15  # scaling alone cannot move the mean
    assert cross["nll"]["calibrated"] < t_cross["nll"]["calibrated"]
    assert abs(platt.apply(z).mean() - y.mean()) < 0.01 < abs(temp.apply(z).mean() - y.mean())


def test_platt_is_finite_and_keeps_the_order_on_a_separable_set():
    from xrai.evaluate.calibration import fit_platt

    z = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    a, b = fit_platt(z, [0, 0, 0, 1, 1, 1])  # Platt's smoothed targets: a finite slope
    assert 0 < a < 5 and np.isfinite(b)
    a, _ = fit_platt(z, [1, 1, 0, 1, 0, 0])  # logits that rank backwards: the slope stays > 0
    assert a > 0
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(z, [1] * 6)


def test_calibration_is_not_applied_where_it_does_not_lower_the_cross_fitted_nll():
    # already calibrated: at each of 7 logits exactly round(40 * sigmoid(z)) of 40 images are abnormal,
    # so a fit on 4/5 of them only adds noise to the held-out fifth
    levels = np.linspace(-3, 3, 7)
    z = np.repeat(levels, 40)
    y = np.concatenate([(np.arange(40) < round(40 * expit(v))).astype(int) for v in levels])
    pred = pd.DataFrame({"path": [f"{i}.png" for i in range(z.size)], "label": y, "logit": z, "body_part": "hand",
                         "patient_id": "", "study_id": ""})
    sel = choose_selection(pred)
    assert not sel.calibrated and sel.calibration.is_identity and sel.fitted.method == "platt"
    assert sel.source == "valid" and sel.temperature == 1.0
    pred = pred.assign(probability=sel.calibration.apply(z))
    np.testing.assert_allclose(pred["probability"], expit(z))  # the raw probability, never a worse one
    block = calibration_block(pred, sel)
    assert block["applied"] is False and "not calibrated" in block["note"]
    assert block["ece"]["calibrated"] == block["ece"]["uncalibrated"]
    assert block["nll"]["calibrated"] == block["nll"]["uncalibrated"]
    assert block["cross_fitted_candidate"]["nll"] >= block["nll"]["uncalibrated"]
    report = {"threshold": sel.threshold, "threshold_from": "valid", "calibration": block}
    from xrai.evaluate.report import calibration_words
    from xrai.runs.operating import OperatingPoint

    point = OperatingPoint.from_report(report, "report_valid.json")
    assert not point.calibrated and point.calibration.is_identity
    np.testing.assert_allclose(point.calibrate(z), expit(z))
    assert calibration_words(block).startswith("Not calibrated")


def test_platt_selection_round_trips_and_reports_cross_fitted_figures_on_valid_only():
    z, y = _shifted(n=2000, seed=5)
    pred = pd.DataFrame({"path": [f"{i}.png" for i in range(len(y))], "label": y, "logit": z,
                         "body_part": "hand", "patient_id": "", "study_id": ""})
    sel = choose_selection(pred)  # Platt by default
    assert sel.calibrated and sel.calibration.method == "platt" and sel.calibration.intercept < -1
    pred = pred.assign(probability=sel.calibration.apply(z))
    block = calibration_block(pred, sel)
    assert block["method"] == "platt" and "temperature" not in block and block["applied"]
    assert block["slope"] == sel.calibration.slope and block["intercept"] == sel.calibration.intercept
    assert block["figures"].startswith("cross-fitted") and block["ece"]["calibrated"] < 0.05
    assert block["ece"]["uncalibrated"] > 0.15 and set(block["in_sample"]) == {"ece", "nll", "brier"}
    report = {"threshold": sel.threshold, "threshold_from": "valid", "threshold_method": "youden",
              "operating_points": operating_points(pred, sel), "calibration": block}
    back = selection_from_report(json_round_trip(report))
    assert back.calibration == sel.calibration and back.calibrated and back.cross_fitted is None
    # another split (here a fresh sample) gets plain before / after figures with valid's calibrator
    z2, y2 = _shifted(n=2000, seed=6)
    other = pd.DataFrame({"path": [f"{i}.png" for i in range(len(y2))], "label": y2, "logit": z2,
                          "body_part": "hand", "patient_id": "", "study_id": ""})
    test_block = calibration_block(other.assign(probability=back.calibration.apply(z2)), back)
    assert test_block["figures"].startswith("plain") and test_block["slope"] == block["slope"]
    assert test_block["ece"]["calibrated"] < 0.05 < test_block["ece"]["uncalibrated"]


def json_round_trip(obj):
    import json

    return json.loads(json.dumps(obj, allow_nan=False))


def test_old_reports_with_only_a_temperature_still_load():
    from xrai.runs.operating import Calibration, OperatingPoint

    old = {"threshold": 0.4, "threshold_from": "valid", "checkpoint": {"sha256": "ab"},
           "calibration": {"method": "temperature scaling (one T on the logit, NLL minimised on valid by a "
                                     "bounded 1-D search)", "temperature": 2.0, "applied": True, "fitted_on": "valid"}}
    point = OperatingPoint.from_report(old, "report_valid.json")
    assert point.calibration == Calibration("temperature", 0.5, 0.0) and point.temperature == 2.0
    z = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(point.calibrate(z), apply_temperature(z, 2.0))
    sel = selection_from_report(old)
    assert sel.temperature == 2.0 and sel.calibrated and sel.calibration.method == "temperature"
    from xrai.evaluate.report import calibration_table, calibration_words

    assert calibration_words(old["calibration"]) == "Temperature scaling: T = 2.000 fitted on valid"
    no_cal = OperatingPoint.from_report({"threshold": 0.5}, "report_valid.json")
    assert no_cal.calibration.is_identity and no_cal.temperature == 1.0
    old_full = {**old, "split": "valid", "calibration": {**old["calibration"], "ece": {"uncalibrated": 0.2, "calibrated": 0.1},
                                                         "nll": {"uncalibrated": 1, "calibrated": 0.9},
                                                         "brier": {"uncalibrated": 0.3, "calibrated": 0.2}}}
    row = calibration_table(old_full).loc["valid"]
    assert row["method"] == "temperature" and row["slope"] == 0.5 and row["intercept"] == 0.0


@pytest.mark.parametrize("section, field", [
    ({"method": "platt", "slope": float("nan"), "intercept": 0.0, "applied": True}, "slope"),
    ({"method": "platt", "slope": -1.0, "intercept": 0.0, "applied": True}, "slope"),
    ({"method": "platt", "slope": 0.0, "intercept": 0.0, "applied": True}, "slope"),
    ({"method": "platt", "slope": 1.0, "intercept": float("inf"), "applied": True}, "intercept"),
    ({"method": "platt", "slope": 1.0, "intercept": "x", "applied": True}, "intercept"),
    ({"method": "platt", "slope": 1.0, "applied": True}, "intercept"),
    ({"method": "platt", "slope": float("inf"), "intercept": 0.0, "applied": False}, "slope"),
    ({"method": "magic", "slope": 1.0, "intercept": 0.0, "applied": True}, "method"),
    ({"method": "temperature", "slope": 0.5, "intercept": 1.0, "applied": True}, "intercept"),
    ({"temperature": float("inf"), "applied": True}, "temperature"),
    ({"temperature": -2.0, "applied": True}, "temperature"),
])
def test_a_damaged_calibration_names_the_file_and_field(section, field):
    from xrai.runs.operating import OperatingPoint, OperatingPointError

    with pytest.raises(OperatingPointError, match=rf"report_valid\.json.*{field}"):
        OperatingPoint.from_report({"threshold": 0.5, "calibration": section}, "report_valid.json")


def test_calibration_applies_slope_and_intercept_and_states_itself():
    from xrai.runs.operating import Calibration

    z = np.array([-2.0, 0.0, 3.0])
    platt = Calibration("platt", 0.8, -1.5)
    np.testing.assert_allclose(platt.apply(z), expit(0.8 * z - 1.5))
    assert platt.to_dict() == {"method": "platt", "slope": 0.8, "intercept": -1.5}
    temp = Calibration.from_temperature(2.5)
    np.testing.assert_allclose(temp.apply(z), apply_temperature(z, 2.5))
    assert temp.to_dict()["temperature"] == pytest.approx(2.5) and temp.temperature == pytest.approx(2.5)
    assert Calibration.from_temperature(1.0).is_identity
    for bad in ({"slope": 0.0}, {"slope": float("nan")}, {"intercept": float("inf")}):
        with pytest.raises(ValueError):
            Calibration("platt", **{"slope": 1.0, "intercept": 0.0, **bad})
    with pytest.raises(ValueError, match="unknown calibration"):
        choose_selection(pd.DataFrame({"label": [0, 1], "logit": [0.0, 1.0]}), calibration="isotonic")
