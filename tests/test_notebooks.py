"""The notebook series: generated, logic-free, outputs stripped; and run end to end with papermill.

The end-to-end runs (marked slow; CI runs them) execute 01-05 in order, each in a fresh kernel, on the
synthetic set with one epoch on the CPU, then once more as Kaggle's "Save & Run All" would: the Kaggle
variables set and the synthetic tree attached as a dataset under a temporary input folder.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from _checks import assert_picture

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = ["01_download", "02_eda", "03_train", "04_evaluate", "05_gradcam"]
# what each notebook reads first, and the notebooks whose files it is (05's gallery evaluates when 04 has not)
NEEDS = {"02_eda": "01_download", "03_train": "01_download", "04_evaluate": "03_train",
         "05_gradcam": "04_evaluate|03_train"}
CODE_BANNED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor, ast.While, ast.Lambda)
FAST = {"EPOCHS": 1, "PRETRAINED": False, "IMG_SIZE": 64, "BATCH_SIZE": 32, "GALLERY_N": 2, "USE_DRIVE": False}


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _parse(source: str) -> ast.Module:
    """A cell as Python, IPython's magics (%matplotlib inline) turned into the calls they stand for."""
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


# ---- the files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_equals_the_generator(name):
    assert (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8") == _generator().render(name), (
        "run: python tools/make_notebooks.py"
    )


@pytest.mark.parametrize("name", NAMES)
def test_outputs_stripped_and_no_logic_in_cells(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in _code(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
        tree = _parse(cell.source)
        banned = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, CODE_BANNED)]
        assert not banned, f"{name}: {banned} in a cell (a cell is a call or a display):\n{cell.source}"


@pytest.mark.parametrize("name", NAMES)
def test_title_setup_runtime_check_and_parameters_come_first(name):
    nb = _read(name)
    repo = _generator().REPO
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}.ipynb" in title.source
    assert f"https://kaggle.com/kernels/welcome?src=https://github.com/{repo}/blob/main/notebooks/{name}.ipynb" in (
        title.source
    )
    assert "**Needs:**" in title.source and "minutes" in title.source
    if name in NEEDS:
        assert f"{NEEDS[name].split('|')[0]}.ipynb" in title.source

    setup, imports, params = _code(nb)[:3]
    assert 'find_spec("xrai") is None' in setup.source and "colab_setup.sh" in setup.source
    calls = [ast.unparse(n.func) for n in ast.walk(_parse(imports.source)) if isinstance(n, ast.Call)]
    calls = [c for c in calls if not c.startswith("get_ipython")]  # %matplotlib inline
    assert calls == ["xrai.env.check_runtime"], "the first call after set-up"
    assert params.metadata.get("tags") == ["parameters"]
    assigned = {t.id for n in ast.parse(params.source).body for t in n.targets}
    assert {"RUN_DIR", "USE_DRIVE"} <= assigned
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def test_series_parameters():
    assigned = {}
    for name in NAMES:
        params = _code(_read(name))[2]
        assigned[name] = {t.id: ast.literal_eval(n.value) for n in ast.parse(params.source).body for t in n.targets}
    assert assigned["01_download"]["DATASET"] == "mura" and assigned["01_download"]["ROOT"] is None
    assert {"BODY_PART", "MODEL", "EPOCHS", "IMG_SIZE", "BATCH_SIZE", "SEED", "PRETRAINED"} <= set(assigned["03_train"])
    assert assigned["03_train"]["PRETRAINED"] is True and assigned["03_train"]["EPOCHS"] >= 5
    assert len({a["RUN_DIR"] for a in assigned.values()}) == 1, "one run folder for the whole series"


