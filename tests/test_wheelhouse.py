"""python -m xrai wheelhouse: which packages go in, and the notebooks' install cell using it offline."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from xrai.deploy.wheelhouse import KAGGLE_PROVIDES, NEVER, select_packages

ROOT = Path(__file__).resolve().parents[1]


def test_selection_follows_requirements_and_stops_at_the_image_and_at_torch():
    requires = {
        "grad-cam": ["torch>=1.7", "ttach", "numpy", "opencv-python-headless", "matplotlib"],
        "ttach": [],
        "waitress": [],
        "tiny-dep": ["torch"],
    }
    chosen = select_packages(["torch>=2.1", "torchvision>=0.16", "numpy>=1.24", "grad-cam>=1.5",
                              "Waitress>=2.1 ; python_version >= '3.8'", "# a comment", "", "tiny_dep"],
                             requires=lambda name: requires.get(name, []))
    assert chosen == ["grad-cam", "tiny-dep", "ttach", "waitress"]


def test_selection_on_xrai_own_requirements():
    chosen = select_packages((ROOT / "requirements.txt").read_text().splitlines())
    assert {"grad-cam", "ttach"} <= set(chosen)
    assert not set(chosen) & (NEVER | KAGGLE_PROVIDES), "torch and what Kaggle's image ships stay out"


def test_a_pip_failure_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    import xrai.deploy.wheelhouse
    from xrai.cli.commands import main

    def failing_pip(*args):
        return subprocess.CompletedProcess(["pip", *args], 1, stdout="", stderr="Collecting x\nERROR: no network\n")

    monkeypatch.setattr(xrai.deploy.wheelhouse, "_pip", failing_pip)
    assert main(["wheelhouse", "--xrai-only", "--out", str(tmp_path / "wheels")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "xrai wheelhouse: pip could not get xrai: ERROR: no network (-v shows the traceback)"
    with pytest.raises(RuntimeError, match="no network"):  # still a RuntimeError for callers of the API
        main(["-v", "wheelhouse", "--xrai-only", "--out", str(tmp_path / "wheels")])


def _fresh_python(tmp: Path) -> Path:
    """A venv that sees this environment's packages (a linked folder) but not xrai: a runtime without xrai."""
    deps = tmp / "deps"
    deps.mkdir()
    ours = Path(site.getsitepackages()[0])
    for entry in ours.iterdir():
        lowered = entry.name.lower()
        if "xrai" in lowered or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (deps / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = tmp / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text(f"{deps}\n")
    return python


@pytest.mark.slow
def test_install_cell_installs_xrai_from_an_attached_wheelhouse_offline(tmp_path):
    import nbformat

    wheels = tmp_path / "input" / "datasets" / "me" / "xrai-wheelhouse"
    build = subprocess.run([sys.executable, "-m", "xrai", "wheelhouse", "--xrai-only", "--out", str(wheels)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert [w.name for w in wheels.iterdir()] == [next(wheels.glob("xrai-*-py3-none-any.whl")).name]
    python = _fresh_python(tmp_path)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update({"XRAI_KAGGLE_INPUT": str(tmp_path / "input"), "PIP_NO_INDEX": "1",
                    "PIP_CONFIG_FILE": os.devnull})
    assert subprocess.run([python, "-c", "import xrai"], capture_output=True, env=environ, cwd=tmp_path).returncode != 0
    nb = nbformat.read(ROOT / "notebooks" / "03_train.ipynb", as_version=4)
    gpu_cell, install_cell = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    script = tmp_path / "cells.py"
    script.write_text(gpu_cell + "\n" + install_cell + "\nimport torch, xrai\nprint('xrai at', xrai.__file__, "
                      "'torch', torch.__version__)\n")
    run = subprocess.run([python, str(script)], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"installing xrai from {wheels}, keeping torch" in run.stdout
    import torch

    assert f"xrai at {tmp_path / 'venv'}" in run.stdout and f"torch {torch.__version__}" in run.stdout


@pytest.mark.slow
def test_install_cell_without_wheelhouse_or_network_names_both_ways_out(tmp_path):
    import nbformat

    python = _fresh_python(tmp_path)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pip must fail fast and offline: an unreachable proxy and no retries
    environ.update({"XRAI_KAGGLE_INPUT": str(tmp_path / "input"), "PIP_PROXY": "http://127.0.0.1:9",
                    "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull,
                    "GIT_TERMINAL_PROMPT": "0", "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    nb = nbformat.read(ROOT / "notebooks" / "01_download.ipynb", as_version=4)
    script = tmp_path / "cells.py"
    script.write_text([c.source for c in nb.cells if c.cell_type == "code"][1])
    run = subprocess.run([python, str(script)], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=600)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: xrai could not be installed (")
    assert "Internet on" in last and "wheelhouse" in last
