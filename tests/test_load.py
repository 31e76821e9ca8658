"""load(), save_manifest() and read_manifest(); the real FracAtlas subset when it is there."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import xrai.data as data
from xrai.data import (
    MANIFEST_COLUMNS,
    ImageError,
    LabelConflictWarning,
    TruncatedImageWarning,
    load,
    read_image,
    read_manifest,
    save_manifest,
)

FRACATLAS_CSV_HEADER = "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique\n"


def _xray(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))


@pytest.fixture
def mini_fracatlas(tmp_path) -> Path:
    """40 images, two of them the same picture filed under both labels (as in the real set)."""
    root = tmp_path / "FracAtlas"
    rows = []
    for i in range(40):
        label = int(i < 12)
        folder = root / "images" / ("Fractured" if label else "Non_fractured")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"IMG{i:07d}.jpg"
        _xray(0 if i in (0, 39) else i).save(folder / name, quality=95)  # 0 and 39: duplicates
        part = ["0,1,0,0,0", "1,0,0,0,0", "0,0,1,0,0"][i % 3]
        rows.append(f"{name},{part},0,0,{label},{label},1,0,0\n")
    (root / "dataset.csv").write_text(FRACATLAS_CSV_HEADER + "".join(rows))
    return tmp_path


def _check_manifest(m: pd.DataFrame) -> None:
    assert list(m.columns[:7]) == MANIFEST_COLUMNS
    assert m["label"].dtype == np.int64 and set(m["label"]) <= {0, 1}
    for c in MANIFEST_COLUMNS:
        if c != "label":
            assert not m[c].isna().any() and all(isinstance(v, str) for v in m[c]), c
    assert set(m["split"]) <= {"train", "valid", "test"}


def _crossing(m: pd.DataFrame, column: str) -> int:
    keyed = m[m[column] != ""]
    return int((keyed.groupby(column)["split"].nunique() > 1).sum())


def test_load_synthetic(synthetic_root):
    m = load("synthetic", root=synthetic_root, progress=False)
    _check_manifest(m)
    assert set(m["source"]) == {"synthetic"}
    assert set(m["split"]) == {"train", "valid", "test"}  # test carved out of train
    assert _crossing(m, "patient_id") == 0 and _crossing(m, "study_id") == 0
    assert set(m.attrs) >= {"source", "root", "split_method"} and m.attrs["source"] == "synthetic"
    assert "test" in m.attrs["split_method"]
    lines = ["line_x0", "line_y0", "line_x1", "line_y1", "line_width"]
    assert m.loc[m["label"] == 1, lines].notna().all().all()
    assert m.loc[m["label"] == 0, lines].isna().all().all()


def test_load_synthetic_default_root_is_generated_once(monkeypatch, tmp_path):
    import xrai.data.synthetic as synthetic

    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(synthetic, "make_synthetic", functools.partial(synthetic.make_synthetic,
                                                                       patients_per_part=2, size=48))  # fmt: skip
    m = load("synthetic", progress=False)
    root = Path(m.attrs["root"])
    assert root == data.default_synthetic_root() / "MURA-v1.1" and root.is_relative_to(tmp_path / "home")
    assert m["path"].map(lambda p: Path(p).is_file()).all()
    assert len(load("synthetic", progress=False)) == len(m)


def test_load_without_split_keeps_official(synthetic_root):
    m = load("synthetic", root=synthetic_root, split=False, progress=False)
    assert set(m["split"]) == {"train", "valid"} and m.attrs["split_method"] == "official"


@pytest.mark.parametrize(("body_part", "expected"), [("wrist", {"wrist"}), (["hand", "elbow"], {"hand", "elbow"})])
def test_load_body_part_filter(synthetic_root, body_part, expected):
    full = load("synthetic", root=synthetic_root, progress=False)
    m = load("synthetic", root=synthetic_root, body_part=body_part, progress=False)
    assert set(m["body_part"]) == expected
    # splitting happens before filtering: an image's split does not depend on the parts asked for
    merged = m.merge(full, on="path", suffixes=("", "_full"))
    assert len(merged) == len(m) and (merged["split"] == merged["split_full"]).all()
    assert len(load("synthetic", root=synthetic_root, body_part="all", progress=False)) == len(full)


def test_load_unknown_body_part(synthetic_root):
    with pytest.raises(ValueError, match="wrist"):
        load("synthetic", root=synthetic_root, body_part="knee", progress=False)


def test_load_fracatlas_keeps_duplicates_together(mini_fracatlas):
    m = load("fracatlas", root=mini_fracatlas, progress=False)
    _check_manifest(m)
    assert len(m) == 40 and set(m["split"]) == {"train", "valid", "test"}
    dup = m[m["image_id"].isin(["IMG0000000.jpg", "IMG0000039.jpg"])]
    assert dup["split"].nunique() == 1 and set(dup["label"]) == {0, 1}
    # the groups the split kept together stay in the manifest, for the bootstrap to resample
    assert dup["group"].nunique() == 1 and m["group"].nunique() == 39
    assert "duplicate" in m.attrs["split_method"]
    assert m.attrs["source"] == "fracatlas"


def test_load_fracatlas_split_false(mini_fracatlas):
    m = load("fracatlas", root=mini_fracatlas, split=False, progress=False)
    assert set(m["split"]) == {""} and m.attrs["split_method"] == "none"


def test_load_folder_aliases(tmp_path):
    for split in ("train", "val"):
        for cls, seed in (("fractured", 1), ("not fractured", 2)):
            d = tmp_path / "archive (6)" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                _xray(seed * 100 + i + (split == "val") * 50).save(d / f"{i}.png")
    m = load("bonefracture", root=tmp_path, progress=False)
    _check_manifest(m)
    assert set(m["source"]) == {"folder"} and m.attrs["source"] == "bonefracture"
    assert {"train", "valid", "test"} <= set(m["split"])


def test_load_downloads_when_no_root(monkeypatch, synthetic_root):
    asked = []
    monkeypatch.setattr(data, "download", lambda name, **kw: asked.append(name) or synthetic_root)
    m = load("mura", split=False, progress=False)
    assert asked == ["mura"] and len(m) > 0 and m.attrs["root"] == str(synthetic_root / "MURA-v1.1")
    assert m.attrs["dataset"] == "mura" and m.attrs["slug"] == "cjinny/mura-v11"
    assert set(m["source"]) == {"mura"}


def test_load_errors():
    with pytest.raises(ValueError, match="unknown source 'chestxray'.*mura"):
        load("chestxray")
    with pytest.raises(ValueError, match="root="):
        load("folder")


def test_manifest_round_trip(tmp_path, mini_fracatlas, synthetic_root):
    for source, root in (("fracatlas", mini_fracatlas), ("synthetic", synthetic_root)):
        m = load(source, root=root, progress=False)
        run = tmp_path / source
        assert save_manifest(m, run) == run / "manifest.csv"
        back = read_manifest(run)
        pd.testing.assert_frame_equal(back, m, check_dtype=False)
        _check_manifest(back)
        assert {k: v for k, v in back.attrs.items() if k != "found"} == m.attrs
        assert back.attrs["found"].startswith(f"images: {len(m):,} found at {m.attrs['root']} (recorded root")
        on_disk = pd.read_csv(run / "manifest.csv")["path"]
        assert not on_disk.str.startswith("/").any(), "paths on disk are relative to the dataset root"
        if source == "fracatlas":
            assert (back["patient_id"] == "").all() and back["label_conflict"].dtype == bool


def test_manifest_ids_stay_strings(tmp_path):
    root = tmp_path / "data"
    paths = [root / "fractured" / "1.png", root / "normal" / "2.png"]
    for p in paths:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    m = pd.DataFrame({"path": [str(p) for p in paths], "label": [1, 0], "body_part": ["hand", "hand"],
                      "patient_id": ["00123", ""], "study_id": ["007", "008"], "split": ["train", "test"],
                      "source": ["folder", "folder"]})  # fmt: skip
    m.attrs = {"source": "folder", "root": str(root), "split_method": "patient-grouped stratified, seed 0"}
    save_manifest(m, tmp_path)
    back = read_manifest(tmp_path)
    assert back["patient_id"].tolist() == ["00123", ""] and back["study_id"].tolist() == ["007", "008"]
    assert back.attrs["split_method"] == "patient-grouped stratified, seed 0"


def test_read_manifest_missing_says_what_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_download.*xrai audit"):
        read_manifest(tmp_path)


def test_save_manifest_rejects_non_manifest(tmp_path):
    with pytest.raises(ValueError, match="has no 'label', 'body_part'.* columns"):
        save_manifest(pd.DataFrame({"path": ["x"]}), tmp_path)
    assert not (tmp_path / "manifest.csv").exists()


# ------------------------------------------------------------------------------ the real FracAtlas subset
@pytest.fixture(scope="module")
def real_manifest(fracatlas_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load("fracatlas", root=fracatlas_root, progress=False)
    return m, caught


@pytest.mark.real
def test_real_fracatlas_manifest(real_manifest):
    m, caught = real_manifest
    _check_manifest(m)
    assert len(m) == 2449 and m["label"].sum() == 431
    assert set(m["body_part"]) == {"hand", "leg", "hip", "shoulder", "mixed"}
    conflicts = [w for w in caught if issubclass(w.category, LabelConflictWarning)]
    assert len(conflicts) == 1 and "IMG0003298" in str(conflicts[0].message)
    row = m.set_index("image_id").loc["IMG0003298.jpg"]
    assert row["label"] == 1 and row["csv_fractured"] == 0 and row["label_conflict"]
    assert int(m["label_conflict"].sum()) == 1
    assert set(m["split"]) == {"train", "valid", "test"}


@pytest.mark.real
def test_real_fracatlas_decodes_with_30_truncated(real_manifest):
    m, _ = real_manifest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shapes = [read_image(p).shape for p in m["path"]]  # raises ImageError on any undecodable file
    truncated = [w for w in caught if issubclass(w.category, TruncatedImageWarning)]
    assert len(truncated) == 30
    assert len({str(w.message).split(":")[0] for w in truncated}) == 30  # each names its file
    assert all(len(s) == 2 and min(s) > 0 for s in shapes)


@pytest.mark.real
def test_real_fracatlas_audit_finds_duplicates_under_both_labels(real_manifest):
    m, _ = real_manifest
    report = data.audit(m, progress=False)
    summary = data.audit_summary(report)
    assert summary["cross_label_groups"] >= 1
    both = report[report["crosses"].str.contains("label")]
    assert (both.groupby("group")["label"].nunique() == 2).all()
    # the split kept every duplicate group together
    assert summary["cross_split_groups"] == 0


def test_image_error_is_exported():
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("bad", ["../../../../etc/passwd", "/etc/passwd", "images/../../../outside.png",
                                 "C:\\Windows\\x.png"])
def test_a_manifest_path_leading_outside_the_dataset_is_refused(synthetic_manifest, tmp_path, bad):
    """Issue 25, fault 3: a manifest travels with its run folder; a path out of the dataset root is refused
    when the manifest is read, naming the file and the first such row, before any image is looked at."""
    from xrai.data import ManifestError

    save_manifest(synthetic_manifest, tmp_path)
    table = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    table.loc[3, "path"] = bad
    table.loc[5, "path"] = "../second-bad.png"
    table.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"manifest.csv: row 5 has path .*leads outside the dataset folder "
                                            r"\(2 such row"):
        read_manifest(tmp_path)


def test_the_synthetic_manifest_reads_back_with_every_path_under_its_root(synthetic_manifest, tmp_path):
    save_manifest(synthetic_manifest, tmp_path)
    back = read_manifest(tmp_path)
    root = Path(back.attrs["root"]).resolve()
    assert all(Path(p).resolve().is_relative_to(root) for p in back["path"])


def test_evaluate_refuses_a_run_whose_manifest_climbs_out_in_one_line(evaluated_run, tmp_path, capsys):
    import shutil

    from xrai.cli.commands import main

    run = Path(shutil.copytree(evaluated_run, tmp_path / "run"))
    secret = tmp_path / "secret.png"
    _xray(7).save(secret)
    table = pd.read_csv(run / "manifest.csv", dtype=str)
    row = int(table.index[table["split"] == "valid"][0])
    table.loc[row, "path"] = "../" * 12 + str(secret).lstrip("/")
    table.to_csv(run / "manifest.csv", index=False)
    before = {p.name: p.read_bytes() for p in run.glob("*_valid.*")}
    assert main(["evaluate", "--run", str(run), "--split", "valid"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xrai ")]
    assert len(lines) == 1 and f"row {row + 2} has path" in lines[0] and "outside the dataset" in lines[0], lines
    assert {p.name: p.read_bytes() for p in run.glob("*_valid.*")} == before  # nothing scored
    assert "secret.png" not in (run / "predictions_valid.csv").read_text()