def test_setup_cell_does_nothing_where_xrai_imports(tmp_path, monkeypatch):
    """Run the set-up cell's code here (xrai is installed): it must not start any process."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the set-up cell ran a command"))
    exec(compile(_code(_read("01_download"))[0].source, "setup", "exec"), {})


# ---- end to end ---------------------------------------------------------------------------------


def _execute(name: str, out_dir: Path, cwd: Path, parameters: dict) -> nbformat.NotebookNode:
    import papermill

    wanted = papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / f"{name}.ipynb"),
        str(out_dir / f"{name}.ipynb"),
        parameters={k: v for k, v in parameters.items() if k in wanted},
        kernel_name="python3",
        cwd=str(cwd),
        progress_bar=False,
        request_save_on_cell_execute=False,
        execution_timeout=600,
    )
    return nbformat.read(out_dir / f"{name}.ipynb", as_version=4)


def _run_series(tmp_path: Path, parameters: dict) -> tuple[Path, dict[str, float]]:
    run_dir = Path(parameters["RUN_DIR"])
    if not run_dir.is_absolute():
        run_dir = tmp_path / run_dir
    executed = tmp_path / "executed"
    executed.mkdir()
    seconds = {}
    for name in NAMES:
        start = time.perf_counter()
        _execute(name, executed, tmp_path, parameters)
        seconds[name] = round(time.perf_counter() - start, 1)
    (tmp_path / "seconds.json").write_text(json.dumps(seconds))
    return run_dir, seconds


def _check_artifacts(run_dir: Path, *, body_part: str | None = None) -> None:
    import pandas as pd

    for name in ("manifest.csv", "manifest.json", "audit.csv", "config.json", "checkpoints/best.pt",
                 "checkpoints/last.pt", "history.csv", "curves.png", "predictions_valid.csv",
                 "predictions_test.csv", "report_valid.json", "report_test.json", "confusion_matrix_test.png",
                 "roc_test.png", "pr_test.png", "per_body_part_test.png", "eda/class_balance.png",
                 "eda/samples.png", "eda/image_sizes.png", "eda/patients_per_part.png", "eda/audit_groups.png",
                 "gradcam/tp_test.png", "gradcam/fp_test.png", "gradcam/fn_test.png"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    assert len(pd.read_csv(run_dir / "history.csv")) == 1
    report = json.loads((run_dir / "report_test.json").read_text())
    assert report["threshold_from"] == "valid" and "auroc" in report["image"]
    assert list((run_dir / "gradcam" / "browser").glob("*.png")), "the browser drew no overlay"
    for figure in [*run_dir.glob("*.png"), *run_dir.glob("eda/*.png"), *run_dir.glob("gradcam/**/*.png")]:
        assert_picture(figure, min_side=64)  # every figure a real picture, not an empty canvas
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["epochs"], config["pretrained"]) == (1, False)
    if body_part is not None:
        assert config["body_part"] == body_part
        assert set(pd.read_csv(run_dir / "predictions_test.csv")["body_part"]) == {body_part}


@pytest.fixture(scope="module")
def series_synthetic(tmp_path_factory):
    from xrai.data import make_synthetic

    tmp = tmp_path_factory.mktemp("series")
    data = make_synthetic(tmp / "data", patients_per_part=8, size=128)
    parameters = {"DATASET": "synthetic", "ROOT": str(data), "RUN_DIR": "runs/ci", **FAST}
    run_dir, seconds = _run_series(tmp, parameters)
    return run_dir, seconds


@pytest.mark.slow
def test_series_runs_in_order_on_synthetic(series_synthetic):
    run_dir, seconds = series_synthetic
    _check_artifacts(run_dir)
    print(f"notebook seconds: {seconds}, total {sum(seconds.values()):.0f} s")
    assert sum(seconds.values()) < 300, f"the series took {seconds}; CI allows 5 minutes"


@pytest.mark.slow
def test_each_notebook_runs_alone_again_from_the_files(series_synthetic, tmp_path):
    """A fresh kernel on a run folder that already has everything: 03 resumes (nothing left to train)."""
    run_dir, _ = series_synthetic
    mtime = (run_dir / "checkpoints" / "last.pt").stat().st_mtime
    _execute("03_train", tmp_path, tmp_path, {"RUN_DIR": str(run_dir), **FAST})
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime == mtime, "a finished run was trained again"
    _execute("05_gradcam", tmp_path, tmp_path, {"RUN_DIR": str(run_dir), **FAST})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDS))
def test_a_notebook_without_its_input_says_which_notebook_makes_it(name, tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as info:
        _execute(name, tmp_path, tmp_path, {"RUN_DIR": str(tmp_path / "empty"), **FAST})
    message = f"{info.value.ename}: {info.value.evalue}"
    assert "FileNotFoundError" in message and re.search(NEEDS[name], message), message


@pytest.mark.slow
def test_kaggle_save_and_run_all_finds_the_attached_dataset(tmp_path, monkeypatch):
    """DATASET="mura", ROOT=None, top to bottom without edits: load() must find /kaggle/input's copy."""
    from xrai.data import make_synthetic

    make_synthetic(tmp_path / "input" / "mura-v11", patients_per_part=24, size=96)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("KAGGLE_URL_BASE", "https://www.kaggle.com")
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "input"))
    working = tmp_path / "working"
    working.mkdir()
    parameters = {"DATASET": "mura", "ROOT": None, "RUN_DIR": "runs/mura", "BODY_PART": "wrist", **FAST}
    run_dir, seconds = _run_series(working, parameters)
    _check_artifacts(run_dir, body_part="wrist")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["source"] == "mura" and manifest["root"].startswith(str(tmp_path / "input"))
    runtime = _read_output(working / "executed" / "01_download.ipynb", "RUNTIME = ")
    assert "Kaggle (batch run)" in runtime


def _read_output(path: Path, marker: str) -> str:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return "".join(o.get("text", "") for o in cell.outputs)
