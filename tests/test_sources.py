"""Source readers on tiny fake trees: MURA, FracAtlas and class folders, every layout quirk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from _checks import strict_warnings
from PIL import Image

from xrai.data.sources import (
    MANIFEST_COLUMNS,
    LabelConflictWarning,
    ManifestWarning,
    class_label,
    read_class_folders,
    read_fracatlas,
    read_mura,
)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png_bytes()


def _touch(path: Path, data: bytes = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- MURA
# (split, part, patient, study folder, images)
MURA_STUDIES = [
    ("train", "WRIST", 1, "study1_positive", 2),
    ("train", "WRIST", 1, "study2_negative", 1),
    ("train", "ELBOW", 2, "study1_negative", 3),
    ("train", "HAND", 3, "study1_positive", 1),
    ("valid", "WRIST", 11185, "study1_positive", 2),
    ("valid", "SHOULDER", 11186, "study1_negative", 1),
]


def make_mura(base: Path, studies=MURA_STUDIES, *, csv_labels: dict[str, int] | None = None) -> Path:
    """Write MURA-v1.1's official layout under base/MURA-v1.1 and return base."""
    mura = base / "MURA-v1.1"
    for split in ("train", "valid"):
        paths, labelled = [], []
        for s, part, patient, study, n in studies:
            if s != split:
                continue
            rel = f"MURA-v1.1/{split}/XR_{part}/patient{patient:05d}/{study}/"
            for i in range(1, n + 1):
                _touch(base / f"{rel}image{i}.png")
                paths.append(f"{rel}image{i}.png")
            label = int(study.endswith("positive"))
            labelled.append(f"{rel},{(csv_labels or {}).get(rel, label)}")
        mura.mkdir(parents=True, exist_ok=True)
        (mura / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (mura / f"{split}_labeled_studies.csv").write_text("\n".join(labelled) + "\n")
    return base


@pytest.fixture
def mura_base(tmp_path) -> Path:
    return make_mura(tmp_path / "data")


@pytest.mark.parametrize("depth", ["above", "itself", "kagglehub", "two_wrappers"])
def test_mura_root_depths(tmp_path, depth):
    base = {"above": tmp_path, "itself": tmp_path, "kagglehub": tmp_path / "versions" / "1",
            "two_wrappers": tmp_path / "mura-v11" / "download"}[depth]  # fmt: skip
    make_mura(base)
    root = base / "MURA-v1.1" if depth == "itself" else tmp_path
    with strict_warnings():  # a clean tree reads without a single warning of ours
        m = read_mura(root)
    assert list(m.columns[:7]) == MANIFEST_COLUMNS
    assert len(m) == sum(s[-1] for s in MURA_STUDIES)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])


def test_mura_manifest_contents(mura_base):
    m = read_mura(mura_base)
    assert m["label"].dtype == np.int64
    assert set(m["split"]) == {"train", "valid"} and set(m["source"]) == {"mura"}
    assert set(m["body_part"]) == {"wrist", "elbow", "hand", "shoulder"}
    row = m[m["path"].str.endswith("valid/XR_WRIST/patient11185/study1_positive/image2.png")].iloc[0]
    assert row["patient_id"] == "patient11185"
    assert row["study_id"] == "valid/XR_WRIST/patient11185/study1_positive"
    assert row["label"] == 1 and row["split"] == "valid" and not row["label_conflict"]
    # study ids: one per study folder, unique within the manifest
    assert m["study_id"].nunique() == len(MURA_STUDIES)
    assert (m.groupby("study_id")["label"].nunique() == 1).all()
    assert m.loc[m["study_id"].str.contains("study2_negative"), "label"].eq(0).all()


def test_mura_source_name_is_passed_through(mura_base):
    assert set(read_mura(mura_base, source="synthetic")["source"]) == {"synthetic"}


def test_mura_skips_stray_files(mura_base):
    study = mura_base / "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive"
    _touch(study / "._image1.png", b"\x00\x05\x16\x07 resource fork")
    _touch(study / ".DS_Store", b"junk")
    _touch(mura_base / "MURA-v1.1/train/.DS_Store", b"junk")
    _touch(mura_base / "MURA-v1.1/__MACOSX/train/XR_WRIST/._x.png", b"junk")
    with strict_warnings():
        m = read_mura(mura_base)
    assert not m["path"].str.contains("/[.]").any()
    assert len(m) == sum(s[-1] for s in MURA_STUDIES)


