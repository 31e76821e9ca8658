"""A run folder read on another machine: relative paths, and the images found again (never the network)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from xrai.data import load, make_synthetic, read_manifest, relocate_paths, save_manifest
from xrai.data.download import DownloadError

locate = importlib.import_module("xrai.data.locate")
TINY = {"patients_per_part": 2, "size": 48, "seed": 0}


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh machine: its own XRAI_HOME, no Kaggle input, an empty kagglehub cache, no download."""
    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "input"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    for key in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN", "KAGGLE_DATA_PROXY_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(locate, "download", lambda name, **k: (_ for _ in ()).throw(DownloadError(f"offline: {name}")))
    return tmp_path


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mura_run(tmp_path: Path, where: Path) -> tuple[Path, pd.DataFrame]:
    make_synthetic(where, **TINY)
    manifest = load("mura", root=where, progress=False)
    run = tmp_path / "run"
    save_manifest(manifest, run)
    return run, manifest


def test_manifest_json_records_where_the_images_came_from(machine):
    run, m = _mura_run(machine, machine / "data")
    meta = json.loads((run / "manifest.json").read_text())
    assert meta["source"] == "mura" and meta["dataset"] == "mura" and meta["slug"] == "cjinny/mura-v11"
    assert meta["root"] == str(machine / "data" / "MURA-v1.1") and meta["paths"] == "relative"
    assert meta["split"] == {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}
    assert pd.read_csv(run / "manifest.csv")["path"].iloc[0].startswith(("train/", "valid/"))


def test_synthetic_set_is_regenerated_with_the_same_files_on_a_fresh_machine(machine, monkeypatch):
    made = make_synthetic(machine / "home" / "tiny", **TINY)
    m = load("synthetic", root=made, progress=False)
    assert m.attrs["synthetic"] == {"version": 2, **TINY}
    save_manifest(m, machine / "drive" / "run")
    digests = {p[len(m.attrs["root"]):]: _digest(p) for p in m["path"]}
    shutil.rmtree(machine / "home")  # the runtime is gone; only the "Drive" folder stays
    monkeypatch.setenv("XRAI_HOME", str(machine / "home2"))
    back = read_manifest(machine / "drive" / "run")
    assert back.attrs["found"].startswith(f"images: {len(m):,} found at {machine / 'home2'}")
    assert "(synthetic set regenerated," in back.attrs["found"]
    assert {p[len(back.attrs["root"]):]: _digest(p) for p in back["path"]} == digests, "not the same files"
    pd.testing.assert_frame_equal(back.drop(columns="path"), m.drop(columns="path"), check_dtype=False)
    assert json.loads((machine / "drive" / "run" / "manifest.json").read_text())["root"] == back.attrs["root"]
    again = read_manifest(machine / "drive" / "run")  # the next reader looks at the recorded root first
    assert "(recorded root," in again.attrs["found"]


@pytest.mark.parametrize("mount", ["mura-v11", "datasets/cjinny/mura-v11", "mura-v11/versions/3",
                                   "datasets/cjinny/mura-v11/versions/3"])
def test_attached_kaggle_copy_in_every_mount_form(machine, mount):
    run, m = _mura_run(machine, machine / "data")
    shutil.move(machine / "data", machine / "input" / mount)
    back = read_manifest(run)
    assert "(attached in Kaggle," in back.attrs["found"]
    assert back.attrs["root"] == str(machine / "input" / mount / "MURA-v1.1")
    assert all(os.path.isfile(p) for p in back["path"])


def test_kagglehub_cache_then_download(machine, monkeypatch):
    run, m = _mura_run(machine, machine / "data")
    cache = machine / "kagglehub" / "datasets" / "cjinny" / "mura-v11"
    shutil.copytree(machine / "data", cache / "versions" / "2")
    (cache / "2.complete").touch()
    shutil.move(machine / "data", machine / "elsewhere")
    assert "(kagglehub's cache," in read_manifest(run).attrs["found"]
    shutil.rmtree(cache)
    asked = []
    monkeypatch.setattr(locate, "download", lambda name, **k: asked.append(name) or machine / "elsewhere")
    back = read_manifest(run)
    assert asked == ["mura"] and "(downloaded with kagglehub," in back.attrs["found"]


def test_nowhere_says_which_dataset_to_fetch(machine):
    run, _ = _mura_run(machine, machine / "data")
    shutil.rmtree(machine / "data")
    with pytest.raises(FileNotFoundError, match=r"were at .*MURA-v1.1 and are not on this machine.*offline: mura.*"
                                                r"'cjinny/mura-v11'") as info:
        read_manifest(run)
    assert "\n" not in str(info.value)


def test_root_given_wins(machine):
    run, _ = _mura_run(machine, machine / "data")
    shutil.move(machine / "data", machine / "moved")
    assert "(the root given," in read_manifest(run, root=machine / "moved").attrs["found"]


def test_old_manifest_with_absolute_paths_still_reads(machine):
    make_synthetic(machine / "data", **TINY)
    m = load("mura", root=machine / "data", progress=False)
    run = machine / "old"
    run.mkdir()
    m.to_csv(run / "manifest.csv", index=False)  # as written before: absolute paths, three keys
    (run / "manifest.json").write_text(json.dumps({"source": "mura", "root": str(machine / "data"),
                                                   "split_method": "x", "rows": len(m)}))
    back = read_manifest(run)
    assert back["path"].tolist() == m["path"].tolist() and "(recorded paths," in back.attrs["found"]
    shutil.move(machine / "data", machine / "input" / "datasets" / "cjinny" / "mura-v11")
    moved = read_manifest(run)
    assert "(attached in Kaggle," in moved.attrs["found"]
    assert all(os.path.isfile(p) for p in moved["path"]) and moved.attrs["split_method"] == "x"


def test_predictions_from_another_machine_are_relocated(machine):
    run, m = _mura_run(machine, machine / "data")
    old = m["path"].head(3).str.replace(str(machine / "data"), "/root/.cache/kagglehub/x/versions/1", regex=False)
    shutil.move(machine / "data", machine / "input" / "mura-v11")
    back = read_manifest(run)
    moved = relocate_paths(pd.concat([old, pd.Series(["/nowhere/a.png"])], ignore_index=True), back)
    assert moved.tolist()[:3] == back["path"].head(3).tolist() and moved.iloc[3] == "/nowhere/a.png"
