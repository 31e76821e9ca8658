"""xrai.widgets: the body-part picker feeds the training config; the Grad-CAM browser filters and shows."""

from __future__ import annotations

import io
import json

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import xrai.widgets
from xrai.config import MURA_BODY_PARTS, TrainConfig
from xrai.widgets import (
    ALL,
    GradCamBrowser,
    body_part_picker,
    browse_rows,
    gradcam_browser,
    outcome_table,
    part_counts,
    selected_body_part,
    selected_model,
)


def _manifest() -> pd.DataFrame:
    """Seven parts; part i has i + 2 images, the first i // 2 + 1 of them abnormal."""
    rows = []
    for i, part in enumerate(MURA_BODY_PARTS):
        for j in range(i + 2):
            rows.append({"path": f"/x/{part}/{j}.png", "label": int(j <= i // 2), "body_part": part,
                         "patient_id": f"p{i}{j}", "study_id": f"s{i}{j}", "split": "train", "source": "mura"})
    return pd.DataFrame(rows)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- picker -------------------------------------------------------------------------------------


def test_picker_lists_all_and_each_part_with_counts():
    manifest = _manifest()
    picker = body_part_picker(manifest)
    assert isinstance(picker, widgets.Dropdown)
    labels = dict((value, label) for label, value in picker.options)
    assert list(labels) == [ALL, *MURA_BODY_PARTS]
    assert picker.value == ALL
    assert labels[ALL].startswith(f"all ({len(manifest)} images, {int(manifest.label.sum())} abnormal")
    counts = part_counts(manifest)
    for part in MURA_BODY_PARTS:
        assert labels[part] == f"{part} ({counts.loc[part, 'images']} images, {counts.loc[part, 'abnormal']} abnormal)"
    assert labels["wrist"] == "wrist (8 images, 4 abnormal)"


def test_picker_starts_at_the_parameter_so_run_all_needs_no_click():
    picker = body_part_picker(_manifest(), default="Wrist ")
    assert picker.value == "wrist"
    assert selected_body_part(picker, fallback="hand") == "wrist"
    assert selected_body_part(None, fallback="hand") == "hand"  # no picker at all: the parameter


def test_picked_part_flows_into_the_config_and_the_filter(synthetic_manifest):
    from xrai.data import filter_body_parts

    picker = body_part_picker(synthetic_manifest, default="all")
    assert {v for _, v in picker.options} == {ALL, *synthetic_manifest["body_part"].unique()}
    picker.value = "wrist"  # what a click does
    config = TrainConfig(data="synthetic", body_part=selected_body_part(picker, fallback="all"), pretrained=False)
    assert config.body_part == "wrist" and config.body_parts() == ["wrist"]
    rows = filter_body_parts(synthetic_manifest, config.body_parts())
    assert len(rows) == (synthetic_manifest["body_part"] == "wrist").sum() > 0
    assert set(rows["body_part"]) == {"wrist"}


def test_picker_offers_a_several_part_parameter_as_one_entry():
    picker = body_part_picker(_manifest(), default="wrist, hand")
    assert picker.value == "wrist,hand"
    assert TrainConfig(body_part=selected_body_part(picker)).body_parts() == ["wrist", "hand"]
    assert dict((v, label) for label, v in picker.options)["wrist,hand"].startswith("wrist,hand (13 images")


def test_picker_rejects_an_unknown_part_naming_those_present():
    manifest = _manifest()[lambda m: m.body_part.isin(["hand", "wrist"])]
    with pytest.raises(ValueError, match=r"unknown body part.*'knee'.*hand \(5\), wrist \(8\)"):
        body_part_picker(manifest, default="knee")


def test_model_picker_lists_the_registry():
    from xrai.models.registry import list_models
    from xrai.widgets import model_picker

    picker = model_picker(default="resnet18")
    assert list(picker.options) == list_models() and picker.value == "resnet18"
    picker.value = "mobilenet_v2"
    assert selected_model(picker, fallback="resnet18") == "mobilenet_v2"
    with pytest.raises(ValueError, match="unknown model 'resnet19'; choose one of: .*mobilenet_v2"):
        model_picker(default="resnet19")


# ---- Grad-CAM browser ---------------------------------------------------------------------------


def _predictions() -> pd.DataFrame:
    return pd.DataFrame({
        "path": ["w1", "w2", "w3", "w4", "w5", "h1", "h2", "h3"],
        "probability": [0.9, 0.6, 0.7, 0.2, 0.1, 0.5, 0.4, 0.8],
        "label": [1, 1, 0, 1, 0, 1, 0, 0],
        "body_part": ["wrist"] * 5 + ["hand"] * 3,
        "patient_id": [str(i) for i in range(8)],
        "study_id": [str(i) for i in range(8)],
    })


def test_outcomes_at_the_threshold():
    table = outcome_table(_predictions(), threshold=0.5)
    assert table["outcome"].tolist() == ["TP", "TP", "FP", "FN", "TN", "TP", "TN", "FP"]  # 0.5 counts as abnormal
    assert browse_rows(table, body_part="wrist", outcome="TP")["path"].tolist() == ["w1", "w2"]  # most confident first
    assert browse_rows(table, outcome="FP")["path"].tolist() == ["h3", "w3"]
    assert browse_rows(table, outcome="TN")["path"].tolist() == ["w5", "h2"]  # surest normal first
    with pytest.raises(ValueError, match="choose one of: TP, FP, FN, TN"):
        browse_rows(table, outcome="XX")


@pytest.fixture()
def fake_run(tmp_path):
    _predictions().to_csv(tmp_path / "predictions_test.csv", index=False)
    (tmp_path / "report_test.json").write_text(json.dumps({"split": "test", "threshold": 0.5}))
    return tmp_path


def test_browser_filters_by_part_and_outcome_and_shows_the_overlay(fake_run):
    calls = []

    def explain(path, label):
        calls.append((path, label))
        return _png(len(calls))

    browser = gradcam_browser(fake_run, split="test", explain=explain)
    assert isinstance(browser, GradCamBrowser) and isinstance(browser, widgets.VBox)
    assert [v for _, v in browser.part.options] == [ALL, "hand", "wrist"]
    assert [label for label, _ in browser.outcome.options] == ["TP (3)", "FP (2)", "FN (1)", "TN (2)"]
    assert calls == [("w1", 1)] and browser.image.value == _png(1)  # first TP, computed once shown
    assert "w1" in browser.caption.value and "p = 0.900" in browser.caption.value

    browser.part.value = "wrist"
    assert [label for label, _ in browser.outcome.options] == ["TP (2)", "FP (1)", "FN (1)", "TN (1)"]
    assert browser.rows()["path"].tolist() == ["w1", "w2"] and browser.index.max == 1
    browser.index.value = 1
    assert calls[-1] == ("w2", 1) and "2 of 2" in browser.caption.value

    browser.outcome.value = "FN"
    assert browser.index.value == 0 and browser.index.max == 0 and browser.index.disabled
    assert calls[-1] == ("w4", 1) and "label abnormal, called normal" in browser.caption.value

    browser.part.value = "hand"
    assert browser.outcome.value == "FN"  # the outcome stays when the part changes
    assert browser.rows().empty and browser.image.value == b""
    assert "no FN images for hand" in browser.caption.value

    n = len(calls)
    browser.part.value = "wrist"  # w4 again: served from the cache
    assert len(calls) == n and browser.image.value


def test_browser_opens_on_an_outcome_that_has_images(fake_run):
    predictions = _predictions()
    predictions[predictions["label"] == 0].to_csv(fake_run / "predictions_test.csv", index=False)  # no TP, no FN
    browser = gradcam_browser(fake_run, explain=lambda path, label: _png(1))
    assert browser.outcome.value == "FP" and browser.image.value == _png(1)


def test_browser_without_predictions_says_which_notebook_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="04_evaluate"):
        gradcam_browser(tmp_path, explain=lambda path, label: b"")


