"""run_dir_for (a changed setting starts a new run) and runs_table (the runs under a folder side by side)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from xrai.config import TrainConfig
from xrai.recipe import recipe_config
from xrai.runs import run_dir_for, runs_table
from xrai.runs.layout import RunFolder, write_json
from xrai.runs.table import RUNS_TABLE_COLUMNS


def test_run_dir_for_names_a_folder_per_setting():
    assert run_dir_for("mura", "wrist", "mobilenet_v2") == os.path.join("runs", "mura-wrist-mobilenet_v2")
    assert run_dir_for("fracatlas", None, "resnet18") == os.path.join("runs", "fracatlas-resnet18")
    assert run_dir_for("fracatlas", "all", "resnet18") == run_dir_for("fracatlas", None, "resnet18")
    assert run_dir_for("mura", "Wrist, hand") == os.path.join("runs", "mura-wrist+hand-mobilenet_v2")
    assert run_dir_for("synthetic", base="/tmp/x") == os.path.join("/tmp/x", "synthetic-mobilenet_v2")
    # a changed MODEL (or body part, or dataset) is a new run; the same setting, the same folder (it resumes)
    settings = [("mura", "wrist", "mobilenet_v2"), ("mura", "wrist", "resnet18"), ("mura", "hand", "mobilenet_v2"),
                ("fracatlas", None, "mobilenet_v2")]
    assert len({run_dir_for(*s) for s in settings}) == len(settings)
    assert run_dir_for(*settings[1]) == run_dir_for(*settings[1])
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        run_dir_for("imagenet")
    with pytest.raises(ValueError, match="not a plain name"):
        run_dir_for("mura", "../etc")
    with pytest.raises(ValueError, match="not a plain name"):
        run_dir_for("mura", "wrist", "a/b")


def test_run_dir_for_and_runs_table_load_without_torch():
    code = ("import sys; from xrai.runs import run_dir_for, runs_table; import xrai.runs.layout; "
            "print(run_dir_for('mura', 'wrist')); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    code = "import sys, xrai.runs; assert 'pandas' not in sys.modules, 'pandas imported'"  # the ONNX server's path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr


def _fake_run(path: Path, config: TrainConfig, *, epochs: int, valid: tuple | None = None,
              test: tuple | None = None, source: str | None = None) -> Path:
    folder = RunFolder(path)
    path.mkdir(parents=True)
    config.to_json(folder.config_json)
    pd.DataFrame({"epoch": range(1, epochs + 1), "val_auroc": [0.6] * epochs}).to_csv(folder.history_csv, index=False)
    if source:
        write_json({"source": source}, folder.manifest_json)
    for split, figures in (("valid", valid), ("test", test)):
        if figures:
            folder.write_report(split, {"split": split, "image": {"auroc": figures[0], "kappa": figures[1]}})
    return path


def test_runs_table_one_row_per_run_read_only(tmp_path):
    base = tmp_path / "runs"
    _fake_run(base / run_dir_for("mura", "wrist", base=""), TrainConfig(data="mura", body_part="wrist"), epochs=3,
              valid=(0.81, 0.52), test=(0.79, 0.5), source="mura")
    _fake_run(base / "fracatlas-resnet18", recipe_config("v1", data="fracatlas", model="resnet18", pretrained=False),
              epochs=2, valid=(0.7, 0.3), source="fracatlas")
    custom = _fake_run(base / "old", TrainConfig(data="synthetic", lr=0.05), epochs=1)
    cv = base / "cv-run"  # a CV run: cv.json, its folds' histories, its out-of-fold report
    cv.mkdir(parents=True)
    TrainConfig(data="fracatlas").to_json(RunFolder(cv).config_json)
    write_json({"folds": 2}, RunFolder(cv).cv_json)
    for k, epochs in ((0, 4), (1, 6)):
        _fake_run(RunFolder(cv).fold(k).path, TrainConfig(data="fracatlas"), epochs=epochs)
    RunFolder(cv).write_report("oof", {"split": "oof", "image": {"auroc": 0.66, "kappa": 0.2}})
    (base / "notes").mkdir()  # not a run
    (base / "readme.txt").write_text("x")
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*")}

    table = runs_table(base)
    assert list(table.columns) == list(RUNS_TABLE_COLUMNS)
    assert table["run"].tolist() == ["cv-run", "fracatlas-resnet18", "mura-wrist-mobilenet_v2", "old"]
    rows = table.set_index("run")
    mura = rows.loc["mura-wrist-mobilenet_v2"]
    assert (mura.dataset, mura.body_part, mura.model, bool(mura.pretrained), mura.recipe, mura.epochs) == (
        "mura", "wrist", "mobilenet_v2", True, "v2", 3)
    assert (mura.valid_auroc, mura.valid_kappa, mura.test_auroc, mura.test_kappa) == (0.81, 0.52, 0.79, 0.5)
    frac = rows.loc["fracatlas-resnet18"]
    assert (frac.model, bool(frac.pretrained), frac.recipe, frac.valid_auroc) == ("resnet18", False, "v1", 0.7)
    assert math.isnan(frac.test_auroc) and math.isnan(frac.test_kappa)  # test not evaluated
    assert rows.loc["old", "recipe"] == "custom" and rows.loc["old", "dataset"] == "synthetic"
    assert math.isnan(rows.loc["old", "valid_auroc"])
    assert rows["cv"].tolist() == [True, False, False, False]
    assert (rows.loc["cv-run", "valid_auroc"], rows.loc["cv-run", "epochs"]) == (0.66, 6)  # out-of-fold; longest fold
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before  # reads only
    assert custom.is_dir()

    empty = runs_table(tmp_path / "nothing-here")
    assert empty.empty and list(empty.columns) == list(RUNS_TABLE_COLUMNS)


def test_runs_table_reads_an_evaluated_run(evaluated_run, tmp_path):
    shutil.copytree(evaluated_run, tmp_path / "runs" / "synthetic-mobilenet_v2")
    row = runs_table(tmp_path / "runs").iloc[0]
    report = json.loads(RunFolder(evaluated_run).report_json("valid").read_text())
    assert row["run"] == "synthetic-mobilenet_v2" and row["dataset"] == "synthetic" and not row["cv"]
    assert row["valid_auroc"] == report["image"]["auroc"] and row["valid_kappa"] == report["image"]["kappa"]
    assert math.isnan(row["test_auroc"]) and math.isnan(row["epochs"])  # a fake run: no history.csv
