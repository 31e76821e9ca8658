"""The notebook series: generated, logic-free, outputs stripped; and run end to end as the platforms run it.

The end-to-end runs (marked slow; CI runs them) execute every notebook with papermill, each in its own
kernel process, its own XRAI_HOME and its own working folder, on tiny synthetic sets with one epoch:

- Colab-like: the run folder on a shared "Drive" folder, the previous notebook's home deleted before the
  next starts (a fresh runtime per notebook), so the synthetic set is made again in every notebook.
- Kaggle-like: KAGGLE_KERNEL_RUN_TYPE=Batch, the dataset attached in the new mount form
  (datasets/<owner>/<slug>/...), the previous notebook's output attached read-only under the input
  folder, and nothing under the input folder may change.
- The Kaggle-like run once more on the real FracAtlas subset (marked real).

No network in any of them: a sitecustomize in the kernels refuses every non-local connection and a
stand-in kagglehub refuses every call, each writing what was asked into a log the tests read.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import nbformat
import pytest
from _checks import assert_picture

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SERIES = ["01_download", "02_eda", "03_train", "04_evaluate", "05_gradcam"]
NAMES = ["00_quickstart", *SERIES]
TRAINED = ["00_quickstart", "03_train", "04_evaluate", "05_gradcam"]  # their RUN_DIR: xrai.runs.run_dir_for(...)
CLINICAL = ["00_quickstart", "04_evaluate", "05_gradcam"]  # the not-for-diagnosis line near the top
KAGGLE_MENU = "Settings > Accelerator > GPU T4 x2"
REFERENCE_DIR = ROOT / "docs" / "reference"
REFERENCE_NAMES = {"00_quickstart", "04_evaluate", "05_gradcam"}
NEEDS = {"02_eda": "01_download", "03_train": "01_download", "04_evaluate": "03_train", "05_gradcam": "04_evaluate"}
CODE_BANNED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor, ast.While, ast.Lambda)
FAST = {"EPOCHS": 1, "PRETRAINED": False, "IMG_SIZE": 64, "BATCH_SIZE": 32, "GALLERY_N": 2, "USE_DRIVE": False}
TINY = {"patients_per_part": 8, "size": 64, "seed": 0}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
FOUND = re.compile(r"images: ([\d,]+) found at (\S+) \((.+?), ([\d.]+) s\)")


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


def _sources(name: str, kind: str = "code") -> str:
    return "\n\n".join(c.source for c in _read(name).cells if c.cell_type == kind)


def _parameters(name: str) -> dict:
    params = next(c for c in _read(name).cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: ast.literal_eval(n.value) for n in ast.parse(params.source).body for t in n.targets}


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
def test_gpu_check_first_then_install_then_runtime_and_parameters(name):
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
        assert "01_download.ipynb" in title.source or f"{NEEDS[name]}.ipynb" in title.source

    assert nb.cells[1].cell_type == "code", "no cell before the GPU check"
    gpu, setup, imports, params = _code(nb)[:4]
    imported = {a.name for n in ast.walk(_parse(gpu.source)) if isinstance(n, ast.Import) for a in n.names}
    assert {"torch"} <= imported <= {"os", "torch"}, "the GPU check uses torch alone (it runs before xrai is installed)"
    assert len(gpu.source.splitlines()) <= 12, "the GPU check is a few lines"
    assert setup.source.startswith("#@title ") and setup.metadata.get("cellView") == "form", "the install is a Colab form"
    assert 'find_spec("xrai") is None' in setup.source and "--no-index" in setup.source and "--find-links" in setup.source
    assert f"git+https://github.com/{repo}" in setup.source and "curl" not in setup.source and "| bash" not in setup.source
    calls = [n for n in ast.walk(_parse(imports.source)) if isinstance(n, ast.Call)]
    calls = [c for c in calls if not ast.unparse(c.func).startswith("get_ipython")]  # %matplotlib inline
    assert [ast.unparse(c.func) for c in calls] == ["xrai.env.check_runtime"], "the first call after set-up"
    assert ast.unparse(calls[0]) == "xrai.env.check_runtime(show=False)", "the GPU check printed the status already"
    assert params.metadata.get("tags") == ["parameters"]
    assert {"RUN_DIR", "USE_DRIVE"} <= set(_parameters(name)) and _parameters(name)["RUN_DIR"] is None
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert _code(nb)[4].source.startswith("RUN_DIR = xrai.env.prepare_run_dir(RUN_DIR or ")
    run_folder_md = nb.cells[nb.cells.index(_code(nb)[4]) - 1]
    assert run_folder_md.cell_type == "markdown" and len(run_folder_md.source.splitlines()) == 1
    assert "docs/notebooks.md#the-run-folder" in run_folder_md.source


def test_series_parameters():
    assigned = {name: _parameters(name) for name in NAMES}
    assert assigned["01_download"]["DATASET"] == "mura" and assigned["01_download"]["ROOT"] is None
    assert (assigned["01_download"]["VAL_FRACTION"], assigned["01_download"]["TEST_FRACTION"]) == (0.15, 0.15)
    assert {"BODY_PART", "MODEL", "EPOCHS", "IMG_SIZE", "BATCH_SIZE", "SEED", "PRETRAINED"} <= set(assigned["03_train"])
    assert assigned["03_train"]["PRETRAINED"] is True and assigned["03_train"]["EPOCHS"] >= 5
    assert assigned["03_train"]["ALLOW_CPU"] is False and assigned["00_quickstart"]["ALLOW_CPU"] is False
    settings = {n: (assigned[n]["DATASET"], assigned[n]["BODY_PART"], assigned[n]["MODEL"]) for n in TRAINED}
    assert len({settings[n] for n in ("03_train", "04_evaluate", "05_gradcam")}) == 1, "03-05 default to one run"
    quick = assigned["00_quickstart"]
    assert (quick["DATASET"], quick["BODY_PART"], quick["MODEL"], quick["PRETRAINED"], quick["EPOCHS"]) == (
        "mura", "wrist", "mobilenet_v2", True, 5)


@pytest.mark.parametrize("name", NAMES)
def test_setting_parameters_are_colab_dropdowns(name):
    """DATASET, BODY_PART and MODEL as `#@param` dropdowns in the one parameters cell (papermill overrides them)."""
    from xrai.labels import SOURCES
    from xrai.models import list_models

    source = next(c for c in _read(name).cells if "parameters" in c.metadata.get("tags", [])).source
    wanted = {"DATASET": SOURCES, "BODY_PART": None, "MODEL": list_models()} if name in TRAINED else {"DATASET": SOURCES}
    for variable, allowed in wanted.items():
        line = next(ln for ln in source.splitlines() if ln.startswith(f"{variable} = "))
        match = re.search(r"#@param (\[.*?\])", line)
        assert match, f"{name}: {variable} is not a Colab dropdown: {line}"
        choices = ast.literal_eval(match.group(1))
        assert ast.literal_eval(line.split("=", 1)[1].split("#")[0].strip()) in choices
        assert allowed is None or set(choices) <= set(allowed), (variable, choices)
    assert "picker" not in "".join(c.source for c in _code(_read(name))), "the inert ipywidgets pickers are gone"


def test_run_folder_is_named_by_the_setting():
    """A new MODEL (or BODY_PART) is a new run folder; the same setting, the same folder (it resumes)."""
    from xrai.runs import run_dir_for

    assert run_dir_for("mura", "wrist", "mobilenet_v2") != run_dir_for("mura", "wrist", "resnet18")
    assert run_dir_for("mura", "wrist", "mobilenet_v2") != run_dir_for("mura", "hand", "mobilenet_v2")
    assert run_dir_for("mura", "wrist", "mobilenet_v2") == run_dir_for("mura", "wrist", "mobilenet_v2")
    for name in TRAINED:
        prepare = _code(_read(name))[4].source.splitlines()[0]
        assert prepare == ("RUN_DIR = xrai.env.prepare_run_dir(RUN_DIR or xrai.runs.run_dir_for(DATASET, BODY_PART, "
                           "MODEL), use_drive=USE_DRIVE)"), name
    for name in ("01_download", "02_eda"):  # the data's folder, which 03 reads the manifest from
        assert 'RUN_DIR or f"runs/{DATASET}"' in _code(_read(name))[4].source
    assert 'DATA_DIR or f"runs/{DATASET}"' in _code(_read("03_train"))[4].source
    assert "xrai.data.read_manifest(DATA_DIR)" in _sources("03_train")
    assert "xrai.runs.runs_table(" in _sources("04_evaluate")


def test_quickstart_calls_the_functions_the_series_calls():
    def calls(name):
        return {ast.unparse(n.func) for c in _code(_read(name)) for n in ast.walk(_parse(c.source))
                if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("xrai.")}

    series = set().union(*(calls(n) for n in SERIES))
    quick = calls("00_quickstart")
    assert quick <= series, f"00 calls what 01-05 do not: {quick - series}"
    for needed in ("xrai.data.load", "xrai.train.launch", "xrai.evaluate.evaluate_run", "xrai.evaluate.gallery"):
        assert needed in quick


def test_setup_cell_does_nothing_where_xrai_imports(tmp_path, monkeypatch):
    """Run the install cell's code here (xrai is installed): it must not start any process."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the set-up cell ran a command"))
    exec(compile(_code(_read("01_download"))[1].source, "setup", "exec"), {})


