"""The package's layout: one owner of the run folder, old module names as aliases that warn once,
and a ground floor that imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xrai.runs.layout import CONFIG_JSON, MANIFEST_CSV, THRESHOLD_JSON, RunFolder


def test_the_run_folder_names_each_file_once(tmp_path):
    run = RunFolder(tmp_path)
    assert run.manifest_csv == tmp_path / MANIFEST_CSV and run.config_json == tmp_path / CONFIG_JSON
    assert run.checkpoint("last") == tmp_path / "checkpoints" / "last.pt"
    assert run.predictions_csv("test").name == "predictions_test.csv"
    assert run.fold(2).checkpoint() == tmp_path / "folds" / "2" / "checkpoints" / "best.pt"
    assert not run.is_cv and run.cv_folds() is None
    assert run.operating_point_file.name == "report_valid.json"
    run.threshold_json.write_text("{}")
    assert run.operating_point_file.name == THRESHOLD_JSON
    run.cv_json.write_text('{"folds": 3}')
    assert run.is_cv and run.cv_folds() == 3 and run.operating_point_file.name == "report_oof.json"


def test_a_report_is_written_strictly_and_read_back(tmp_path):
    run = RunFolder(tmp_path)
    run.write_report("valid", {"threshold": 0.3, "auc": None})
    assert run.read_report("valid") == {"threshold": 0.3, "auc": None}
    with pytest.raises(ValueError):
        run.write_report("test", {"auc": float("nan")})  # NaN is not JSON: undefined metrics are null
    assert run.read_report("test") is None


@pytest.mark.parametrize("old, new", [("xrai.inference", "xrai.runs.load"),
                                      ("xrai.explain_metrics", "xrai.evaluate.scores"),
                                      ("xrai.ensemble", "xrai.models.ensemble")])
def test_an_old_module_name_is_the_new_module_and_warns_once(old, new):
    code = (f"import warnings; warnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    import {old} as a\n    import {old} as b\n    import {new} as c\n"
            f"assert a is c and b is c\n"
            f"moved = [str(x.message) for x in w if issubclass(x.category, FutureWarning)]\n"
            f"assert len(moved) == 1 and '{new}' in moved[0], moved\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_old_gallery_name_still_answers():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import xrai.evaluate, xrai.explain\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    assert xrai.explain.gallery is xrai.evaluate.gallery is xrai.explain.gallery\n"
            "assert [str(x.message) for x in w] == ['xrai.explain.gallery moved to xrai.evaluate.gallery in xrai 0.2; "
            "the old name goes in the next release'], w\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_ground_floor_and_the_run_folder_names_import_no_torch():
    code = ("import sys\nimport xrai.config, xrai.env, xrai.errors, xrai.fileio, xrai.labels, xrai.runs.layout\n"
            "heavy = [m for m in ('torch', 'pandas', 'sklearn') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
