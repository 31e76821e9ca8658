"""End to end in a real headless Chromium: upload a synthetic X-ray through the form, see the result.

Needs Debian's `chromium` and `chromium-driver` (both on PATH) and selenium; skipped otherwise.
Selenium is pointed at the system chromedriver, so selenium-manager never downloads anything.
Set XRAI_SCREENSHOT=/some/file.png to keep a copy of the screenshot outside the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_app import build_fake_run, xray_array

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not on PATH "
                       "(Debian: apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """The app under the production server (waitress, as `python -m xrai serve` runs it), in a thread."""
    from xrai.deploy.app import create_app
    from xrai.deploy.server import serve_in_thread

    run = build_fake_run(tmp_path_factory.mktemp("browser_run"), image_size=96, name="browser-demo")
    with serve_in_thread(create_app(run)) as url:
        yield url


@pytest.fixture()
def browser(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: selenium-manager must not go online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_in_chromium_shows_probability_and_overlay(browser, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    xray = tmp_path / "synthetic_wrist.png"
    Image.fromarray(xray_array(height=320, width=240, seed=3)).save(xray)

    browser.get(server_url)
    assert "X-RAI" in browser.title
    assert "not for diagnosis" in browser.find_element(By.ID, "research-notice").text
    browser.find_element(By.ID, "file").send_keys(str(xray))
    browser.find_element(By.ID, "submit").click()

    probability = WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.ID, "probability")))
    percent = float(probability.text.rstrip("%"))
    assert 0.0 <= percent <= 100.0
    assert browser.find_element(By.ID, "label").text in ("normal", "abnormal")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    # The browser really decoded the PNG: a broken image has naturalWidth 0.
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
    assert overlay.size["width"] > 100
    assert "synthetic_wrist.png" in browser.page_source
    assert "browser-demo" in browser.find_element(By.ID, "run").text

    shot = tmp_path / "app_screenshot.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("XRAI_SCREENSHOT"):
        shutil.copyfile(shot, Path(os.environ["XRAI_SCREENSHOT"]))


def test_bad_upload_in_chromium_shows_the_error(browser, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all\n")
    browser.get(server_url)
    browser.find_element(By.ID, "file").send_keys(str(fake))
    browser.find_element(By.ID, "submit").click()
    error = WebDriverWait(browser, 30).until(ec.visibility_of_element_located((By.ID, "error")))
    assert "notes.png" in error.text
    assert browser.find_element(By.ID, "file")  # the form is there to try again
