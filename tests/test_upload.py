"""Your own X-ray: explain_file and the upload widget with a PNG and a DICOM (issue 22), headless."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_files import assert_no_secrets, write_dicom
from IPython.display import Image as IPythonImage
from matplotlib.figure import Figure
from PIL import Image

import xrai.widgets as xw
from xrai.data import read_image, read_manifest
from xrai.errors import UserError
from xrai.evaluate.single import PANELS, ExplainFileError, explain_file, side_by_side
from xrai.explain.cam import explain_paths
from xrai.runs.layout import RunFolder
from xrai.runs.load import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xray(evaluated_run, tmp_path_factory) -> dict[str, Path]:
    """One of the run's test images as PNG bytes on disk, and the same pixels as a DICOM with patient tags."""
    folder = tmp_path_factory.mktemp("upload")
    manifest = read_manifest(evaluated_run)
    source = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    png = folder / "wrist.png"
    shutil.copyfile(source, png)
    dcm = write_dicom(folder / "wrist.dcm", read_image(png))
    return {"png": png, "dcm": dcm}


def _snapshot(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.rglob("*")}


def test_explain_file_scores_at_the_runs_thresholds(evaluated_run, xray):
    before = _snapshot(evaluated_run)
    result = explain_file(evaluated_run, xray["png"])
    assert _snapshot(evaluated_run) == before  # reads only
    report = RunFolder(evaluated_run).read_report("valid")
    points = report["operating_points"]
    assert result["thresholds"] == {"youden": points["youden"]["threshold"],
                                    "screening": points["sensitivity"]["threshold"]}
    assert result["threshold"] == report["threshold"] and result["calibrated"] == report["calibration"]["applied"]
    run = load_run(evaluated_run)
    (expected,) = explain_paths(run.model, run.config, [xray["png"]], threshold=run.threshold,
                                calibration=run.calibration)
    assert result["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    names = RunFolder(evaluated_run).class_names()
    assert result["label"] == names[int(result["probability"] >= report["threshold"])]
    assert result["calls"] == {k: names[int(result["probability"] >= t)] for k, t in result["thresholds"].items()}
    assert f"p({names[1]}) = {result['probability']:.3f}" in result["text"] and "wrist.png" in result["text"]
    figure = result["figure"]
    assert isinstance(figure, Figure)
    titled = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titled == list(PANELS)
    assert result["label"] in figure._suptitle.get_text() and f"{result['probability']:.3f}" in figure._suptitle.get_text()
    assert result["cam"].shape == read_image(xray["png"]).shape


def test_explain_file_reads_a_dicom_like_its_png(evaluated_run, xray):
    png, dcm = explain_file(evaluated_run, xray["png"]), explain_file(evaluated_run, xray["dcm"])
    assert dcm["probability"] == pytest.approx(png["probability"], abs=1e-6)
    assert dcm["label"] == png["label"]
    assert_no_secrets(dcm["text"] + dcm["figure"]._suptitle.get_text(), "explain_file's result")


def test_explain_file_refuses_a_bad_file_in_one_line(evaluated_run, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(ExplainFileError) as caught:
            explain_file(evaluated_run, path)
        message = str(caught.value)
        assert isinstance(caught.value, UserError) and "\n" not in message and path.name in message


def test_explain_file_refuses_a_run_never_evaluated(evaluated_run, xray, tmp_path):
    run = shutil.copytree(evaluated_run, tmp_path / "run")
    RunFolder(run).report_json("valid").unlink()
    with pytest.raises(FileNotFoundError, match="python -m xrai evaluate"):
        explain_file(run, xray["png"])


def test_side_by_side_panels_are_the_original_the_map_and_the_overlay(xray):
    image = read_image(xray["png"])
    cam = np.zeros(image.shape, np.float32)
    cam[: image.shape[0] // 2] = 1.0
    picture = side_by_side(image, cam, label=1, probability=0.7, threshold=0.5, height=image.shape[0])
    h, w = image.shape
    assert picture.shape[0] > h and picture.shape[1] == 3 * w + 12
    bottom = picture[-h:]
    original, heat, over = bottom[:, :w], bottom[:, w + 6 : 2 * w + 6], bottom[:, 2 * w + 12 :]
    assert np.array_equal(original[..., 0], image) and np.array_equal(original[..., 1], image)
    assert heat[: h // 4, :, 0].mean() > 100 and heat[-h // 4 :, :, 2].mean() > 100  # red on top, blue below
    assert not np.array_equal(over, original)
    right = side_by_side(image, cam, label=1, probability=0.7, threshold=0.5)
    wrong = side_by_side(image, cam, label=0, probability=0.7, threshold=0.5)
    assert right[:20, :, 1].max() > right[:20, :, 0].max()  # the band is green when right
    assert wrong[:20, :, 0].max() > wrong[:20, :, 1].max()  # red when wrong


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_upload_widget_shows_the_prediction(evaluated_run, xray, kind, monkeypatch):
    shown = []
    monkeypatch.setattr(xw.ipython_display, "display", lambda *a, **k: shown.append(a[0]))
    widget = xw.xray_upload(evaluated_run)
    upload, result, output = widget.children
    assert upload.accept == ".png,.jpg,.jpeg,.dcm" and isinstance(output, xw.widgets.Output)
    name = f"my {kind} x-ray.{kind}"
    answer = xw.simulate_upload(widget, name, xray[kind].read_bytes())
    expected = explain_file(evaluated_run, xray[kind])
    assert answer["path"] == name and answer["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert name in result.value and f"{expected['probability']:.3f}" in result.value
    assert answer["thresholds"] == expected["thresholds"]
    pictures = [item for item in shown if isinstance(item, IPythonImage)]  # the figure went to the Output, as PNG
    assert len(pictures) == 1 and pictures[0].data.startswith(b"\x89PNG")
    xw.show(widget)  # as the notebooks show it: the widget with its static line beside it
    bundle = shown[-1]
    assert name in bundle["text/plain"] and f"{expected['probability']:.3f}" in bundle["text/plain"]
    if kind == "dcm":
        assert_no_secrets(result.value + bundle["text/plain"], "the upload widget")


def test_upload_widget_survives_a_bad_file(evaluated_run, xray):
    widget = xw.xray_upload(evaluated_run)
    assert xw.simulate_upload(widget, "notes.png", b"hello") is None
    assert "notes.png" in widget.result.value and "cannot explain" in widget.result.value
    buffer = io.BytesIO()
    Image.open(xray["png"]).save(buffer, format="JPEG")
    answer = xw.simulate_upload(widget, "again.jpg", buffer.getvalue())  # still usable after a failure
    assert answer is not None and "again.jpg" in widget.result.value
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        xw.xray_upload(Path(evaluated_run) / "nowhere")
