"""The Grad-CAM browser and the X-ray upload live in JupyterLab, in a real headless Chromium: run the notebook,
click (or choose a file), see it change.

A JupyterLab server (token-less, 127.0.0.1, a free port, no browser, its root, config, data and settings
in tmp_path) opens a two-cell notebook written here (not the repository's notebooks, which train for
minutes) that shows ``xrai.widgets.gradcam_browser`` over the session's evaluated synthetic run (Grad-CAM
of its model, computed in the kernel). The page runs all cells, the test checks that the widget (not the
static PNG beside it) rendered, clicks another outcome and sees the caption and the overlay's bytes change.
A second notebook shows ``xrai.widgets.xray_upload``: the test gives the FileUpload's ``<input type=file>`` one
of the run's images (selenium's send_keys, as a person choosing a file) and sees the prediction and the figure.

Needs chromium, chromedriver, selenium and jupyterlab (the `test` extra): skipped without them, a failure
under CI=true. Every wait is bounded (the whole test by about 2 minutes on a busy 2-core machine); the
server and the kernels it started are stopped in a finally. XRAI_SCREENSHOT=/some/dir keeps the screenshot.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import screenshot_colours, skip_or_fail

from xrai.data import read_manifest
from xrai.evaluate.single import explain_file
from xrai.runs.layout import RunFolder
from xrai.widgets import OUTCOMES, outcome_table

try:  # a test extra: without it the `chromium` fixture skips (fails under CI) before any of these is used
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    By = WebDriverWait = None
    TimeoutException = Exception

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 60  # JupyterLab answering /api/status
NOTEBOOK_S = 120  # page loaded, kernel started, torch imported, the first Grad-CAM drawn
CHANGE_S = 60  # a click answered with a new overlay
NOTEBOOK = "gradcam_browser.ipynb"
UPLOAD_NOTEBOOK = "xray_upload.ipynb"

# The image's bytes as the page has them (an ipywidgets 8 Image is a blob: URL; 7 a data: URL).
READ_IMAGE_JS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0].src).then(r => r.arrayBuffer()).then(buffer => {
  let s = ""; new Uint8Array(buffer).forEach(b => { s += String.fromCharCode(b); }); done(btoa(s));
}).catch(e => done("error: " + e));
"""

