"""Shared fixtures: a tiny synthetic MURA tree, the real FracAtlas subset when present, an isolated XRAI_HOME,
a headless Chromium for the browser tests (skipped without one, a failure under CI=true)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_FRACATLAS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas-dev"


@pytest.fixture(scope="session", autouse=True)
def _isolated_xrai_home(tmp_path_factory):
    """Keep every cache a test makes out of the user's ~/.cache."""
    home = tmp_path_factory.mktemp("xrai_home")
    old = os.environ.get("XRAI_HOME")
    os.environ["XRAI_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("XRAI_HOME", None)
    else:
        os.environ["XRAI_HOME"] = old


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from xrai.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), patients_per_part=3, size=96)


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_root):
    from xrai.data import load

    return load("synthetic", root=synthetic_root, progress=False)


@pytest.fixture(scope="session")
def fracatlas_root() -> Path:
    root = Path(os.environ.get("XRAI_FRACATLAS_DEV", REAL_FRACATLAS))
    if not (root / "dataset.csv").is_file():
        pytest.skip(f"real FracAtlas subset not found at {root}")
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The run folder of `python -m xrai demo`, run once per session exactly as a user runs it."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "xrai", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,  # minutes when quiet; a loaded shared machine is slower
    )
    if proc.returncode != 0:
        raise AssertionError(f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    (out / "demo_stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, synthetic_manifest) -> Path:
    """A MobileNetV2 run (64 px) on the tiny synthetic set, evaluated on valid: a run folder as predict,
    evaluate, serve and export take it, made in seconds where the demo takes minutes.

    Untrained, but not constant (test_evaluate.make_fake_run): its BatchNorm statistics are those of a few
    synthetic images (a freshly initialised MobileNetV2 saturates its ReLU6s and answers 0.5067 whatever the
    image, which would let any comparison of two predictions pass), so its probabilities depend on the image.
    """
    from test_evaluate import make_fake_run

    from xrai.evaluate.run import evaluate_run

    run = make_fake_run(tmp_path_factory.mktemp("evaluated") / "evaluated-run", synthetic_manifest)
    evaluate_run(run, split="valid", progress=False, n_bootstrap=50, device="cpu", explain_images=0)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared 2-core machine two threads contend and run
    many times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- real browser (tests/test_*_browser.py) -------------------------------------------------------

BROWSER_INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
BROWSER_WINDOW = (1280, 1000)


def in_ci() -> bool:
    """True under CI (CI=true, as .ci/run exports it): there a missing browser fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it under CI, where everything a browser test needs must be there."""
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, or skip (fail under CI) naming the apt-get line that installs them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} not on PATH (Debian, as root: {BROWSER_INSTALL})")
    return chromium, chromedriver


@pytest.fixture()
def chromium(monkeypatch):
    """A headless Chromium driven by selenium through the system chromedriver, quit after the test.

    Skipped where chromium, chromedriver or selenium is missing; under CI=true that is a failure.
    selenium-manager never runs (the driver's path is given, SE_OFFLINE is set), so nothing is downloaded.
    """
    chromium_path, chromedriver = chromium_paths()
    try:  # imported here, not at the top: conftest loads for every test, selenium is for these only
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size={},{}".format(*BROWSER_WINDOW), "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_colours(path: Path) -> tuple[float, int]:
    """The standard deviation of a screenshot's grey levels and its number of distinct colours (blank: 0, 1)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    return float(rgb.mean(axis=2).std()), colours
