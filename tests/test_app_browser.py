"""End to end in a real headless Chromium: upload X-rays (PNG, DICOM) through the form, see the result.

Needs Debian's `chromium` and `chromium-driver` (both on PATH) and selenium: skipped without them, a
failure under CI=true (the `chromium` fixture of conftest.py). Selenium is pointed at the system
chromedriver, so selenium-manager never downloads anything. Every wait is bounded; the server (waitress,
in a thread) is closed when the module ends. Set XRAI_SCREENSHOT=/some/dir to keep the screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import screenshot_colours
from dicom_files import assert_no_secrets, write_dicom
from PIL import Image
from test_app import bomb_png, build_fake_run, xray_array

from xrai.deploy.app import MAX_UPLOAD_BYTES, create_app
from xrai.deploy.server import serve_in_thread

try:  # a test extra: without it the `chromium` fixture skips (fails under CI) before any of these is used
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    By = ec = WebDriverWait = None
    WebDriverException = Exception

pytestmark = pytest.mark.browser

WAIT_S = 60  # the longest any page may take (one CPU inference with Grad-CAM takes well under a second)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """The app under the production server (waitress, as `python -m xrai serve` runs it), in a thread."""
    run = build_fake_run(tmp_path_factory.mktemp("browser_run"), image_size=96, name="browser-demo")
    with serve_in_thread(create_app(run)) as url:
        yield url


def submit(browser, url: str, path: Path):
    """Open the page, choose ``path`` in the file input and press Predict; returns once the answer loaded."""
    browser.get(url)
    assert "X-RAI" in browser.title
    assert "not for diagnosis" in browser.find_element(By.ID, "research-notice").text
    form_page = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, WAIT_S).until(lambda _: _gone(form_page))  # the answer is a new page


def _gone(element) -> bool:
    """Whether the page ``element`` was on has been replaced. Chromium may answer the check mid-navigation with
    "Node with given id does not belong to the document" (a plain WebDriverException) rather than a stale
    reference: that is gone too."""
    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException is one
        return True
    return False


def keep_screenshot(browser, tmp_path: Path, name: str) -> Path:
    """Save a screenshot (copied to $XRAI_SCREENSHOT/ when set) and check it is not blank."""
    shot = tmp_path / name
    assert browser.save_screenshot(str(shot))
    if os.environ.get("XRAI_SCREENSHOT"):
        keep = Path(os.environ["XRAI_SCREENSHOT"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / name)
    spread, colours = screenshot_colours(shot)
    assert spread > 10 and colours > 50, f"{name} looks blank: grey std {spread:.1f}, {colours} colours"
    return shot


def assert_result(browser, filename: str, *, run: str = "browser-demo") -> None:
    """The result section: a probability in 0..100 %, a label, and a decoded Grad-CAM overlay."""
    probability = WebDriverWait(browser, WAIT_S).until(ec.visibility_of_element_located((By.ID, "probability")))
    percent = float(probability.text.rstrip("%"))
    assert 0.0 <= percent <= 100.0
    value = float(browser.find_element(By.ID, "probability-value").text)
    assert abs(value * 100 - percent) <= 0.05 + 1e-9
    assert browser.find_element(By.ID, "label").text in ("normal", "abnormal")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    # The browser really decoded the PNG: a broken image has naturalWidth 0.
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
    assert overlay.size["width"] > 100
    assert filename in browser.find_element(By.ID, "result").text
    assert run in browser.find_element(By.ID, "run").text
    assert not browser.find_elements(By.ID, "error")


def test_upload_in_chromium_shows_probability_and_overlay(chromium, server_url, tmp_path):
    xray = tmp_path / "synthetic_wrist.png"
    Image.fromarray(xray_array(height=320, width=240, seed=3)).save(xray)
    submit(chromium, server_url, xray)
    assert_result(chromium, "synthetic_wrist.png")
    keep_screenshot(chromium, tmp_path, "app_png.png")


def test_dicom_upload_in_chromium_shows_probability_and_overlay(chromium, server_url, tmp_path):
    # 12-bit MONOCHROME1 with a window, as a DX modality writes it; its patient tags must never show.
    pixels = (4095 - xray_array(height=320, width=240, seed=5).astype("uint16") * 16).astype("uint16")
    dcm = write_dicom(tmp_path / "wrist_study.dcm", pixels, photometric="MONOCHROME1", bits_stored=12,
                      window=(2048, 4096))
    submit(chromium, server_url, dcm)
    assert_result(chromium, "wrist_study.dcm")
    assert_no_secrets(chromium.page_source, "the result page")
    keep_screenshot(chromium, tmp_path, "app_dicom.png")


def oversized(tmp_path: Path) -> tuple[Path, str]:
    """A file just over the upload limit (10 MB): the app's own 413 page names the limit."""
    path = tmp_path / "huge_scan.png"
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.truncate(MAX_UPLOAD_BYTES + 4096)
    return path, f"larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"


def bomb(tmp_path: Path) -> tuple[Path, str]:
    """A 140 kB PNG that would decode to 137 MiB: refused from its header, naming the decode budget."""
    path = tmp_path / "huge_scan.png"
    path.write_bytes(bomb_png(6000, 6000, rgba=True))
    return path, "limit of 64 MiB"


@pytest.mark.parametrize("make", [oversized, bomb], ids=["over_10MB", "decodes_over_budget"])
def test_oversized_upload_in_chromium_shows_the_refusal(chromium, server_url, tmp_path, make):
    path, limit = make(tmp_path)
    submit(chromium, server_url, path)
    error = WebDriverWait(chromium, WAIT_S).until(ec.visibility_of_element_located((By.ID, "error")))
    assert limit in error.text
    assert not chromium.find_elements(By.ID, "result")
    assert chromium.find_element(By.ID, "file")  # the form is there to try again
    keep_screenshot(chromium, tmp_path, f"app_refused_{make.__name__}.png")


def test_bad_upload_in_chromium_shows_the_error(chromium, server_url, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all\n")
    submit(chromium, server_url, fake)
    error = WebDriverWait(chromium, 30).until(ec.visibility_of_element_located((By.ID, "error")))
    assert "notes.png" in error.text
    assert chromium.find_element(By.ID, "file")  # the form is there to try again
