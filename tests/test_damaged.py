"""Damaged images (truncated JPEGs, unreadable files) are counted and said in ONE line where a user sees
them (a notebook cell, a command's stderr), naming where they are listed, with no source line of the
package under it; -v (DEBUG on xrai.data.decode) shows each.

The set: the tiny synthetic manifest with one abnormal image of each split replaced by a JPEG cut in half.
Test names and folders avoid the words the checks look for, so that only the package's lines count (this
file's own name is replaced where a warning's location shows it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from xrai.cli.commands import _one_line_warning, main
from xrai.config import TrainConfig
from xrai.data.cache import DAMAGED_LIST, build_cache
from xrai.data.dataset import ClassicBatches, find_bad_images
from xrai.data.decode.images import DamagedImages
from xrai.evaluate.galleries import gallery
from xrai.explain.cam import explain_paths
from xrai.runs.layout import RunFolder
from xrai.train.trainer import fit

pytestmark = pytest.mark.usefixtures("one_thread")

ABOUT = re.compile(r"truncated|unreadable|could not be decoded|skipping|damaged", re.IGNORECASE)


def _cut_jpeg(source: str, target: Path) -> str:
    """A valid JPEG of the image, cut in half (no end-of-image marker): decodable as far as it goes."""
    Image.open(source).convert("L").save(target, quality=90)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return str(target)


@pytest.fixture(scope="module")
def ward(synthetic_manifest, tmp_path_factory) -> tuple[pd.DataFrame, list[str]]:
    """(manifest, the 3 cut paths): one abnormal image of train, valid and test replaced by a cut JPEG."""
    folder = tmp_path_factory.mktemp("ward")
    manifest = synthetic_manifest.copy()
    cut = []
    for split in ("train", "valid", "test"):
        index = manifest.index[(manifest["split"] == split) & (manifest["label"] == 1)][-1]
        manifest.loc[index, "path"] = _cut_jpeg(manifest.loc[index, "path"], folder / f"cut_{split}.jpg")
        cut.append(manifest.loc[index, "path"])
    return manifest, cut


@contextlib.contextmanager
def _shown(capsys, caplog, formatwarning=warnings.formatwarning):
    """The lines a user sees: stdout, stderr, WARNING log records and every warning as Python prints it
    in a notebook (with its source line; the CLI's ``formatwarning`` for a command), all collected into
    the list this yields once the block ends."""
    lines: list[str] = []
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lines
    out, err = capsys.readouterr()
    lines += out.splitlines() + err.splitlines()
    lines += [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for w in caught:
        lines += formatwarning(w.message, w.category, w.filename, w.lineno).splitlines()
    lines[:] = [line.replace(__file__, "<this test>") for line in lines]  # its own name holds a word looked for


def _one_line_about_damage(lines: list[str]) -> str:
    about = [line for line in lines if ABOUT.search(line)]
    assert len(about) == 1, "\n".join(about)
    inside = [line for line in lines if "xrai/" in line or "warnings.warn" in line]
    assert not inside, inside  # no source path or source line of the package
    return about[0]


# ---- data: the cache build and the classic path's check ------------------------------------------


def test_a_cache_build_says_one_line_naming_its_list(ward, tmp_path, capsys, caplog):
    manifest, cut = ward
    caplog.set_level(logging.DEBUG, logger="xrai")
    with _shown(capsys, caplog) as lines:
        cache = build_cache(manifest, size=32, cache_dir=tmp_path / "c", workers=2, progress=False)
    line = _one_line_about_damage(lines)
    assert f"3 of {len(manifest)} images are truncated" in line and f"listed in {cache.path / DAMAGED_LIST}" in line
    table = pd.read_csv(cache.path / DAMAGED_LIST)
    assert sorted(table["path"]) == sorted(cut) and set(table["problem"]) == {"truncated"}
    assert (cache.rows(cut) >= 0).all()  # decoded as far as they go: still served
    each = [r.getMessage() for r in caplog.records if r.name == "xrai.data.decode" and r.levelno == logging.DEBUG]
    assert sum("truncated JPEG" in m for m in each) == 3  # -v shows each one

    with _shown(capsys, caplog) as lines:  # reused: nothing new to say; a caller counts them itself
        counted = DamagedImages()
        again = build_cache(manifest, size=32, cache_dir=tmp_path / "c", progress=False, damaged=counted)
    assert not again.built and sorted(p for p, _, _ in counted.entries()) == sorted(cut)
    assert not [line for line in lines if ABOUT.search(line)]


@pytest.mark.parametrize("workers", [0, 2])
def test_find_bad_images_says_one_line_for_its_cut_files(ward, workers, capsys, caplog):
    manifest, cut = ward
    paths = manifest["path"].head(20).tolist() + cut
    with _shown(capsys, caplog) as lines:
        bad = find_bad_images(paths, num_workers=workers, progress=False)
    assert bad.empty  # truncated files still count as good
    line = _one_line_about_damage(lines)
    assert line.count("cut_") == 3 and f"3 of {len(paths)} images are truncated" in line


def test_classic_batches_say_one_line_and_stay_quiet_while_serving(ward, capsys, caplog):
    manifest, cut = ward
    rows = manifest[manifest["split"] == "train"]
    with _shown(capsys, caplog) as lines:
        source = ClassicBatches(rows, image_size=28, resize_size=32, batch_size=8, train=False, seed=0,
                                num_workers=0, device="cpu", progress=False)
        served = sum(len(y) for _, y in source.epoch(0))  # reading the cut file again says nothing more
    assert served == len(rows)
    assert "cut_train.jpg" in _one_line_about_damage(lines)


# ---- training: the cached path (as notebook 03 does) and the classic one ---------------------------


@pytest.mark.parametrize("input_path", ["cached", "classic"])
def test_a_fit_says_one_line_listed_in_the_run(ward, input_path, tmp_path, capsys, caplog):
    manifest, cut = ward
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    manifest = manifest.copy()
    manifest.loc[manifest.index[manifest["split"] == "train"][0], "path"] = str(broken)  # a broken file: left out
    config = TrainConfig(data="synthetic", pretrained=False, epochs=1, img_size=32, batch_size=16, num_workers=0,
                         input_path=input_path, max_batches=1, warmup_epochs=0, patience=0)
    run_dir = tmp_path / "run"
    with _shown(capsys, caplog) as lines:
        fit(config, manifest, run_dir, progress=False)
    line = _one_line_about_damage(lines)
    listing = RunFolder(run_dir).damaged_csv
    assert "3 image(s) were truncated or unreadable (dropped 1 unreadable, 2 truncated" in line
    assert f"listed in {listing}" in line
    table = pd.read_csv(listing)  # train and valid: the test split's are evaluate's to say
    assert sorted(table["path"]) == sorted([*cut[:2], str(broken)])
    assert sorted(table["problem"]) == ["truncated", "truncated", "unreadable"]


# ---- explain: the CLI and the gallery (notebook 05) ---------------------------------------------


@pytest.fixture(scope="module")
def ward_run(ward, tmp_path_factory) -> Path:
    from test_evaluate import make_fake_run

    manifest, _ = ward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its set-up reads the cut train image: not what is tested here
        return make_fake_run(tmp_path_factory.mktemp("ward_run") / "run", manifest)


def test_explain_paths_says_one_line_naming_few_files(ward, ward_run, tmp_path, capsys, caplog):
    from xrai.runs.load import load_model

    manifest, cut = ward
    model, config = load_model(ward_run)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = [manifest["path"].iloc[0], cut[0], str(empty)]
    with _shown(capsys, caplog) as lines:
        results = explain_paths(model, config, paths, threshold=0.5, with_cam=False)
    assert [r["error"] is None for r in results] == [True, True, False]
    line = _one_line_about_damage(lines)
    assert "2 image(s)" in line and "empty.png" in line and "cut_train.jpg" in line


def test_the_explain_command_says_one_line_and_v_shows_each(ward, evaluated_run, tmp_path, capsys, caplog):
    manifest, cut = ward
    run = tmp_path / "r"
    shutil.copytree(evaluated_run, run)
    broken = []
    for i in range(2):
        broken.append(tmp_path / f"broken{i}.png")
        broken[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    images = [manifest["path"].iloc[0], *cut, *map(str, broken)]
    out = tmp_path / "overlays"
    with _shown(capsys, caplog, functools.partial(_one_line_warning, "explain")) as lines:
        assert main(["explain", "--run", str(run), "--out", str(out), *images]) == 0
    line = _one_line_about_damage([line for line in lines if not line.startswith("{")])  # stdout: JSON lines
    assert "5 image(s)" in line and f"listed in {out / 'damaged_images.csv'}" in line
    assert sorted(pd.read_csv(out / "damaged_images.csv")["path"]) == sorted([*cut, *map(str, broken)])

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="xrai")
    with pytest.warns(UserWarning, match=r"^5 image\(s\) were truncated or unreadable") as said:
        assert main(["-v", "predict", "--run", str(run), *images]) == 0
    assert len([w for w in said if ABOUT.search(str(w.message))]) == 1
    each = [r.getMessage() for r in caplog.records if r.name == "xrai.data.decode" and r.levelno == logging.DEBUG]
    assert sum(any(Path(p).name in m for m in each) for p in [*cut, *broken]) == 5  # -v: each one


def test_a_gallery_cell_says_one_line_at_most(ward_run, tmp_path, capsys, caplog):
    run = tmp_path / "g"
    shutil.copytree(ward_run, run)
    with _shown(capsys, caplog) as lines:  # no predictions yet: the gallery scores valid and test first
        written = gallery(run, split="test", n=3, progress=False)
    line = _one_line_about_damage(lines)
    assert f"listed in {RunFolder(run).damaged_csv}" in line
    listed = set(pd.read_csv(RunFolder(run).damaged_csv)["path"])
    assert {"cut_valid.jpg", "cut_test.jpg"} <= {Path(p).name for p in listed}
    assert written["tp"].is_file()

    with _shown(capsys, caplog) as lines:  # scored already: its images are listed, nothing new to say
        gallery(run, split="test", n=3, progress=False)
    assert not [line for line in lines if ABOUT.search(line)]
    assert not [line for line in lines if "xrai/" in line or "warnings.warn" in line]
