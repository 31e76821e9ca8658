"""The synthetic MURA-style set: determinism, MURA's exact layout, recorded fracture lines, atomic default."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrai.data import synthetic
from xrai.data.synthetic import (
    PARTS,
    default_synthetic_root,
    ensure_synthetic,
    fracture_mask,
    make_synthetic,
    read_fracture_lines,
)

IMAGE_RE = re.compile(
    r"^MURA-v1\.1/(train|valid)/XR_(ELBOW|FINGER|FOREARM|HAND|HUMERUS|SHOULDER|WRIST)/"
    r"patient(\d{5})/study(\d+)_(positive|negative)/image(\d+)\.png$"
)
STUDY_RE = re.compile(r"^(MURA-v1\.1/(train|valid)/XR_[A-Z]+/patient\d{5}/study\d+_(positive|negative)/),([01])$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("tiny"), patients_per_part=4, size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    again = make_synthetic(tmp_path / "again", patients_per_part=4, size=64)
    assert _files(tiny) == _files(again)
    other = make_synthetic(tmp_path / "other", patients_per_part=4, size=64, seed=1)
    a, b = _files(tiny), _files(other)
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in a)


def test_layout_and_csvs_are_muras(tiny):
    base = tiny / "MURA-v1.1"
    on_disk = {p.relative_to(tiny).as_posix() for p in base.rglob("*.png")}
    listed, patients = set(), {"train": set(), "valid": set()}
    for split in ("train", "valid"):
        paths = _lines(base / f"{split}_image_paths.csv")
        assert paths and len(paths) == len(set(paths))
        for line in paths:  # headerless, one path per line, starting MURA-v1.1/
            m = IMAGE_RE.match(line)
            assert m and m.group(1) == split, line
            patients[split].add(m.group(3))
        listed |= set(paths)
        studies = _lines(base / f"{split}_labeled_studies.csv")
        folders = {p.rsplit("/", 1)[0] + "/" for p in paths}
        assert {s.split(",")[0] for s in studies} == folders
        for line in studies:
            m = STUDY_RE.match(line)
            assert m and m.group(2) == split, line
            assert m.group(4) == ("1" if m.group(3) == "positive" else "0")
    assert listed == on_disk
    assert not patients["train"] & patients["valid"]  # a patient sits in one split only
    for rel in list(on_disk)[:5]:
        with Image.open(tiny / rel) as img:
            assert img.mode == "L" and img.size == (64, 64)


def test_every_part_and_both_labels_in_each_split(tiny):
    for split in ("train", "valid"):
        seen = {(IMAGE_RE.match(p).group(2), IMAGE_RE.match(p).group(5))
                for p in _lines(tiny / "MURA-v1.1" / f"{split}_image_paths.csv")}
        assert seen == {(part, kind) for part in PARTS for kind in ("positive", "negative")}, split


def test_studies_have_one_to_three_views_and_patients_one_or_two_studies(tiny):
    paths = [IMAGE_RE.match(p) for s in ("train", "valid") for p in _lines(tiny / "MURA-v1.1" / f"{s}_image_paths.csv")]
    views: dict[tuple, int] = {}
    studies: dict[str, set] = {}
    for m in paths:
        views[(m.group(3), m.group(4))] = views.get((m.group(3), m.group(4)), 0) + 1
        studies.setdefault(m.group(3), set()).add(m.group(4))
    assert set(views.values()) <= {1, 2, 3} and max(views.values()) > 1
    assert {len(s) for s in studies.values()} <= {1, 2, 3}  # a valid patient may get a third for both labels
    assert any(len(s) > 1 for s in studies.values())


def test_fracture_line_for_every_abnormal_image_and_only_those(tiny):
    base = tiny / "MURA-v1.1"
    images = [p for s in ("train", "valid") for p in _lines(base / f"{s}_image_paths.csv")]
    with open(base / "fracture_lines.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "x0", "y0", "x1", "y1", "width"]
    assert {r["path"] for r in rows} == {p for p in images if "_positive/" in p}
    for r in rows:
        for key in ("x0", "y0", "x1", "y1"):
            assert -8 <= float(r[key]) <= 72  # ends just beyond the bone, near or inside the image
        assert 1.0 <= float(r["width"]) <= 4.0
    frame = read_fracture_lines(tiny)
    assert len(frame) == len(rows) and frame["path"].tolist() == [r["path"] for r in rows]


def test_mask_inside_image_on_a_dark_gap(tiny):
    lines = read_fracture_lines(tiny)
    darker = 0
    for row in lines.itertuples():
        path = tiny / row.path
        mask = fracture_mask(path, (64, 64))
        assert mask is not None and mask.dtype == bool and mask.shape == (64, 64)
        assert 0 < mask.sum() < 0.25 * mask.size
        pixels = np.asarray(Image.open(path), dtype=np.float64)
        core = fracture_mask({"x0": row.x0, "y0": row.y0, "x1": row.x1, "y1": row.y1, "width": row.width / 3},
                             (64, 64), image_size=(64, 64))
        ring = mask & ~fracture_mask({"x0": row.x0, "y0": row.y0, "x1": row.x1, "y1": row.y1,
                                      "width": row.width / 1.5}, (64, 64), image_size=(64, 64))
        darker += pixels[core].mean() < pixels[ring].mean()
    assert darker >= 0.9 * len(lines)  # the line is a visible dark gap, not a label in a CSV


def test_mask_from_row_matches_path_and_scales(tiny):
    row = read_fracture_lines(tiny).iloc[0]
    path = tiny / row["path"]
    manifest_row = {"path": str(path), **{f"line_{k}": row[k] for k in ("x0", "y0", "x1", "y1", "width")}}
    np.testing.assert_array_equal(fracture_mask(manifest_row, (64, 64)), fracture_mask(path, (64, 64)))
    big = fracture_mask(path, (128, 128))
    assert big.shape == (128, 128) and 3 * fracture_mask(path, (64, 64)).sum() < big.sum()
    normal = next((tiny / "MURA-v1.1").rglob("*_negative/image1.png"))
    assert fracture_mask(normal, (64, 64)) is None
    assert fracture_mask({"path": str(normal), **{f"line_{k}": float("nan") for k in ("x0", "y0", "x1", "y1", "width")}},
                         (64, 64)) is None
    with pytest.raises(FileNotFoundError, match="not inside a synthetic tree"):
        fracture_mask(Path(__file__), (8, 8))


def test_no_trivial_global_difference_between_labels(tmp_path):
    root = make_synthetic(tmp_path, patients_per_part=6, size=64)
    means = {0: [], 1: []}
    for p in (root / "MURA-v1.1").rglob("*.png"):
        means[int("_positive" in p.parent.name)].append(np.asarray(Image.open(p), dtype=np.float64).mean())
    gap = abs(np.mean(means[1]) - np.mean(means[0]))
    assert gap < 0.3 * np.std(means[0] + means[1])  # brightness does not give the label away


def test_ensure_synthetic_is_atomic_and_idempotent(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path / "set", patients_per_part=2, size=48)
    assert (root / "MURA-v1.1" / ".complete").is_file()
    stamp = (root / "MURA-v1.1" / "train_image_paths.csv").stat().st_mtime_ns
    assert ensure_synthetic(root) == root  # already there: nothing regenerated
    assert (root / "MURA-v1.1" / "train_image_paths.csv").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp folder left behind

    def interrupted(tmp, **options):
        (Path(tmp) / "MURA-v1.1" / "train").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_synthetic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no half tree that reads as complete

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no finished synthetic set"):
        ensure_synthetic(tmp_path / "other")


def test_default_root_under_xrai_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAI_HOME", str(tmp_path))
    assert default_synthetic_root() == tmp_path / f"synthetic-v{synthetic.SYNTHETIC_VERSION}"


@pytest.mark.parametrize("kwargs, message", [({"patients_per_part": 1}, "patients_per_part"), ({"size": 16}, "size")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(tmp_path, **kwargs)


def test_load_synthetic_with_a_new_root_generates_the_set_there(tmp_path, monkeypatch):
    """`python -m xrai train --data synthetic --root NEW` generates the set in NEW (it used to stop with
    MURA's "download it" message); a folder holding something else is still refused, not overwritten."""
    from functools import partial

    from xrai.data import load

    monkeypatch.setattr(synthetic, "make_synthetic", partial(make_synthetic, patients_per_part=2, size=48))
    manifest = load("synthetic", root=tmp_path / "new", progress=False)
    assert (tmp_path / "new" / "MURA-v1.1" / ".complete").is_file()
    assert len(manifest) > 0 and set(manifest["split"]) == {"train", "valid", "test"}
    assert all(Path(p).is_file() and str(tmp_path / "new") in p for p in manifest["path"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        load("synthetic", root=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