def test_mura_label_conflict_is_reported_not_resolved(tmp_path):
    rel = "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/"
    base = make_mura(tmp_path, csv_labels={rel: 0})
    with pytest.warns(LabelConflictWarning, match="patient00001/study1_positive"):
        m = read_mura(base)
    bad = m[m["label_conflict"]]
    assert len(bad) == 2 and (bad["label"] == 1).all() and (bad["csv_label"] == 0).all()
    assert m["label_conflict"].sum() == 2


def test_mura_missing_and_unlisted_images(mura_base):
    (mura_base / "MURA-v1.1/train/XR_ELBOW/patient00002/study1_negative/image3.png").unlink()
    _touch(mura_base / "MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/image9.png")
    with pytest.warns(ManifestWarning) as record:
        m = read_mura(mura_base)
    messages = " ".join(str(w.message) for w in record)
    assert "missing" in messages and "image3.png" in messages
    assert "not in valid_image_paths.csv" in messages and "image9.png" in messages
    assert not m["path"].str.endswith("image9.png").any()
    assert len(m) == sum(s[-1] for s in MURA_STUDIES) - 1


def test_mura_without_csvs_uses_folders(mura_base):
    for f in (mura_base / "MURA-v1.1").glob("*.csv"):
        f.unlink()
    with pytest.warns(ManifestWarning, match="not found"):
        m = read_mura(mura_base)
    assert len(m) == sum(s[-1] for s in MURA_STUDIES)
    assert m["csv_label"].isna().all() and not m["label_conflict"].any()


