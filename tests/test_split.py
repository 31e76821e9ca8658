"""Splits: grouped, stratified, seeded; no patient, study or duplicate group in two splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xrai.data.split import connected_groups, filter_body_parts, split_manifest


def _frame(n_patients=60, seed=0, with_split=False, patient_ids=True):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for s in range(rng.integers(1, 3)):
            for v in range(rng.integers(1, 4)):
                rows.append({
                    "path": f"/x/p{p}/s{s}/i{v}.png", "label": label, "body_part": "wrist" if p % 2 else "hand",
                    "patient_id": f"patient{p}" if patient_ids else "",
                    "study_id": f"p{p}/s{s}" if patient_ids else "",
                    "split": ("valid" if p % 7 == 0 else "train") if with_split else "", "source": "mura",
                })
    return pd.DataFrame(rows)


def _assert_no_group_crosses(frame, key):
    per = frame[frame[key] != ""].groupby(key)["split"].nunique()
    assert (per == 1).all(), per[per > 1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_patient_grouped_no_crossing_and_stratified(seed):
    frame = _frame(seed=seed)
    out = split_manifest(frame, seed=seed)
    assert set(out["split"]) == {"train", "valid", "test"}
    _assert_no_group_crosses(out, "patient_id")
    _assert_no_group_crosses(out, "study_id")
    rate = frame["label"].mean()
    for name, part in out.groupby("split"):
        assert abs(part["label"].mean() - rate) < 0.15, (name, part["label"].mean(), rate)
    shares = out["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.1 and abs(shares["valid"] - 0.15) < 0.08
    assert out.attrs["split_method"] == f"patient-grouped stratified, seed {seed}"
    assert frame["split"].eq("").all()  # input untouched


def test_seeded_and_deterministic():
    frame = _frame()
    a = split_manifest(frame, seed=5)["split"].tolist()
    assert a == split_manifest(frame, seed=5)["split"].tolist()
    assert a != split_manifest(frame, seed=6)["split"].tolist()


def test_mura_valid_kept_and_test_carved_from_train():
    frame = _frame(with_split=True)
    out = split_manifest(frame, seed=0)
    official_valid = frame["split"] == "valid"
    assert (out.loc[official_valid, "split"] == "valid").all()
    assert set(out.loc[~official_valid, "split"]) == {"train", "test"}
    _assert_no_group_crosses(out, "patient_id")
    assert out.attrs["split_method"].startswith("official + test carved from train, patient-grouped")


def test_duplicate_groups_kept_together_without_patients():
    frame = _frame(patient_ids=False)
    groups = pd.Series([f"dup{i // 3}" if i < 30 else f"img{i}" for i in range(len(frame))])
    out = split_manifest(frame, seed=0, groups=groups)
    out["dup"] = groups
    _assert_no_group_crosses(out, "dup")
    assert out.attrs["split_method"] == "duplicate-grouped stratified, seed 0"


def test_groups_join_through_shared_keys():
    patients = np.array([0, 0, 1, -1, -1])
    studies = np.array([0, 1, 1, -1, -1])
    ids = connected_groups(5, patients, studies)
    assert ids[0] == ids[1] == ids[2] and len({ids[3], ids[4], ids[0]}) == 3


def test_rare_label_reaches_every_split():
    frame = _frame(n_patients=200, seed=1)
    frame["label"] = 0
    frame.loc[frame["patient_id"].isin([f"patient{i}" for i in range(0, 200, 20)]), "label"] = 1
    out = split_manifest(frame, seed=0)
    assert (out.groupby("split")["label"].sum() > 0).all()


def test_filter_body_parts():
    frame = _frame()
    assert set(filter_body_parts(frame, ["wrist"])["body_part"]) == {"wrist"}
    assert len(filter_body_parts(frame, None)) == len(frame)
    with pytest.raises(ValueError, match=r"unknown body part\(s\) \['elbow'\].*hand \(\d+\), wrist"):
        filter_body_parts(frame, "elbow")