@pytest.mark.parametrize(("environ", "says"), [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, f"To get a T4: Kaggle: {KAGGLE_MENU}, then"),
    ({"COLAB_RELEASE_TAG": "x"}, "To get a T4: Colab: Runtime > Change runtime type > Hardware accelerator: T4 GPU"),
    ({}, "open this notebook in Colab (Runtime > Change runtime type"),
])
def test_gpu_check_names_the_menu_path(monkeypatch, capsys, environ, says):
    import torch

    for key in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exec(compile(_code(_read("03_train"))[0].source, "gpu", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("GPU: none; T4: no.") and says in out

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    exec(compile(_code(_read("03_train"))[0].source, "gpu", "exec"), {})
    assert capsys.readouterr().out.strip() == "GPU: Tesla T4; T4: yes"


@pytest.mark.parametrize("name", ["01_download", "02_eda"])
def test_gpu_check_of_01_and_02_says_no_gpu_is_needed(monkeypatch, capsys, name):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exec(compile(_code(_read(name))[0].source, "gpu", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("GPU: none; this notebook needs none"), out
    assert "T4" not in _read(name).cells[0].source.split("**Needs:**")[1].split("·")[0], "01 and 02 ask for no T4"


def test_install_cell_prints_one_line(tmp_path, monkeypatch, capsys):
    import xrai

    monkeypatch.chdir(tmp_path)
    exec(compile(_code(_read("03_train"))[1].source, "setup", "exec"), {})
    assert capsys.readouterr().out == f"xrai {xrai.__version__}: already installed\n"


def test_one_kaggle_menu_path_everywhere():
    texts = {name: (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8") for name in NAMES}
    texts |= {doc: (ROOT / doc).read_text(encoding="utf-8") for doc in ("README.md", "docs/notebooks.md")}
    for where, text in texts.items():
        for path in re.findall(r"Settings[^*`\"\n]*?Accelerator[^*`\"\n]*?T4 x2", text):
            assert path == KAGGLE_MENU, f"{where}: {path!r}, not {KAGGLE_MENU!r}"
    assert all(KAGGLE_MENU in texts[doc] for doc in ("README.md", "docs/notebooks.md"))


@pytest.mark.parametrize("name", NAMES)
def test_papermill_example_names_a_parameter_of_that_notebook(name):
    examples = re.findall(r"-p ([A-Z_]+) ", _sources(name, "markdown"))
    assert examples and set(examples) <= set(_parameters(name)), (name, examples)


@pytest.mark.parametrize("name", NAMES)
def test_not_for_diagnosis_line_near_the_top(name):
    from xrai.deploy.app import RESEARCH_NOTICE

    first = _read(name).cells[0].source
    if name in CLINICAL:
        assert "not for diagnosis" in RESEARCH_NOTICE and "not a medical device, not for diagnosis" in first
        assert first.index("not for diagnosis") < first.index("**Needs:**"), "near the top"
    assert "/docs/reference/" in first and "/docs/performance.md" in first, "what you should see"
    if name in REFERENCE_NAMES:
        assert f"/docs/reference/{name}.ipynb" in first


def test_class_names_come_from_the_run_and_mura_abnormal_is_explained():
    for name in NAMES:
        assert '"abnormal"' not in _sources(name), f"{name} names the classes itself (FracAtlas says fractured)"
    for name in ("00_quickstart", "01_download", "03_train"):
        assert "xrai.labels.class_names(" in _sources(name)
    for name in ("00_quickstart", "01_download", "04_evaluate"):
        assert "not only fractures" in _sources(name, "markdown")


def test_metrics_in_plain_words_after_the_tables():
    cells = [c.source for c in _code(_read("04_evaluate"))]
    words = next(i for i, c in enumerate(cells) if "metrics_in_words" in c)
    assert cells[words] == "Markdown(xrai.evaluate.metrics_in_words(report_valid, report_test))"
    tables = ("thresholds_table(report", "calibration_table(report", 'report_test["image"]', 'report_test["study"]')
    assert all(words > i for i, c in enumerate(cells) if any(t in c for t in tables))
    assert "Markdown(xrai.evaluate.metrics_in_words(report_valid, report_test, short=True))" in _sources("00_quickstart")


def test_gradcam_teaches():
    code, text = _sources("05_gradcam"), _sources("05_gradcam", "markdown")
    assert "Markdown(xrai.evaluate.gradcam_in_words(RUN_DIR, SPLIT))" in code
    for kind in ("tp", "fp", "fn", "tn"):
        assert f'display(Image(filename=str(GALLERY["{kind}"])))' in code
        assert f'display(Image(filename=str(GALLERY["{kind}"])))' in _sources("00_quickstart")
    assert "original | heat map | overlay" in text and "correct normals" in text
    shortcut = next(c.source for c in _read("05_gradcam").cells if c.source.startswith("## A worked example"))
    for word in ('"L"/"R"', "text", "Hardware", "cast", "edge"):
        assert word in shortcut, word


@pytest.mark.parametrize("name", ["00_quickstart", "05_gradcam"])
def test_your_own_xray_then_export_then_model_card(name):
    assert _parameters(name)["MY_XRAY"] is None
    code = _sources(name)
    order = [code.index(call) for call in ("xrai.evaluate.explain_file(RUN_DIR, MY_XRAY", "xrai.widgets.xray_upload(RUN_DIR",
                                           "xrai.deploy.export.export_run(RUN_DIR", "xrai.evaluate.model_card_markdown(RUN_DIR")]
    assert order == sorted(order)
    assert "import xrai.deploy.export" in _code(_read(name))[2].source


@pytest.mark.parametrize("name", ["00_quickstart", "03_train"])
def test_the_seeds_knobs_reach_the_config(name):
    """FREEZE, HEAD, LOGGERS and PRUNE_SPARSITY are parameters and go to TrainConfig's fields of those names."""
    import dataclasses

    from xrai.config import TrainConfig

    params = _parameters(name)
    assert (params["FREEZE"], params["HEAD"], params["LOGGERS"], params["PRUNE_SPARSITY"]) == (False, "linear", [], 0.0)
    calls = [n for c in _code(_read(name)) for n in ast.walk(_parse(c.source))
             if isinstance(n, ast.Call) and ast.unparse(n.func) in ("TrainConfig", "xrai.recipe.recipe_config")]
    assert len(calls) == 1
    keywords = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert set(keywords) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert {k: keywords[k] for k in ("freeze", "head", "loggers", "prune_sparsity")} == {
        "freeze": "FREEZE", "head": "HEAD", "loggers": "LOGGERS", "prune_sparsity": "PRUNE_SPARSITY"}
    TrainConfig(freeze=params["FREEZE"], head=params["HEAD"], loggers=params["LOGGERS"],
                prune_sparsity=params["PRUNE_SPARSITY"])


def test_training_notebook_shows_inputs_parameter_counts_and_model_table():
    code, text = _sources("03_train"), _sources("03_train", "markdown")
    assert "xrai.plots.augmented_batch(config, manifest)" in code
    assert code.count("xrai.models.parameter_count(") == 2
    for topic in ("Transfer learning", "loss", "schedule", "Early stopping on validation AUROC", "Mixed precision",
                  "cached input path"):
        assert topic in text, topic
    table = next(c.source for c in _read("03_train").cells if c.source.startswith("## Models on a T4"))
    assert "estimates, not measurements" in table.lower() and "`densenet169`" in table


def test_rendered_reference_copies_match_the_generator():
    """FAILS until `python tools/render_reference.py` has written docs/reference/ (then commit them): every
    rendered copy's code cells equal the generator's (after the parameters papermill injected), it is under
    2 MB, and its first cell says how it was made."""
    rendered = sorted(REFERENCE_DIR.glob("*.ipynb"))
    assert rendered, f"no rendered copies in {REFERENCE_DIR}: run python tools/render_reference.py"
    assert {p.stem for p in rendered} == REFERENCE_NAMES
    generator = _generator()
    for path in rendered:
        assert path.stat().st_size < 2_000_000, f"{path} is {path.stat().st_size:,} bytes"
        copy = nbformat.read(path, as_version=4)
        made = copy.cells[0]
        assert made.cell_type == "markdown" and "CC BY 4.0" in made.source and "Scientific Data" in made.source
        for word in ("device", "epochs", "image size", "weights"):
            assert word in made.source, word
        code = [c.source for c in copy.cells if c.cell_type == "code"
                and "injected-parameters" not in c.metadata.get("tags", [])]
        assert code == [c.source for c in _code(generator.build(path.stem))], f"{path}: run tools/render_reference.py"


# ---- end to end ---------------------------------------------------------------------------------

GUARD = '''\
"""Test guard for notebook kernels: no connection leaves this machine; each attempt is logged, then refused."""
import os
import socket

_LOG = os.environ["XRAI_TEST_NETWORK_LOG"]
_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


def _check(address):
    host = address[0] if isinstance(address, tuple) else None
    if host is None or str(host).startswith(_LOCAL):
        return
    with open(_LOG, "a") as log:
        log.write(f"connection to {address}\\n")
    raise OSError(f"test guard: no network here (asked for {address})")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
socket.socket.connect = lambda self, address: (_check(address), _connect(self, address))[1]
socket.socket.connect_ex = lambda self, address: (_check(address), _connect_ex(self, address))[1]
'''
FAKE_KAGGLEHUB = '''\
"""Test stand-in: kagglehub must not be reached in these runs."""
import os


def dataset_download(handle, *args, **kwargs):
    with open(os.environ["XRAI_TEST_NETWORK_LOG"], "a") as log:
        log.write(f"kagglehub.dataset_download({handle!r})\\n")
    raise RuntimeError(f"test guard: kagglehub.dataset_download({handle!r}) reached")
'''


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> dict[str, str]:
    """Environment for kernels that cannot reach the network or kagglehub (both log what they were asked)."""
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(GUARD)
    (folder / "kagglehub").mkdir()
    (folder / "kagglehub" / "__init__.py").write_text(FAKE_KAGGLEHUB)
    pythonpath = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pythonpath, "XRAI_TEST_NETWORK_LOG": str(folder / "network.log"),
            "KAGGLEHUB_CACHE": str(folder / "kagglehub-cache")}


def _execute(name: str, out_dir: Path, cwd: Path, parameters: dict, environ: dict | None = None,
             notebook: Path | None = None) -> nbformat.NotebookNode:
    """Run one notebook (``notebook``: another copy of it) with papermill in a new kernel process that sees
    ``environ`` (a fresh runtime)."""
    import papermill

    source = notebook or NOTEBOOK_DIR / f"{name}.ipynb"
    wanted = papermill.inspect_notebook(str(source))
    saved = dict(os.environ)
    os.environ.update(environ or {})
    try:
        papermill.execute_notebook(
            str(source),
            str(out_dir / f"{name}.ipynb"),
            parameters={k: v for k, v in parameters.items() if k in wanted},
            kernel_name="python3",
            cwd=str(cwd),
            progress_bar=False,
            request_save_on_cell_execute=False,
            execution_timeout=600,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nbformat.read(out_dir / f"{name}.ipynb", as_version=4)


def _outputs(nb: nbformat.NotebookNode, marker: str) -> list:
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return cell.outputs


def _text(nb: nbformat.NotebookNode, marker: str) -> str:
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in _outputs(nb, marker))


def _found(nb: nbformat.NotebookNode) -> tuple[str, str, float]:
    """(where, how, seconds) from the line read_manifest's cell printed."""
    match = FOUND.search(_text(nb, 'print(manifest.attrs["found"])'))
    assert match, "the notebook did not say where it found the images"
    return match.group(2), match.group(3), float(match.group(4))


QUICKSTART_FILES = ("manifest.csv", "manifest.json", "config.json", "checkpoints/best.pt", "checkpoints/last.pt",
                    "history.csv", "curves.png", "predictions_valid.csv", "predictions_test.csv", "report_valid.json",
                    "report_test.json", "gradcam/tp_test.png", "gradcam/fp_test.png", "gradcam/fn_test.png",
                    "gradcam/tn_test.png")
SERIES_FILES = QUICKSTART_FILES + ("audit.csv", "confusion_matrix_test.png", "roc_test.png", "pr_test.png",
                                   "per_body_part_test.png", "eda/class_balance.png", "eda/samples.png",
                                   "eda/image_sizes.png", "eda/patients_per_part.png", "eda/audit_groups.png")


def _check_artifacts(run_dir: Path, *, epochs: int = 1, body_part: str | None = None, quickstart: bool = False) -> None:
    import pandas as pd

    for name in QUICKSTART_FILES if quickstart else SERIES_FILES:
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    assert len(pd.read_csv(run_dir / "history.csv")) == epochs
    report = json.loads((run_dir / "report_test.json").read_text())
    assert report["threshold_from"] == "valid" and "auroc" in report["image"]
    assert quickstart or list((run_dir / "gradcam" / "browser").glob("*.png")), "the browser drew no overlay"
    for figure in [*run_dir.glob("*.png"), *run_dir.glob("eda/*.png"), *run_dir.glob("gradcam/**/*.png")]:
        assert_picture(figure, min_side=64)  # every figure a real picture, not an empty canvas
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["epochs"], config["pretrained"]) == (epochs, False)
    assert not pd.read_csv(run_dir / "manifest.csv")["path"].str.startswith("/").any(), "absolute paths on disk"
    if body_part is not None:
        assert config["body_part"] == body_part
        assert set(pd.read_csv(run_dir / "predictions_test.csv")["body_part"]) == {body_part}


def _check_static_widgets(executed: dict, *, batch: bool) -> None:
    """No blank widget cells: the browser as a picture (and no widget view in a batch run)."""
    browser = _outputs(executed["05_gradcam"], "xrai.widgets.show(browser)")
    assert any("image/png" in o.get("data", {}) for o in browser), "the browser left no picture"
    for output in browser:
        assert (WIDGET_MIME in output.get("data", {})) is not batch


def _network_calls(guard: dict) -> str:
    log = Path(guard["XRAI_TEST_NETWORK_LOG"])
    return log.read_text() if log.is_file() else ""


@pytest.fixture(scope="module")
def colab_like(tmp_path_factory, guard):
    """Every notebook in a fresh "runtime" (own process, XRAI_HOME, working folder); RUN_DIR on "Drive".

    03 runs twice: once for one epoch, then, in another fresh runtime, again with two epochs, which
    resumes the run after its first epoch (what re-running 03 after a disconnect does).
    """
    from xrai.data import make_synthetic

    tmp = tmp_path_factory.mktemp("colab")
    run_dir = tmp / "drive" / "MyDrive" / "xrai" / "runs" / "ci"
    executed, seconds, previous_home = {}, {}, None
    steps = [("01_download", {}), ("02_eda", {}), ("03_train", {}), ("03_train", {"EPOCHS": 2}),
             ("04_evaluate", {}), ("05_gradcam", {}), ("00_quickstart", {})]
    for i, (name, extra) in enumerate(steps):
        if previous_home is not None:
            shutil.rmtree(previous_home)  # the last runtime is gone, and its caches and data with it
        home, work = tmp / f"home{i}", tmp / f"content{i}"
        work.mkdir()
        parameters = {"DATASET": "synthetic", "RUN_DIR": str(run_dir), "DATA_DIR": str(run_dir), **FAST, **extra}
        if name in ("01_download", "00_quickstart"):  # the runtime makes its (tiny) synthetic set
            parameters["ROOT"] = str(make_synthetic(home / "synthetic", **TINY))
        if name == "00_quickstart":
            parameters["RUN_DIR"] = str(run_dir.parent / "quickstart")
        environ = {**guard, "XRAI_HOME": str(home), "COLAB_RELEASE_TAG": "release-colab-test",
                   "XRAI_KAGGLE_INPUT": str(tmp / "no-kaggle-input")}
        start = time.perf_counter()
        executed[name] = _execute(name, work, work, parameters, environ)
        seconds[f"{name}{'+resume' if extra else ''}"] = round(time.perf_counter() - start, 1)
        previous_home = home
    (tmp / "seconds.json").write_text(json.dumps(seconds))
    return run_dir, executed, seconds


@pytest.mark.slow
def test_colab_like_each_notebook_in_a_fresh_runtime(colab_like, guard):
    run_dir, executed, seconds = colab_like
    _check_artifacts(run_dir, epochs=2)
    _check_artifacts(run_dir.parent / "quickstart", body_part="wrist", quickstart=True)
    resolving = {}
    for _i, name in enumerate(["02_eda", "03_train", "04_evaluate", "05_gradcam"], start=1):
        where, how, took = _found(executed[name])
        if name in ("04_evaluate", "05_gradcam"):  # the valid and test images from 01's zip: no second download
            assert how.startswith("valid+test images from") and "split_images.zip" in how and "no download" in how
        else:  # 02 reads every split and 03 trains: the whole set again (the stand-in for MURA's download)
            assert how == "synthetic set regenerated" and "synthetic-v" in where, (name, where, how)
        resolving[name] = took
    assert "resumed" in _text(executed["03_train"], "xrai.train.launch(").lower()
    assert "To get a T4: Colab: " in _text(executed["03_train"], "GPU = torch.cuda")  # the GPU check saw Colab
    _check_static_widgets(executed, batch=False)
    assert _network_calls(guard) == ""
    print(f"\ncolab-like notebook seconds: {seconds}, total {sum(seconds.values()):.0f} s; "
          f"seconds re-resolving the images in a fresh runtime: {resolving}")


SCORED_READ = 'xrai.data.read_manifest(RUN_DIR, splits=("valid", "test"))'  # 04's and 05's images only


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_colab_like_04_and_05_read_their_images_from_the_run_folder_not_a_download(colab_like, guard, tmp_path):
    """Before (no split_images.zip): a fresh runtime gets the whole set again (here the synthetic set is
    regenerated, the stand-in for MURA's 3.3 GB download). After: 04 and 05 extract the valid and test
    images from RUN_DIR/split_images.zip, which 01 wrote on "Colab", and nothing is downloaded or made.

    "After" is the series' own 04 and 05 (each in a fresh runtime); "before" runs 04 once more, in another
    fresh runtime, on a copy of the run whose zip is gone (05 gets its images by the same call)."""
    from xrai.runs.layout import RunFolder

    series_dir, executed, _ = colab_like
    archive = RunFolder(series_dir).split_images_zip
    assert archive.is_file(), "01 on Colab kept no split_images.zip"
    measured = {}
    for name in ("04_evaluate", "05_gradcam"):
        where, how, _ = _found(executed[name])
        assert how.startswith(f"valid+test images from {series_dir.name}/split_images.zip") and "no download" in how
        cell = next(c for c in _code(executed[name]) if 'print(manifest.attrs["found"])' in c.source)
        measured[f"{name} after"] = {"how": how, "bytes": archive.stat().st_size,
                                     "seconds": cell.metadata.papermill.duration}
    run_dir = tmp_path / "drive" / "run"
    shutil.copytree(series_dir, run_dir, ignore=shutil.ignore_patterns(archive.name))  # the zip never written
    home, work = tmp_path / "home-before", tmp_path / "content-before"
    work.mkdir()
    environ = {**guard, "XRAI_HOME": str(home), "COLAB_RELEASE_TAG": "release-colab-test",
               "XRAI_KAGGLE_INPUT": str(tmp_path / "no-kaggle-input")}
    for name in ("04_evaluate", "05_gradcam"):  # each reads the valid and test images only
        assert any(SCORED_READ in c.source for c in _code(_read(name))), f"{name} reads more than it scores"
    nb = _execute("04_evaluate", work, work, {"RUN_DIR": str(run_dir), **FAST}, environ)
    where, how, _ = _found(nb)
    cell = next(c for c in _code(nb) if 'print(manifest.attrs["found"])' in c.source)
    assert how == "synthetic set regenerated" and sorted(home.glob("synthetic-v*")), how
    measured["04_evaluate before"] = {"how": how, "bytes": _folder_bytes(Path(where)),
                                      "seconds": cell.metadata.papermill.duration}
    assert measured["04_evaluate before"]["bytes"] > archive.stat().st_size
    _check_artifacts(run_dir, epochs=2)
    assert _network_calls(guard) == ""
    print("\ncolab-like 04/05 getting their images (bytes fetched, or read from Drive; seconds of the cell):")
    for key, value in measured.items():
        print(f"  {key}: {value['bytes']:,} bytes, {value['seconds']:.2f} s ({value['how']})")


def _tree_state(folder: Path) -> dict[str, tuple]:
    """Every path under folder with its mode, size and content hash (folders: mode only)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        state[str(path.relative_to(folder))] = (info.st_mode, info.st_size if path.is_file() else 0, digest)
    return state


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _kaggle_series(tmp: Path, guard: dict, *, dataset: str, data: Path, mount: str, names: list[str],
                   extra: dict, attach: dict[str, Path] | None = None, environ_extra: dict | None = None,
                   ) -> tuple[dict, dict, Path]:
    """One Kaggle notebook per step: its own working folder and input folder, the data attached at ``mount``
    (a symlink), the previous notebook's output attached read-only; the input folder must not change.
    ``attach`` ({mount: folder}) attaches more datasets to every notebook (copies)."""
    executed, seconds, previous = {}, {}, None
    for i, name in enumerate(names):
        inputs, work, home = tmp / f"input{i}", tmp / f"working{i}", tmp / f"home{i}"
        (inputs / mount).parent.mkdir(parents=True)
        (inputs / mount).symlink_to(data, target_is_directory=True)
        for where, folder in (attach or {}).items():
            shutil.copytree(folder, inputs / where)
        if previous is not None and name != "00_quickstart":
            shutil.copytree(previous, inputs / "notebooks" / "tester" / f"xrai-{names[i - 1]}")
        _read_only(inputs)
        work.mkdir()
        before = _tree_state(inputs)
        environ = {**guard, "XRAI_HOME": str(home), "XRAI_KAGGLE_INPUT": str(inputs), "KAGGLE_KERNEL_RUN_TYPE": "Batch",
                   "KAGGLE_URL_BASE": "https://www.kaggle.com", "KAGGLE_DATA_PROXY_URL": "http://127.0.0.1:9",
                   **(environ_extra or {})}
        parameters = {"DATASET": dataset, "ROOT": None, "RUN_DIR": "runs/ci", "DATA_DIR": "runs/ci", "ALLOW_CPU": True,
                      **FAST, **extra}
        start = time.perf_counter()
        executed[name] = _execute(name, tmp, work, parameters, environ)
        seconds[name] = round(time.perf_counter() - start, 1)
        assert _tree_state(inputs) == before, f"{name} changed something under the input folder"
        _writable(inputs)
        shutil.rmtree(inputs)  # that session is over: its input folder and caches are gone
        shutil.rmtree(home, ignore_errors=True)
        if name != "00_quickstart":
            previous = work
    return executed, seconds, previous


def _check_kaggle(executed: dict, last_work: Path, guard: dict, *, mount_root: str,
                  body_part: str | None) -> dict[str, float]:
    """Check a Kaggle-like series; returns the seconds each notebook spent finding the images again."""
    _check_artifacts(last_work / "runs" / "ci", body_part=body_part)
    resolving = {}
    for name in ("02_eda", "03_train", "04_evaluate", "05_gradcam"):
        run_line = _text(executed[name], "RUN_DIR = xrai.env.prepare_run_dir(")
        assert "copied from" in run_line and "notebooks/tester/xrai-" in run_line, run_line
        where, how, resolving[name] = _found(executed[name])
        assert how == "attached in Kaggle" and mount_root in where, (name, where, how)
    assert "To get a T4: Kaggle: " in _text(executed["03_train"], "GPU = torch.cuda")  # the GPU check saw Kaggle
    _check_static_widgets(executed, batch=True)
    assert _network_calls(guard) == ""
    return resolving


@pytest.mark.slow
def test_kaggle_like_one_notebook_per_step_internet_off(tmp_path, guard):
    from xrai.data import make_synthetic

    data = make_synthetic(tmp_path / "mura-v11-copy", **TINY)  # MURA's layout, attached as cjinny/mura-v11
    names = ["01_download", "02_eda", "03_train", "04_evaluate", "05_gradcam", "00_quickstart"]
    executed, seconds, last = _kaggle_series(tmp_path, guard, dataset="mura", data=data,
                                             mount="datasets/cjinny/mura-v11", names=names, extra={"BODY_PART": "wrist"})
    resolving = _check_kaggle(executed, last, guard, mount_root="datasets/cjinny/mura-v11/MURA-v1.1", body_part="wrist")
    _check_artifacts(tmp_path / "working5" / "runs" / "ci", body_part="wrist", quickstart=True)
    print(f"\nkaggle-like notebook seconds: {seconds}, total {sum(seconds.values()):.0f} s; "
          f"seconds finding the images again: {resolving}")


@pytest.mark.slow
def test_kaggle_like_pretrained_weights_from_the_attached_wheelhouse_internet_off(tmp_path, guard):
    """03 with PRETRAINED = True and the Internet off: the ImageNet weights come from the wheelhouse dataset."""
    import torch
    import torchvision

    from xrai.data import make_synthetic
    from xrai.models.registry import MODELS
    from xrai.models.weights import WEIGHTS_DIR, weights_file_name, write_sums
    from xrai.runs.layout import RunFolder

    data = make_synthetic(tmp_path / "mura-v11-copy", **TINY)
    weights_dir = tmp_path / "xrai-wheelhouse" / WEIGHTS_DIR  # what `python -m xrai wheelhouse --weights` writes
    weights_dir.mkdir(parents=True)
    file = weights_file_name(torchvision.models.get_weight(MODELS["mobilenet_v2"].weights))
    torch.manual_seed(5)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights_dir / file)  # a fake of the right shapes
    write_sums(weights_dir)
    torch_home = tmp_path / "torch-home"  # torch.hub's cache, empty: the weights must come from the dataset
    names = ["01_download", "03_train"]
    executed, _, last = _kaggle_series(
        tmp_path, guard, dataset="mura", data=data, mount="datasets/cjinny/mura-v11", names=names,
        extra={"BODY_PART": "wrist", "PRETRAINED": True},
        attach={"datasets/tester/xrai-wheelhouse": weights_dir.parent}, environ_extra={"TORCH_HOME": str(torch_home)})
    assert RunFolder(last / "runs" / "ci").checkpoint("best").is_file()
    assert (torch_home / "hub" / "checkpoints" / file).read_bytes() == (weights_dir / file).read_bytes()
    assert _network_calls(guard) == ""


@pytest.mark.slow
@pytest.mark.real
def test_kaggle_like_on_the_real_fracatlas_subset(tmp_path, guard, fracatlas_root):
    mount = "datasets/mahmudulhasantasin/fracatlas-original-dataset/FracAtlas"
    executed, seconds, last = _kaggle_series(tmp_path, guard, dataset="fracatlas", data=fracatlas_root, mount=mount,
                                             names=SERIES, extra={"BODY_PART": "hip"})
    resolving = _check_kaggle(executed, last, guard, mount_root=mount, body_part="hip")
    print(f"\nkaggle-like FracAtlas notebook seconds: {seconds}, total {sum(seconds.values()):.0f} s; "
          f"seconds finding the images again: {resolving}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["03_train", "05_gradcam"])  # 03 stops at the GPU cell, the others at the manifest
def test_a_notebook_without_its_input_says_which_notebook_makes_it(name, tmp_path, guard):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as info:
        _execute(name, tmp_path, tmp_path, {"RUN_DIR": str(tmp_path / "empty"), "DATA_DIR": str(tmp_path / "empty"), **FAST},
                 {**guard, "XRAI_HOME": str(tmp_path / "home")})
    message = f"{info.value.ename}: {info.value.evalue}"
    assert "FileNotFoundError" in message and "01_download" in message, message
