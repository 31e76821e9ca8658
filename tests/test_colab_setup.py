"""colab_setup.sh: clones or updates the repository, installs xrai, and keeps the runtime's torch.

The full test builds a fresh virtual environment with torch from this machine's wheel cache (as a
Colab runtime comes with its own torch), then runs the script twice against a local git "remote": the
first run clones and installs, the second pulls and reinstalls. It takes a few minutes, so it runs
only with XRAI_TEST_COLAB_SETUP=1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "colab_setup.sh"


def _bash(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_script_is_valid_bash_and_names_the_repository_the_badges_use():
    assert _bash("-n", str(SCRIPT)).returncode == 0
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert f'REPO="${{XRAI_REPO:-{generator.REPO}}}"' in SCRIPT.read_text()


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    proc = _bash(str(SCRIPT), env={**os.environ, "XRAI_SRC": str(tmp_path), "XRAI_PYTHON": sys.executable})
    assert proc.returncode != 0
    assert f"XRAI_SRC={tmp_path} is not an x-rai checkout" in proc.stderr


def _source_copy(dest: Path) -> Path:
    """The files a clone of the repository holds (no build outputs), with a README if the tree has none yet."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "runs", ".pytest_cache")
    shutil.copytree(ROOT / "xrai", dest / "xrai", ignore=ignore)
    for name in ("pyproject.toml", "requirements.txt", "colab_setup.sh", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    if not (dest / "README.md").is_file():
        (dest / "README.md").write_text("# x-rai\n")
    return dest


def _git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _version(python: Path, package: str) -> str:
    code = f"from importlib import metadata; print(metadata.version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("XRAI_TEST_COLAB_SETUP") != "1", reason="set XRAI_TEST_COLAB_SETUP=1 (minutes)")
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_fresh_runtime_gets_xrai_and_keeps_its_torch(tmp_path):
    import torch
    import torchvision

    # a "runtime" with its own torch, as Colab and Kaggle have
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True, timeout=900)
    torch_before = _version(python, "torch")

    # a local "GitHub": the script clones it, then pulls from it
    origin = _source_copy(tmp_path / "origin")
    _git("init", "--quiet", "--initial-branch=main", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("commit", "--quiet", "-m", "x-rai", cwd=origin)
    clone = tmp_path / "session" / "x-rai"
    env = {**os.environ, "XRAI_PYTHON": str(python), "XRAI_GIT_URL": origin.as_uri(), "XRAI_DIR": str(clone)}
    env.pop("XRAI_SRC", None)
    env.pop("PYTHONPATH", None)
    clone.parent.mkdir()
    script = str(clone.parent / "colab_setup.sh")
    shutil.copy2(SCRIPT, script)  # as if fetched with curl: not inside a checkout

    first = _bash(script, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"cloning {origin.as_uri()}" in first.stdout and (clone / ".git").is_dir()
    assert f"keeping torch=={torch_before}" in first.stdout

    check = "import xrai, xrai.env, ipywidgets, torch; print(xrai.__file__, torch.__version__)"
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(env_dir) in out.stdout, "xrai must be installed into the runtime, not imported from a source tree"
    assert _version(python, "torch") == torch_before

    (origin / "xrai" / "__init__.py").write_text((origin / "xrai" / "__init__.py").read_text() + "UPDATED = True\n")
    _git("commit", "--quiet", "-am", "update", cwd=origin)
    second = _bash(script, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"updating {clone}" in second.stdout
    out = subprocess.run([str(python), "-c", "import xrai; print(xrai.UPDATED)"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr
    assert _version(python, "torch") == torch_before
