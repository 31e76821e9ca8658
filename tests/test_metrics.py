"""Metrics against hand-computed cases, the bootstrap, the threshold, the pointing game."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _checks import strict_warnings
from scipy.stats import norm
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from xrai.evaluate.metrics import (
    METRIC_KEYS,
    MURA_BASELINE,
    bootstrap_ci,
    bootstrap_weights,
    cam_mass_in_mask,
    choose_threshold,
    classification_report,
    compute_metrics,
    kappa_score,
    mura_baseline,
    pointing_chance,
    pointing_game,
    resampling_groups,
    study_level,
)


def mura_style() -> pd.DataFrame:
    """Three studies of 2-3 images (MURA-style ids), worked by hand below at threshold 0.5.

    S1 wrist, patient P1, abnormal: 0.9, 0.7       -> study prob 0.8    -> predicted 1 (TP)
    S2 wrist, patient P2, normal:   0.2, 0.6, 0.35 -> study prob 0.3833 -> predicted 0 (TN)
    S3 elbow, patient P3, abnormal: 0.3, 0.5       -> study prob 0.4    -> predicted 0 (FN)
    """
    return pd.DataFrame({
        "path": [f"/x/img{i}.png" for i in range(7)],
        "probability": [0.9, 0.7, 0.2, 0.6, 0.35, 0.3, 0.5],
        "label": [1, 1, 0, 0, 0, 1, 1],
        "body_part": ["wrist"] * 5 + ["elbow"] * 2,
        "patient_id": ["P1", "P1", "P2", "P2", "P2", "P3", "P3"],
        "study_id": ["S1", "S1", "S2", "S2", "S2", "S3", "S3"],
    })


def test_image_metrics_by_hand():
    df = mura_style()
    m = compute_metrics(df["label"], df["probability"], 0.5)
    assert tuple(m) == METRIC_KEYS
    # predictions at 0.5: [1,1,0,1,0,0,1] -> TP 3 (img0, img1, img6), FN 1 (img5), TN 2 (img2, img4), FP 1 (img3)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    # kappa: po = 5/7; pe = (4/7)(4/7) + (3/7)(3/7) = 25/49 -> (35/49 - 25/49) / (24/49) = 10/24
    assert m["kappa"] == pytest.approx(5 / 12)
    # AUROC: 12 pos-neg pairs; 0.9 beats 3, 0.7 beats 3, 0.5 beats 2 (0.2, 0.35), 0.3 beats 1 (0.2) -> 9/12
    assert m["auroc"] == pytest.approx(0.75)
    # AP: ranked 0.9+ 0.7+ 0.6- 0.5+ 0.35- 0.3+ 0.2- -> (1/1 + 2/2 + 3/4 + 4/6) / 4
    assert m["average_precision"] == pytest.approx((1 + 1 + 0.75 + 4 / 6) / 4)
    assert m["auroc_ci"] is None and m["kappa_ci"] is None  # no bootstrap asked


def test_study_level_by_hand():
    s = study_level(mura_style())
    assert s["study_id"].tolist() == ["S1", "S2", "S3"]
    assert s["probability"].tolist() == pytest.approx([0.8, 1.15 / 3, 0.4])
    assert s["label"].tolist() == [1, 0, 1]
    assert s["n_images"].tolist() == [2, 3, 2]
    assert s["body_part"].tolist() == ["wrist", "wrist", "elbow"]
    m = compute_metrics(s["label"], s["probability"], 0.5)
    # predictions 1, 0, 0: TP 1, TN 1, FN 1; po = 2/3, pe = (1/3)(2/3) + (2/3)(1/3) = 4/9 -> (2/9) / (5/9)
    assert m["confusion_matrix"] == [[1, 0], [1, 1]]
    assert m["kappa"] == pytest.approx(0.4)
    # AUROC: both abnormal studies (0.8, 0.4) outrank the normal one (0.383), although an image of the
    # normal study (0.6) outranks one of S3 (0.3, 0.5): aggregation matters -> 2 / 2
    assert m["auroc"] == pytest.approx(1.0)


def test_per_body_part_by_hand():
    from xrai.evaluate.run import per_body_part

    parts = per_body_part(mura_style(), 0.5)
    assert list(parts) == ["elbow", "wrist"]
    wrist, elbow = parts["wrist"], parts["elbow"]
    assert wrist["n"] == 5 and elbow["n"] == 2
    assert wrist["auroc"] == pytest.approx(1.0)  # 0.9, 0.7 above 0.2, 0.6, 0.35
    # wrist images: labels 1 1 0 0 0, predicted 1 1 0 1 0: po 4/5, pe (3/5)(2/5) + (2/5)(3/5) = 12/25 -> 8/13
    assert wrist["kappa"] == pytest.approx(8 / 13)
    assert wrist["study_kappa"] == pytest.approx(1.0)  # S1 -> 1, S2 -> 0
    assert elbow["auroc"] is None  # one class
    assert elbow["kappa"] == pytest.approx(0.0)  # labels 1 1, predicted 0 1: po 1/2 = pe
    assert elbow["study_kappa"] == pytest.approx(0.0)


def test_kappa_matches_sklearn_and_undefined_is_none():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert kappa_score(y, p) == pytest.approx(cohen_kappa_score(y, p))
    assert kappa_score(np.ones(4, int), np.ones(4, int)) is None


def test_one_class_split_is_handled():
    y, p = np.ones(6, int), np.linspace(0.1, 0.9, 6)
    with pytest.warns(UserWarning, match="only one class"):
        m = compute_metrics(y, p, 0.5, n_bootstrap=50)
    assert m["auroc"] is None and m["average_precision"] is None and m["auroc_ci"] is None
    assert m["specificity"] is None and m["sensitivity"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[0, 0], [3, 3]]
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere
    report = classification_report(y, p, 0.5)
    assert set(report) >= {"normal", "abnormal", "accuracy", "macro avg", "weighted avg"}


def test_study_level_mixed_labels_warn_and_missing_ids():
    df = mura_style()
    df.loc[0, "label"] = 0
    with pytest.warns(UserWarning, match="mix labels"):
        s = study_level(df)
    assert s.loc[s["study_id"] == "S1", "label"].item() == 1
    df = mura_style().assign(study_id="")
    assert len(study_level(df)) == 7  # no ids: one-image studies


def test_resampling_unit_falls_back():
    df = mura_style()
    assert resampling_groups(df)[1] == "patients"
    assert resampling_groups(df.assign(patient_id=""))[1] == "studies"
    assert resampling_groups(df.assign(patient_id="", study_id=""))[1] == "images"
    # FracAtlas: no patients, no studies, but the duplicate groups the split kept together
    groups, unit = resampling_groups(df.assign(patient_id="", study_id="", group=list("aabbcde")))
    assert unit == "duplicate groups" and list(groups) == list("aabbcde")


def _with_duplicates(n_pictures: int, copies: int, seed: int) -> pd.DataFrame:
    """n_pictures distinct pictures, each filed ``copies`` times with the same score (as a duplicate is)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_pictures)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return pd.DataFrame({"label": np.repeat(y, copies), "probability": np.repeat(p, copies),
                         "patient_id": "", "study_id": "", "group": np.repeat([f"dup{i}" for i in range(n_pictures)],
                                                                              copies)})


