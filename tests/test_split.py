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


@pytest.mark.parametrize("seed", range(6))
def test_no_patient_study_or_duplicate_group_crosses_property(seed):
    rng = np.random.default_rng(100 + seed)
    frame = _frame(n_patients=int(rng.integers(20, 80)), seed=seed)
    # duplicate groups that link images of different patients (a re-filed copy)
    dup = pd.Series([f"d{i}" for i in range(len(frame))], index=frame.index + 1000)
    for a, b in rng.integers(0, len(frame), (8, 2)):
        dup.iloc[b] = dup.iloc[a]
    frame.index = frame.index + 1000  # groups align by index, not position
    out = split_manifest(frame, seed=seed, groups=dup)
    out["dup"] = dup
    for key in ("patient_id", "study_id", "dup"):
        _assert_no_group_crosses(out, key)
    assert out.index.equals(frame.index)


def test_valid_carved_when_only_train_and_test_exist():
    frame = _frame(with_split=True)
    frame["split"] = frame["split"].replace({"valid": "test"})
    out = split_manifest(frame, seed=0)
    assert (out.loc[frame["split"] == "test", "split"] == "test").all()
    assert set(out.loc[frame["split"] == "train", "split"]) == {"train", "valid"}
    assert out.attrs["split_method"].startswith("official + valid carved from train")


def test_unsplit_rows_follow_their_patients_official_split():
    frame = _frame(with_split=True)
    first_valid = frame.index[frame["split"] == "valid"][0]
    patient = frame.loc[first_valid, "patient_id"]
    extra = frame[frame["patient_id"] == patient].assign(split="", path=lambda f: f["path"] + ".extra")
    fresh = _frame(n_patients=30, seed=9).assign(patient_id=lambda f: "new" + f["patient_id"],
                                                 study_id=lambda f: "new" + f["study_id"],
                                                 path=lambda f: "/new" + f["path"])
    out = split_manifest(pd.concat([frame, extra, fresh], ignore_index=True), seed=0)
    assert (out.loc[out["patient_id"] == patient, "split"] == "valid").all()
    assert set(out.loc[out["patient_id"].str.startswith("new"), "split"]) == {"train", "valid", "test"}
    _assert_no_group_crosses(out, "patient_id")


def test_official_splits_left_alone():
    frame = _frame(with_split=True)
    frame.loc[frame.index[::5], "split"] = "test"
    frame = frame[frame.groupby("patient_id")["split"].transform("nunique") == 1]
    out = split_manifest(frame, seed=0)
    assert out["split"].tolist() == frame["split"].tolist() and out.attrs["split_method"] == "official"


def test_bad_arguments():
    frame = _frame()
    with pytest.raises(ValueError, match="val_fraction"):
        split_manifest(frame, val_fraction=1.2)
    with pytest.raises(ValueError, match="groups has 3 values"):
        split_manifest(frame, groups=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown split"):
        split_manifest(frame.assign(split="holdout"))
