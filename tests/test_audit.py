"""Leakage audit: exact and near duplicates, what they cross, and bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from xrai.data.audit import (
    AUDIT_COLUMNS,
    audit,
    audit_summary,
    duplicate_groups,
    near_pairs,
)


def _xray(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float64)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(3):
        cx, cy, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 20)]
        img += 150 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture()
def tree(tmp_path):
    paths = {}
    for i in range(4):
        paths[f"distinct{i}"] = tmp_path / f"distinct{i}.png"
        Image.fromarray(_xray(i)).save(paths[f"distinct{i}"])
    base = Image.fromarray(_xray(100))
    base.save(tmp_path / "a.png")
    base.save(tmp_path / "a_copy.png")  # exact: same pixels
    ImageEnhance.Brightness(base).enhance(1.04).save(tmp_path / "a_near.jpg", quality=92)  # near
    other = Image.fromarray(_xray(200))
    other.save(tmp_path / "b.png")
    other.save(tmp_path / "b_copy.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [
        (tmp_path / "a.png", 1, "train"), (tmp_path / "a_copy.png", 1, "train"), (tmp_path / "a_near.jpg", 0, "test"),
        (tmp_path / "b.png", 0, "train"), (tmp_path / "b_copy.png", 0, "train"), (tmp_path / "broken.png", 0, "train"),
    ] + [(p, i % 2, "train") for i, p in enumerate(paths.values())]
    return pd.DataFrame([{"path": str(p), "label": l, "split": s, "body_part": "hand", "patient_id": "",
                          "study_id": "", "source": "folder"} for p, l, s in rows])


def test_groups_kinds_and_crosses(tree):
    with pytest.warns(UserWarning, match="broken.png"):
        table = audit(tree, workers=1, progress=False)
    assert list(table.columns) == AUDIT_COLUMNS
    names = {g: sorted(p.rsplit("/", 1)[1] for p in part["path"]) for g, part in table.groupby("group")}
    assert sorted(names.values()) == [["a.png", "a_copy.png", "a_near.jpg"], ["b.png", "b_copy.png"]]
    by_name = {p.rsplit("/", 1)[1]: row for p, row in zip(table["path"], table.itertuples())}
    assert by_name["a.png"].kind == "near" and by_name["a.png"].crosses == "split+label"
    assert by_name["b.png"].kind == "exact" and by_name["b.png"].crosses == ""
    assert by_name["a.png"].group == 0  # worst group first
    assert audit_summary(table) == {"cross_split_groups": 1, "cross_label_groups": 1}


def test_duplicate_groups_per_row(tree):
    with pytest.warns(UserWarning):
        groups = duplicate_groups(tree, workers=1, progress=False)
    assert len(groups) == len(tree)
    assert groups[0] == groups[1] == groups[2] and groups[3] == groups[4] and groups[0] != groups[3]
    assert groups[6:].nunique() == len(tree) - 6


def test_parallel_matches_serial(tree):
    import warnings

    big = pd.concat([tree] * 12, ignore_index=True)  # > 64 paths takes the process pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = audit(big, workers=2, progress=False)
        b = audit(big, workers=1, progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 50, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (50, 3)).astype(np.uint64)
    noisy = base ^ flips[:, 0] ^ flips[:, 1]  # at most 2 bits away
    hashes = np.concatenate([base, noisy])
    for d in (0, 2, 4):
        got = {tuple(p) for p in near_pairs(hashes, d)}
        want = {(i, j) for i in range(100) for j in range(i + 1, 100)
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= d}
        assert got == want


def test_empty_summary():
    assert audit_summary(pd.DataFrame(columns=AUDIT_COLUMNS)) == {"cross_split_groups": 0, "cross_label_groups": 0}


@pytest.mark.real
def test_real_fracatlas_has_groups_under_both_labels(fracatlas_root):
    import warnings

    from xrai.data.sources import read_fracatlas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = read_fracatlas(fracatlas_root)
        table = audit(manifest, progress=False)
    assert audit_summary(table)["cross_label_groups"] >= 1
    assert (table["kind"] == "exact").any() and (table["kind"] == "near").any()


def test_resized_copy_is_near_and_distinct_stays_alone(tmp_path):
    base = Image.fromarray(_xray(7, size=96))
    base.save(tmp_path / "orig.png")
    base.resize((80, 80), Image.Resampling.LANCZOS).save(tmp_path / "small.png")  # a rescaled re-export
    Image.fromarray(_xray(8, size=96)).save(tmp_path / "other.png")
    frame = pd.DataFrame({"path": [str(tmp_path / n) for n in ("orig.png", "small.png", "other.png")],
                          "label": [0, 0, 1], "split": ["train", "valid", "train"]})
    table = audit(frame, workers=1, progress=False)
    assert sorted(p.rsplit("/", 1)[1] for p in table["path"]) == ["orig.png", "small.png"]
    assert set(table["kind"]) == {"near"} and set(table["crosses"]) == {"split"}
    groups = duplicate_groups(frame, workers=1, progress=False)
    assert groups[0] == groups[1] != groups[2]


def test_with_splits_recounts_the_crossings_under_new_splits():
    # the CV's per-fold audit: same groups, other splits (xrai.data.audit imports pandas lazily)
    import pandas as pd

    from xrai.data.audit import audit_summary, with_splits

    table = pd.DataFrame({"path": ["a", "b", "c", "d"], "group": ["g1", "g1", "g2", "g2"], "label": [0, 0, 1, 0],
                          "split": ["train", "train", "train", "train"], "crosses": ["", "", "label", "label"]})
    out = with_splits(table, pd.Series({"a": "train", "b": "valid", "c": "train", "d": "train"}))
    assert list(out["split"]) == ["train", "valid", "train", "train"]
    assert audit_summary(out) == {"cross_split_groups": 1, "cross_label_groups": 1}