def test_duplicate_groups_widen_the_intervals():
    """Resampling images as if duplicates were independent understates the uncertainty; resampling the
    groups gives the width of the distinct pictures, and the report names the unit."""
    from xrai.evaluate.report import build_report

    df = _with_duplicates(120, 4, seed=5)
    groups, unit = resampling_groups(df)
    grouped = bootstrap_ci(df["label"], df["probability"], 0.5, groups=groups, n=400, seed=0)
    naive = bootstrap_ci(df["label"], df["probability"], 0.5, groups=None, n=400, seed=0)
    distinct = bootstrap_ci(df["label"][::4], df["probability"][::4], 0.5, n=400, seed=0)

    def width(ci):
        return ci[1] - ci[0]

    for key in ("auroc", "kappa"):
        assert width(grouped[key]) > 1.5 * width(naive[key])  # ~2x for 4 copies (sqrt 4)
        assert width(grouped[key]) == pytest.approx(width(distinct[key]), rel=0.25)
    report = build_report(df.assign(path=[f"{i}.jpg" for i in range(len(df))], body_part="hand"), split="test",
                          threshold=0.5, threshold_from="valid", split_method=None, audit={}, n_bootstrap=200)
    assert report["resampling_unit"] == {"image": "duplicate groups", "study": None, "replicates": 200}
    assert width(report["image"]["auroc_ci"]) > width(
        build_report(df.drop(columns="group").assign(path=[f"{i}.jpg" for i in range(len(df))], body_part="hand"),
                     split="test", threshold=0.5, threshold_from="valid", split_method=None, audit={},
                     n_bootstrap=200)["image"]["auroc_ci"])


def test_patient_resampling_keeps_groups_whole():
    groups = np.array(["a", "a", "a", "b", "c", "c", "d", "e", "e", "e"])
    w = bootstrap_weights(groups, groups.size, 500, np.random.default_rng(0))
    assert w.shape == (500, 10)
    for g in np.unique(groups):
        cols = w[:, groups == g]
        assert (cols == cols[:, :1]).all()  # every image of a patient is drawn the same number of times
    first = [np.flatnonzero(groups == g)[0] for g in np.unique(groups)]
    assert (w[:, first].sum(axis=1) == 5).all()  # 5 patients drawn per replicate
    assert w.sum(axis=1).min() < w.sum(axis=1).max()  # so the image count varies


