"""RUN_DIR/split_images.zip: the valid and test images kept in the run folder, so a fresh (Colab) runtime
scores and explains them without downloading the dataset again; a damaged zip is ignored, never half used."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from xrai.data import load, make_synthetic, read_manifest, save_manifest
from xrai.data.archive import INDEX_MEMBER, extract_root, write_split_images
from xrai.data.download import DownloadError
from xrai.runs.layout import SPLIT_IMAGES_ZIP, RunFolder

locate = importlib.import_module("xrai.data.locate")
TINY = {"patients_per_part": 2, "size": 48, "seed": 0}
SCORED = ("valid", "test")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine without Kaggle input or kagglehub cache, not Colab; every download is refused and counted."""
    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "input"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    for key in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN", "KAGGLE_DATA_PROXY_URL",
                "COLAB_RELEASE_TAG", "COLAB_GPU"):
        monkeypatch.delenv(key, raising=False)
    downloads: list[str] = []

    def refuse(name, **kwargs):
        downloads.append(name)
        raise DownloadError(f"offline: {name}")

    monkeypatch.setattr(locate, "download", refuse)
    return tmp_path, downloads


def _mura(tmp_path: Path) -> pd.DataFrame:
    make_synthetic(tmp_path / "data", **TINY)  # MURA's layout: read as source "mura" (a download when missing)
    return load("mura", root=tmp_path / "data", progress=False)


def _digests(manifest: pd.DataFrame, rows: pd.Series | None = None) -> dict[str, str]:
    root = manifest.attrs["root"]
    chosen = manifest if rows is None else manifest[rows]
    return {p[len(root) + 1:]: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in chosen["path"]}


def _fresh_runtime(tmp_path: Path, monkeypatch, name: str = "home2") -> None:
    """The images and the last runtime's caches are gone; only the run folder (on "Drive") stays."""
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
    monkeypatch.setenv("XRAI_HOME", str(tmp_path / name))


def test_written_on_colab_by_default_and_read_back_in_a_fresh_runtime(machine, monkeypatch, caplog):
    tmp_path, downloads = machine
    m = _mura(tmp_path)
    run = tmp_path / "drive" / "run"
    save_manifest(m, run)
    assert not (run / SPLIT_IMAGES_ZIP).exists(), "written off Colab without being asked"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    save_manifest(m, run, keep_split_images=False)
    assert not (run / SPLIT_IMAGES_ZIP).exists(), "an explicit False is not obeyed"
    save_manifest(m, run)  # 01's call, unchanged: on Colab the zip comes with the manifest
    scored = m["split"].isin(SCORED)
    kept = _digests(m, scored)
    with zipfile.ZipFile(RunFolder(run).split_images_zip) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert set(zf.namelist()) == set(kept) | {INDEX_MEMBER} and zf.namelist()[-1] == INDEX_MEMBER
        assert {n: hashlib.sha256(zf.read(n)).hexdigest() for n in kept} == kept, "not the original bytes"
        assert json.loads(zf.read(INDEX_MEMBER))["splits"] == ["valid", "test"]
    stamp = (run / SPLIT_IMAGES_ZIP).stat().st_mtime_ns
    save_manifest(m, run)  # 01 run again: the same images, nothing rewritten on Drive
    assert (run / SPLIT_IMAGES_ZIP).stat().st_mtime_ns == stamp
    recorded = json.loads((run / "manifest.json").read_text())["root"]

    _fresh_runtime(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO):
        back = read_manifest(run, splits=SCORED)
    assert downloads == []
    found = back.attrs["found"]
    assert found.startswith(f"images: {int(scored.sum()):,} found at {extract_root()}")
    assert f"valid+test images from {run.name}/split_images.zip" in found and "MB, no download" in found
    assert _digests(back, back["split"].isin(SCORED)) == kept, "not the same files"
    pd.testing.assert_frame_equal(back.drop(columns="path"), m.drop(columns="path"), check_dtype=False)
    assert json.loads((run / "manifest.json").read_text())["root"] == recorded, "a partial copy recorded as the root"
    again = read_manifest(run, splits=("test",))  # extracted once per runtime
    assert again.attrs["root"] == back.attrs["root"] and len(list(extract_root().iterdir())) == 1
    assert downloads == []

    with pytest.raises(FileNotFoundError, match="offline: mura"):
        read_manifest(run)  # training needs every split: the zip does not serve it, the download is tried
    assert downloads == ["mura"]


@pytest.mark.filterwarnings("ignore:no audit.csv")
def test_a_fresh_runtime_evaluates_valid_and_test_and_draws_a_gallery_without_downloading(machine, monkeypatch):
    from test_evaluate import make_fake_run

    from xrai.evaluate import gallery
    from xrai.evaluate.run import evaluate_run

    tmp_path, downloads = machine
    m = _mura(tmp_path)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    run = make_fake_run(tmp_path / "drive" / "run", m)  # its save_manifest writes the zip (Colab)
    assert (run / SPLIT_IMAGES_ZIP).is_file()
    _fresh_runtime(tmp_path, monkeypatch)
    options = {"progress": False, "n_bootstrap": 20, "device": "cpu", "explain_images": 0}
    for split in SCORED:
        evaluate_run(run, split=split, **options)
        assert len(RunFolder(run).read_predictions(split)) == int((m["split"] == split).sum())
    assert downloads == []
    written = gallery(run, split="test", n=1)
    assert written["tp"].is_file() and downloads == []


