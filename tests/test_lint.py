"""ruff's small rule set (pyflakes, isort, pyupgrade, bugbear; pyproject.toml [tool.ruff]) on the code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: it is in the test extra (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "xrai", "tests", "tools"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