@pytest.mark.slow
def test_browser_on_a_trained_run_draws_real_overlays(demo_run):
    browser = gradcam_browser(demo_run, split="test")
    assert not browser.rows().empty and bytes(browser.image.value).startswith(b"\x89PNG")  # ipywidgets 8: memoryview
    browser.outcome.value = "TN"
    assert browser.rows().empty or bytes(browser.image.value).startswith(b"\x89PNG")
    assert (demo_run / "gradcam" / "browser").is_dir()


# ---- a saved notebook: the static form beside (or instead of) the widget -----------------------------


def _displayed(monkeypatch, *items) -> list[dict]:
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj))
    xrai.widgets.show(*items)
    return shown


@pytest.mark.parametrize("batch", [False, True])
def test_widgets_carry_their_static_form(fake_run, monkeypatch, batch):
    import base64
    import io

    from PIL import Image

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    if batch:
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    picker = body_part_picker(_manifest(), default="wrist")
    browser = gradcam_browser(fake_run, explain=lambda path, label: _png(3))
    (shown_picker, shown_browser) = _displayed(monkeypatch, picker, browser)
    assert shown_picker["text/plain"].startswith("Body part: wrist (")
    assert shown_browser["text/plain"] == "Grad-CAM browser (test): TP 3, FP 2, FN 1, TN 2"
    grid = Image.open(io.BytesIO(base64.b64decode(shown_browser["image/png"])))
    assert grid.width > 3 * grid.height // 2, "one panel per outcome, side by side"
    for shown, widget in ((shown_picker, picker), (shown_browser, browser)):
        view = shown.get(xrai.widgets.WIDGET_MIME)
        assert (view is None) if batch else (view["model_id"] == widget.model_id)


def test_predictions_from_another_machine_are_found_again(fake_run, tmp_path, monkeypatch):
    """The browser reads paths another machine wrote; with a manifest it maps them onto this machine's images."""
    import xrai.data

    calls = []
    manifest = pd.DataFrame({"path": [f"/here/data/{p}.png" for p in ("w1", "w2")]})
    manifest.attrs = {"root": "/here/data"}
    monkeypatch.setattr(xrai.data, "read_manifest", lambda run_dir, **_: manifest)
    predictions = _predictions()
    predictions["path"] = "/old/machine/data/" + predictions["path"] + ".png"
    predictions.to_csv(fake_run / "predictions_test.csv", index=False)
    (fake_run / "manifest.csv").write_text("x")
    gradcam_browser(fake_run, explain=lambda path, label: calls.append(path) or _png(1))
    assert calls == ["/here/data/w1.png"]