def _run_with_zip(machine, monkeypatch) -> tuple[Path, list[str]]:
    tmp_path, downloads = machine
    m = _mura(tmp_path)
    run = tmp_path / "drive" / "run"
    save_manifest(m, run, keep_split_images=True)
    _fresh_runtime(tmp_path, monkeypatch)
    return run, downloads


def _member_offset(zip_path: Path, member: str) -> int:
    """Where a stored member's bytes start in the file."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    raw = zip_path.read_bytes()
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        member = zf.namelist()[-2]  # the last image (the index comes after it)
    raw = bytearray(path.read_bytes())
    raw[_member_offset(path, member) + 40] ^= 0xFF
    path.write_bytes(bytes(raw))


def _wrong_index(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    index = json.loads(members[INDEX_MEMBER])
    first = next(iter(index["files"]))
    index["files"][first] += 1
    members[INDEX_MEMBER] = json.dumps(index).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _not_ours(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("valid/x.png", b"not an image")


@pytest.mark.parametrize(("damage", "says"), [
    (_cut_short, "BadZipFile"),
    (_flip_a_byte, "Bad CRC-32"),
    (_wrong_index, "differ from its index in name or size"),
    (_not_ours, f"no {INDEX_MEMBER} in it"),
])
def test_a_damaged_zip_is_ignored_with_one_line_and_never_half_used(machine, monkeypatch, caplog, damage, says):
    run, downloads = _run_with_zip(machine, monkeypatch)
    damage(RunFolder(run).split_images_zip)
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="offline: mura"):
        read_manifest(run, splits=SCORED)
    assert downloads == ["mura"], "the images were then looked for as without the zip"
    lines = [r.getMessage() for r in caplog.records if "split_images.zip ignored" in r.getMessage()]
    assert len(lines) == 1 and says in lines[0] and "\n" not in lines[0], lines
    left = list(extract_root().iterdir()) if extract_root().is_dir() else []
    assert left == [], f"a half-extracted folder was left: {left}"


def test_a_zip_without_every_image_asked_for_is_ignored(machine, monkeypatch, caplog):
    tmp_path, downloads = machine
    m = _mura(tmp_path)
    run = tmp_path / "drive" / "run"
    save_manifest(m, run)
    valid = m[m["split"] == "valid"]
    write_split_images(RunFolder(run).split_images_zip,
                       ((p[len(m.attrs["root"]) + 1:], p) for p in valid["path"]), ["valid"])
    _fresh_runtime(tmp_path, monkeypatch)
    assert f"valid images from {run.name}/split_images.zip" in read_manifest(run, splits=("valid",)).attrs["found"]
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError):
        read_manifest(run, splits=("test",))
    assert downloads == ["mura"] and any("it lacks" in r.getMessage() for r in caplog.records)


def test_the_synthetic_set_is_taken_from_the_zip_instead_of_regenerated(machine, monkeypatch):
    tmp_path, _ = machine
    made = make_synthetic(tmp_path / "home" / "tiny", **TINY)
    m = load("synthetic", root=made, progress=False)
    run = tmp_path / "drive" / "run"
    save_manifest(m, run, keep_split_images=True)
    _fresh_runtime(tmp_path, monkeypatch)
    assert f"(valid+test images from {run.name}/split_images.zip," in read_manifest(run, splits=SCORED).attrs["found"]
    assert "(synthetic set regenerated," in read_manifest(run).attrs["found"]  # all splits: as before


def test_missing_images_leave_the_manifest_saved_alone(machine, caplog):
    tmp_path, _ = machine
    m = _mura(tmp_path)
    Path(m.loc[m["split"] == "test", "path"].iloc[0]).unlink()
    with caplog.at_level(logging.WARNING):
        save_manifest(m, tmp_path / "run", keep_split_images=True)
    assert (tmp_path / "run" / "manifest.csv").is_file() and not (tmp_path / "run" / SPLIT_IMAGES_ZIP).exists()
    assert any("not written: 1 of the" in r.getMessage() for r in caplog.records)


def test_a_run_that_copied_its_manifest_from_the_data_folder_finds_that_folders_zip(machine, monkeypatch):
    """01 keeps the zip in the data folder (runs/<DATASET>); 03 trains in runs/<DATASET>-<MODEL> with a copy of
    the manifest; 04 and 05 read that run folder, and find the data folder's zip through its manifest.json."""
    tmp_path, _ = machine
    made = make_synthetic(tmp_path / "home" / "tiny", **TINY)
    data = tmp_path / "drive" / "runs" / "synthetic"
    save_manifest(load("synthetic", root=made, progress=False), data, keep_split_images=True)
    run = tmp_path / "drive" / "runs" / "synthetic-mobilenet_v2"
    copied = read_manifest(data)
    assert copied.attrs["split_images"] == str(RunFolder(data).split_images_zip.resolve())
    save_manifest(copied, run, keep_split_images=False)  # what fit() does with 03's manifest
    assert not RunFolder(run).split_images_zip.exists()
    assert json.loads(RunFolder(run).manifest_json.read_text())["split_images"] == "../synthetic/split_images.zip"
    _fresh_runtime(tmp_path, monkeypatch)
    found = read_manifest(run, splits=SCORED).attrs["found"]
    assert "(valid+test images from synthetic/split_images.zip," in found and "no download" in found