def test_mura_not_found(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(FileNotFoundError, match="MURA-v1.1"):
        read_mura(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_mura(tmp_path / "nope")


# ----------------------------------------------------------------------------------------- FracAtlas
FRACATLAS_CSV = """image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique
IMG0000001.jpg,1,0,0,0,0,0,0,1,1,1,0,0
IMG0000002.jpg,0,1,0,0,0,1,0,1,2,1,1,0
IMG0000003.jpg,0,0,0,0,0,0,0,0,0,1,0,0
IMG0000004.jpg,0,1,1,0,0,0,1,0,0,0,1,0
IMG0000005.jpg,0,0,0,1,1,0,0,0,0,0,0,1
IMG0003298.jpg,0,0,1,0,0,0,0,0,1,1,0,0
"""


def make_fracatlas(base: Path) -> Path:
    _touch(base / "dataset.csv", FRACATLAS_CSV.encode())
    for name in ("IMG0000001.jpg", "IMG0000002.jpg", "IMG0003298.jpg"):
        _touch(base / "images" / "Fractured" / name)
    for name in ("IMG0000003.jpg", "IMG0000004.jpg", "IMG0000005.jpg"):
        _touch(base / "images" / "Non_fractured" / name)
    _touch(base / "images" / "Non_fractured" / ".DS_Store", b"junk")
    _touch(base / "images" / "Non_fractured" / "._IMG0000003.jpg", b"junk")
    return base


@pytest.mark.parametrize("wrapper", ["", "FracAtlas", "versions/1/FracAtlas"])
def test_fracatlas(tmp_path, wrapper):
    make_fracatlas(tmp_path / wrapper if wrapper else tmp_path)
    with pytest.warns(LabelConflictWarning, match="IMG0003298"):
        m = read_fracatlas(tmp_path)
    assert list(m.columns[:7]) == MANIFEST_COLUMNS
    assert len(m) == 6
    by_id = m.set_index("image_id")
    assert by_id.loc["IMG0000001.jpg", "body_part"] == "hand"
    assert by_id.loc["IMG0000002.jpg", "body_part"] == "leg"
    assert by_id.loc["IMG0000003.jpg", "body_part"] == "unknown"
    assert by_id.loc["IMG0000004.jpg", "body_part"] == "mixed"  # two flags set
    assert by_id.loc["IMG0000005.jpg", "body_part"] == "mixed"  # the mixed flag
    assert by_id.loc["IMG0003298.jpg", "label"] == 1  # the folder wins...
    assert by_id.loc["IMG0003298.jpg", "csv_fractured"] == 0  # ...and the CSV value is kept
    assert by_id["label_conflict"].sum() == 1 and by_id.loc["IMG0003298.jpg", "label_conflict"]
    assert (m[["patient_id", "study_id", "split"]] == "").all().all()
    assert set(m["source"]) == {"fracatlas"} and m["label"].dtype == np.int64
    for col in ("hardware", "multiscan", "fracture_count", "frontal", "lateral", "oblique", "csv_fractured"):
        assert col in m.columns and m[col].dtype == np.int64
    assert "fractured" not in m.columns


def test_fracatlas_image_missing_from_csv(tmp_path):
    make_fracatlas(tmp_path)
    _touch(tmp_path / "images" / "Fractured" / "IMG0009999.jpg")
    with pytest.warns(ManifestWarning, match="IMG0009999"), pytest.warns(LabelConflictWarning):
        m = read_fracatlas(tmp_path)
    row = m.set_index("image_id").loc["IMG0009999.jpg"]
    assert row["body_part"] == "unknown" and row["label"] == 1 and not row["label_conflict"]


def test_fracatlas_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.csv"):
        read_fracatlas(tmp_path)


# ------------------------------------------------------------------------------------- class folders
SPELLINGS = [
    ("fractured", "not fractured"),
    ("Fractured", "Not_Fractured"),
    ("FRACTURED", "not_fractured"),
    ("fractured", "non_fractured"),
    ("fractured", "Non_fractured"),
    ("Abnormal", "NORMAL"),
    ("positive", "Negative"),
]


def make_class_tree(top: Path, pos: str, neg: str, splits: tuple[str, ...] | None) -> None:
    for split in splits or ("",):
        d = top / split if split else top
        _touch(d / pos / "a.png")
        _touch(d / pos / "b.JPG")
        _touch(d / neg / "c.jpeg")
        _touch(d / neg / "d.Jpg")
        _touch(d / neg / ".DS_Store", b"junk")
        _touch(d / neg / "._c.jpeg", b"junk")
        _touch(d / neg / "notes.txt", b"not an image")


@pytest.mark.parametrize(("pos", "neg"), SPELLINGS)
@pytest.mark.parametrize("wrappers", [0, 1, 2, 3])
def test_class_folders_spellings_and_wrappers(tmp_path, pos, neg, wrappers):
    top = tmp_path.joinpath(*[f"wrap {i}" for i in range(wrappers)])
    make_class_tree(top, pos, neg, ("train", "val", "test"))
    m = read_class_folders(tmp_path)
    assert list(m.columns[:7]) == MANIFEST_COLUMNS
    assert len(m) == 12
    assert m.groupby("split").size().to_dict() == {"test": 4, "train": 4, "valid": 4}
    assert (m.groupby("label").size() == 6).all()
    assert m.loc[m["path"].str.endswith(("a.png", "b.JPG")), "label"].eq(1).all()
    assert m.loc[m["path"].str.endswith(("c.jpeg", "d.Jpg")), "label"].eq(0).all()
    assert set(m["body_part"]) == {"unknown"} and set(m["source"]) == {"folder"}
    assert (m[["patient_id", "study_id"]] == "").all().all()


@pytest.mark.parametrize("val", ["val", "valid", "validation", "VAL", "Validation"])
def test_class_folder_split_spellings(tmp_path, val):
    make_class_tree(tmp_path, "fractured", "not fractured", ("Train", val, "TEST"))
    assert set(read_class_folders(tmp_path)["split"]) == {"train", "valid", "test"}


def test_kaggle_multiregion_layout(tmp_path):
    top = tmp_path / "Bone_Fracture_Binary_Classification" / "Bone_Fracture_Binary_Classification"
    make_class_tree(top, "fractured", "not fractured", ("train", "val", "test"))
    assert len(read_class_folders(tmp_path)) == 12


def test_kaggle_bonefracture_layout(tmp_path):
    make_class_tree(tmp_path / "archive (6)", "fractured", "not fractured", ("train", "val"))
    m = read_class_folders(tmp_path)
    assert set(m["split"]) == {"train", "valid"} and len(m) == 8


@pytest.mark.parametrize("wrappers", [0, 2])
def test_class_folders_without_split_level(tmp_path, wrappers):
    top = tmp_path.joinpath(*["w"] * wrappers)
    make_class_tree(top, "abnormal", "normal", None)
    m = read_class_folders(tmp_path)
    assert len(m) == 4 and set(m["split"]) == {""}


def test_class_folders_unknown_folder_is_skipped_with_warning(tmp_path):
    make_class_tree(tmp_path, "fractured", "not fractured", ("train", "val"))
    _touch(tmp_path / "train" / "maybe" / "x.png")
    _touch(tmp_path / "__MACOSX" / "train" / "fractured" / "._a.png", b"junk")
    with pytest.warns(ManifestWarning, match="maybe"):
        m = read_class_folders(tmp_path)
    assert len(m) == 8 and not m["path"].str.contains("maybe|MACOSX").any()


def test_class_folders_ambiguous_root(tmp_path):
    _touch(tmp_path / "one" / "x.png")
    _touch(tmp_path / "two" / "y.png")
    with pytest.raises(FileNotFoundError, match="one, two"):
        read_class_folders(tmp_path)


def test_class_label_spellings():
    assert class_label("Non_fractured") == 0 and class_label("not-fractured") == 0
    assert class_label(" Fractured ") == 1 and class_label("images") is None