# ipywidgets' FileUpload keeps its <input type=file> off the page and click()s it to open the file dialog,
# which selenium cannot reach: put such an input on the page instead of opening the dialog.
SHOW_FILE_INPUT_JS = """
const click = HTMLInputElement.prototype.click;
HTMLInputElement.prototype.click = function () {
  if (this.type === "file" && !this.isConnected) {
    this.style.display = "block"; this.setAttribute("data-xrai-test", "upload"); document.body.appendChild(this);
    return;
  }
  return click.call(this);
};
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def widget_labextensions() -> list[str]:
    """The share/jupyter folder holding ipywidgets' JupyterLab extension, wherever pip put it.

    In a normal virtual environment it is sys.prefix's; naming it keeps an environment layered on another
    one (a .pth onto a shared venv) working too.
    """
    try:
        dist = importlib.metadata.distribution("jupyterlab_widgets")
    except importlib.metadata.PackageNotFoundError:
        return []
    for entry in dist.files or []:
        if str(entry).endswith("labextensions/@jupyter-widgets/jupyterlab-manager/package.json"):
            return [str(Path(dist.locate_file(entry)).resolve().parents[3])]
    return []


def write_notebook(path: Path, run: Path, cells: list[str] | None = None) -> None:
    cells = [nbformat.v4.new_code_cell(source) for source in cells or [
        "from xrai.widgets import gradcam_browser",
        f"browser = gradcam_browser({str(run)!r}, split='valid')\nbrowser",
    ]]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture()
def jupyterlab(tmp_path):
    """A token-less JupyterLab on 127.0.0.1 rooted in tmp_path/root; yields its URL; stopped (and its kernels)."""
    try:
        importlib.metadata.version("jupyterlab")
    except importlib.metadata.PackageNotFoundError:
        skip_or_fail("jupyterlab is not installed (pip install -e '.[test]')")
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "JUPYTER_PATH": os.pathsep.join([*widget_labextensions(), *filter(None, [os.environ.get("JUPYTER_PATH")])]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    # No "Would you like to get notified about official Jupyter news?" toast over the screenshot.
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')
    port = free_port()
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
         "--ServerApp.allow_root=True", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--ServerApp.shutdown_no_activity_timeout=600", "--MappingKernelManager.cull_idle_timeout=600"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyterlab exited ({proc.returncode}):\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyterlab did not answer in {SERVER_START_S} s:\n"
                            f"{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, root
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Stop the server (SIGTERM: it shuts its kernels down), then kill whatever it started that is left."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()


def first_outcome_and_another(run: Path) -> tuple[str, str]:
    """The outcome the browser opens on (the first present) and another one that has images."""
    folder = RunFolder(run)
    table = outcome_table(folder.read_predictions("valid"), float(folder.read_report("valid")["threshold"]))
    present = [o for o in OUTCOMES if (table["outcome"] == o).any()]
    assert len(present) >= 2, f"the evaluated run has one outcome only on valid: {present}"
    return present[0], present[1]


def image_bytes(browser, image) -> bytes:
    encoded = browser.execute_async_script(READ_IMAGE_JS, image)
    assert not encoded.startswith("error"), encoded
    return base64.b64decode(encoded)


def wait(browser, seconds: float, condition, what: str, log: Path):
    """WebDriverWait, failing with what was awaited, the notebook's outputs and the server's log."""
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.5).until(condition)
    except TimeoutException:
        outputs = "\n".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))
        pytest.fail(f"{what}: not within {seconds} s\nnotebook outputs:\n{outputs[-2000:]}\n"
                    f"server log:\n{log.read_text()[-2000:] if log.is_file() else ''}")


def open_and_run(browser, url: str, notebook: str, log: Path) -> None:
    """Open a two-cell notebook in JupyterLab, wait for its kernel, run all its cells."""
    browser.get(f"{url}/lab/tree/{notebook}")
    wait(browser, NOTEBOOK_S, lambda b: b.execute_script(
        "const app = window.jupyterapp; const panel = app && app.shell.currentWidget;"
        "return !!(panel && panel.sessionContext && panel.sessionContext.session"
        " && panel.sessionContext.session.kernel && panel.content && panel.content.widgets.length === 2);"),
        "the notebook open with its kernel", log)
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")


def keep_screenshot(browser, shot: Path) -> None:
    """Save a screenshot (kept under XRAI_SCREENSHOT when set) and check that it is not blank."""
    assert browser.save_screenshot(str(shot))
    if os.environ.get("XRAI_SCREENSHOT"):
        keep = Path(os.environ["XRAI_SCREENSHOT"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / shot.name)
    spread, colours = screenshot_colours(shot)
    assert spread > 10 and colours > 50, f"the screenshot looks blank: grey std {spread:.1f}, {colours} colours"


def test_gradcam_browser_in_jupyterlab_changes_picture_on_click(jupyterlab, chromium, evaluated_run, tmp_path):
    url, root = jupyterlab
    log = tmp_path / "jupyterlab.log"
    start, other = first_outcome_and_another(evaluated_run)
    write_notebook(root / NOTEBOOK, evaluated_run)
    open_and_run(chromium, url, NOTEBOOK, log)

    image = wait(chromium, NOTEBOOK_S, lambda b: next(iter(
        b.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img.widget-image")), None),
        "the browser widget's overlay (ipywidgets' JupyterLab extension rendering it)", log)
    wait(chromium, CHANGE_S, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                         image) > 0, "the first overlay decoded", log)
    caption = chromium.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-html-content")
    assert caption.text.startswith(f"{start} 1 of ")
    before, before_src = image_bytes(chromium, image), image.get_attribute("src")
    assert before.startswith(b"\x89PNG")

    buttons = {b.text.split(" ")[0]: b for b in chromium.find_elements(By.CSS_SELECTOR, "button.widget-toggle-button")}
    assert set(buttons) == set(OUTCOMES), buttons.keys()
    buttons[other].click()

    wait(chromium, CHANGE_S, lambda b: caption.text.startswith(f"{other} 1 of ")
         and image.get_attribute("src") != before_src, f"the caption and overlay of {other}", log)
    wait(chromium, CHANGE_S, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                         image) > 0, "the new overlay decoded", log)
    after = image_bytes(chromium, image)
    assert after.startswith(b"\x89PNG") and after != before

    widget = chromium.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox")
    chromium.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)  # controls, caption, overlay
    keep_screenshot(chromium, tmp_path / "jupyterlab_gradcam_browser.png")


def test_xray_upload_in_jupyterlab_explains_a_chosen_file(jupyterlab, chromium, evaluated_run, tmp_path):
    url, root = jupyterlab
    log = tmp_path / "jupyterlab.log"
    manifest = read_manifest(evaluated_run)
    xray = tmp_path / "my_wrist.png"
    shutil.copyfile(manifest.loc[manifest["split"] == "test", "path"].iloc[0], xray)
    expected = explain_file(evaluated_run, xray)
    write_notebook(root / UPLOAD_NOTEBOOK, evaluated_run, [
        "from xrai.widgets import xray_upload",
        f"upload = xray_upload({str(evaluated_run)!r})\nupload",
    ])
    open_and_run(chromium, url, UPLOAD_NOTEBOOK, log)

    button = wait(chromium, NOTEBOOK_S, lambda b: next(iter(
        b.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-upload")), None),
        "the upload widget's button (ipywidgets' JupyterLab extension rendering it)", log)
    caption = chromium.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-html-content")
    assert "upload a PNG, JPEG or DICOM" in caption.text
    # A click on the button opens the system's file dialog through a file input outside the page; instead
    # of the dialog, the input is put on the page, where selenium chooses the file as a person would.
    chromium.execute_script(SHOW_FILE_INPUT_JS)
    button.click()
    chooser = wait(chromium, CHANGE_S, lambda b: next(iter(
        b.find_elements(By.CSS_SELECTOR, "input[type=file][data-xrai-test=upload]")), None),
        "the file input the button's click opens", log)
    assert chooser.get_attribute("accept") == ".png,.jpg,.jpeg,.dcm"
    chooser.send_keys(str(xray))

    wait(chromium, CHANGE_S, lambda b: "my_wrist.png" in caption.text and "p(" in caption.text,
         "the prediction line for the chosen file", log)
    assert f"p(abnormal) = {expected['probability']:.3f}" in caption.text
    figure = wait(chromium, CHANGE_S, lambda b: next(iter(
        b.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-output img")), None),
        "the figure (original | heat map | overlay) in the widget's Output", log)
    wait(chromium, CHANGE_S, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                         figure) > 0, "the figure decoded", log)
    assert image_bytes(chromium, figure).startswith(b"\x89PNG")
    widget = chromium.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox")
    chromium.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)
    keep_screenshot(chromium, tmp_path / "jupyterlab_xray_upload.png")