def test_weighted_bootstrap_equals_resampled_data():
    """A replicate's weights and the concatenated resampled data give the same AUROC and kappa."""
    from xrai.evaluate.metrics import _weighted_auroc, _weighted_kappa

    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 40), rng.integers(0, 6, 40) / 5  # many ties
    w = bootstrap_weights(rng.integers(0, 12, 40), 40, 20, rng)
    a, k = _weighted_auroc(w, y, p), _weighted_kappa(w, y, (p >= 0.5).astype(int))
    for b in range(20):
        idx = np.repeat(np.arange(40), w[b].astype(int))
        assert a[b] == pytest.approx(roc_auc_score(y[idx], p[idx]))
        assert k[b] == pytest.approx(cohen_kappa_score(y[idx], (p[idx] >= 0.5).astype(int)))


def test_bootstrap_seeded_and_ordered():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    a = bootstrap_ci(y, p, 0.5, n=200, seed=7)
    assert a == bootstrap_ci(y, p, 0.5, n=200, seed=7)
    assert a != bootstrap_ci(y, p, 0.5, n=200, seed=8)
    assert a["auroc"][0] < roc_auc_score(y, p) < a["auroc"][1]
    # chunking does not change the answer
    chunked = bootstrap_ci(y, p, 0.5, n=200, seed=7, chunk_elements=1000)
    assert chunked.keys() == a.keys()
    for key in a:  # pytest >= 8.? refuses approx on nested containers: compare each interval
        assert chunked[key] == pytest.approx(a[key])


def test_bootstrap_coverage_near_95_percent():
    """Binormal scores with a known AUROC = Phi(d / sqrt 2): the 95% interval covers it ~95% of the time."""
    d, n, datasets = 1.0, 150, 200
    true_auroc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(123)
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
    hits = 0
    for r in range(datasets):
        lo, hi = bootstrap_ci(y, rng.normal(0, 1, n) + d * y, 0.0, n=300, seed=r)["auroc"]
        hits += lo <= true_auroc <= hi
    assert 0.90 <= hits / datasets <= 0.99


def test_choose_threshold_youden_and_sensitivity():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.45, 0.5, 0.7, 0.9]
    assert choose_threshold(y, p) == pytest.approx(0.5)  # separates perfectly: J = 1
    # the highest threshold with sensitivity >= 0.6 is 0.7 (2 of 3)
    assert choose_threshold(y, p, method="sensitivity", target=0.6) == pytest.approx(0.7)
    assert choose_threshold(y, p, method="sensitivity", target=1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(y, p, method="f1")


def test_threshold_is_finite_when_all_negative_is_best():
    with strict_warnings():
        t = choose_threshold([1, 0, 0], [0.1, 0.8, 0.9])  # an inverted scorer: predict nothing
    assert 0.0 <= t <= 1.0


def test_mura_baseline_covers_every_body_part():
    from xrai.config import MURA_BODY_PARTS

    assert set(MURA_BASELINE) == {"overall", *MURA_BODY_PARTS}
    assert all(0.0 < kappa < 1.0 for kappa in MURA_BASELINE.values())


def test_mura_baseline_only_for_mura_and_says_where_it_was_measured():
    for source in ("fracatlas", "synthetic", "folder", "", None):
        assert mura_baseline(source, "valid") is None
    block = mura_baseline("mura", "a test split carved from MURA's train split")
    assert block["study_kappa"]["overall"] == 0.705
    assert "hidden test set" in block["evaluated_on"] and "hidden test set" in block["caveat"]
    assert "carved from MURA's train split" in block["caveat"]


def test_pointing_game_and_mass_toy():
    mask = np.zeros((20, 20), bool)
    mask[5:8, :] = True  # a horizontal "fracture line", 3 rows of 20 = 15% of the image
    on = np.zeros((20, 20))
    on[6, 10] = 1.0
    off = np.zeros((20, 20))
    off[15, 10] = 1.0
    near = np.zeros((20, 20))
    near[10, 3] = 1.0  # 3 px below the mask
    assert pointing_game([on, off], [mask, mask], tolerance_px=0) == pytest.approx(0.5)
    assert pointing_game([near], [mask], tolerance_px=0) == 0.0
    assert pointing_game([near], [mask], tolerance_px=3) == 1.0
    assert pointing_game([on, off], [mask, None], tolerance_px=0) == 1.0  # no mask: skipped
    assert pointing_chance([mask], tolerance_px=0) == pytest.approx(0.15)
    mass = cam_mass_in_mask([mask.astype(float)], [mask])
    assert mass["mass_fraction"] == pytest.approx(1.0)
    assert mass["ratio"] == pytest.approx(1 / 0.15)
    uniform = cam_mass_in_mask([np.ones((20, 20))], [mask])
    assert uniform["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty mask"):
        pointing_game([on], [None])
