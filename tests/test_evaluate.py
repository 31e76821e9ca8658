"""predict, the report format, the threshold discipline, external scoring, on a fake run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import xrai.evaluate.run as ev
from xrai.evaluate.predictions import PREDICTION_COLUMNS, predict
from xrai.evaluate.run import (
    build_report,
    evaluate_external,
    evaluate_run,
    run_threshold,
)

# docs/design.md's report_<split>.json, key for key
DESIGN_REPORT_KEYS = ["split", "threshold", "threshold_from", "split_method", "audit", "image", "study",
                      "per_body_part", "classification_report"]
DESIGN_METRIC_KEYS = ["n", "accuracy", "auroc", "auroc_ci", "average_precision", "sensitivity", "specificity", "f1",
                      "kappa", "kappa_ci", "confusion_matrix"]
# what issue 14 added after docs/design.md's keys (docs/design.md lists them)
EXTENDED_REPORT_KEYS = ["study_threshold", "threshold_use", "resampling_unit", "threshold_method",
                        "operating_points", "calibration", "checkpoint", "tta", "source", "baseline", "explain"]


def make_fake_run(run: Path, manifest: pd.DataFrame, *, img_size: int = 64) -> Path:
    """A run folder as fit() leaves it (checkpoint dict per the contract, config.json, manifest), with an
    untrained mobilenet_v2 whose BatchNorm statistics are set on a few images, so its outputs vary."""
    from xrai.config import TrainConfig
    from xrai.data import read_image, save_manifest
    from xrai.data.augment import preprocess
    from xrai.models.factory import create_model

    config = TrainConfig(data="synthetic", pretrained=False, img_size=img_size, epochs=1)
    torch.manual_seed(0)
    net = create_model("mobilenet_v2", pretrained=False)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    x = preprocess([read_image(p) for p in manifest["path"].iloc[:24]], image_size=config.image_size,
                   resize_size=config.resize_size)
    net.train()
    with torch.no_grad():
        net(x)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "config": config.to_dict(), "model_name": "mobilenet_v2", "epoch": 1,
                "best_metric": 0.5, "history": []}, run / "checkpoints" / "best.pt")
    config.to_json(run / "config.json")
    save_manifest(manifest, run)
    return run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, synthetic_manifest):
    return make_fake_run(tmp_path_factory.mktemp("eval_run"), synthetic_manifest)


@pytest.fixture()
def run(fake_run, tmp_path):
    """A fresh copy per test, so reports written by one test never leak into another."""
    copy = tmp_path / "run"
    shutil.copytree(fake_run, copy)
    return copy


def _quiet(fn, *args, **kwargs):
    kwargs.setdefault("explain_images", 0)  # the explanation scores have their own tests
    with pytest.warns(UserWarning, match="audit"):  # the fake runs have no audit.csv
        return fn(*args, **kwargs)


def test_evaluate_run_valid_writes_design_report(run, synthetic_manifest):
    report = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=50)
    on_disk = json.loads((run / "report_valid.json").read_text())
    assert on_disk == report
    assert list(report) == DESIGN_REPORT_KEYS + EXTENDED_REPORT_KEYS  # docs/design.md's keys first, unchanged
    assert list(report["image"]) == DESIGN_METRIC_KEYS
    assert list(report["study"]) == DESIGN_METRIC_KEYS  # synthetic has MURA's study ids
    assert report["split"] == "valid" and report["threshold_from"] == "valid"
    assert report["split_method"] == synthetic_manifest.attrs["split_method"]
    assert report["audit"] == {"cross_split_groups": None, "cross_label_groups": None}
    assert 0.0 <= report["threshold"] <= 1.0
    valid = synthetic_manifest[synthetic_manifest["split"] == "valid"]
    assert report["image"]["n"] == len(valid)
    assert report["study"]["n"] == valid["study_id"].nunique()
    assert set(report["per_body_part"]) == set(valid["body_part"])
    for part in report["per_body_part"].values():
        assert list(part)[:4] == ["n", "auroc", "kappa", "study_kappa"]
        assert {"auroc_ci", "kappa_ci", "study_kappa_ci"} <= set(part)
    assert {"normal", "abnormal", "accuracy"} <= set(report["classification_report"])
    assert report["baseline"] is None and report["source"] == "synthetic"  # the MURA baseline is for MURA runs
    assert report["resampling_unit"]["image"] == "patients"
    pred = pd.read_csv(run / "predictions_valid.csv")
    assert list(pred.columns)[:6] == PREDICTION_COLUMNS and "logit" in pred and len(pred) == len(valid)
    assert pred["probability"].between(0, 1).all()
    assert report["image"]["auroc_ci"] is None or len(report["image"]["auroc_ci"]) == 2


def test_test_split_reads_valid_threshold_and_never_chooses(run, monkeypatch):
    seen = []
    real = ev.choose_selection

    def spy(predictions, **kwargs):
        seen.append(predictions["label"].to_numpy().copy())
        return real(predictions, **kwargs)

    monkeypatch.setattr(ev, "choose_selection", spy)
    test_report = _quiet(evaluate_run, run, split="test", progress=False, n_bootstrap=20)
    valid_report = json.loads((run / "report_valid.json").read_text())  # made first, because it was missing
    assert len(seen) == 1  # chosen once, on valid
    valid_pred = pd.read_csv(run / "predictions_valid.csv")
    np.testing.assert_array_equal(seen[0], valid_pred["label"].to_numpy())
    for key in ("study_threshold", "operating_points"):
        assert test_report[key] is not None
    assert test_report["study_threshold"] == valid_report["study_threshold"]
    for key in ("method", "slope", "intercept", "applied"):  # the calibration fitted on valid, never on test
        assert test_report["calibration"][key] == valid_report["calibration"][key]
    assert test_report["checkpoint"] == valid_report["checkpoint"]
    assert test_report["threshold"] == valid_report["threshold"]
    assert test_report["threshold_from"] == "valid"
    assert json.loads((run / "report_test.json").read_text())["threshold"] == valid_report["threshold"]
    # an existing valid threshold is used as it is, and test chooses nothing
    valid_report["threshold"] = 0.123
    (run / "report_valid.json").write_text(json.dumps(valid_report))
    seen.clear()
    again = _quiet(evaluate_run, run, split="test", progress=False, n_bootstrap=0)
    assert seen == [] and again["threshold"] == 0.123 and run_threshold(run) == 0.123
    test_pred = pd.read_csv(run / "predictions_test.csv")
    tn, fp, fn, tp = np.ravel(again["image"]["confusion_matrix"])
    assert tp + fp == int((test_pred["probability"] >= 0.123).sum())


def test_sensitivity_threshold_method(run):
    report = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0,
                    threshold_method="sensitivity", target_sensitivity=0.9)
    assert report["image"]["sensitivity"] >= 0.9
    assert report["threshold_method"] == "sensitivity"
    assert report["operating_points"]["sensitivity"]["threshold"] == report["threshold"]
    assert report["study"]["sensitivity"] >= 0.9  # the study threshold is chosen on study means to reach it


def test_study_figures_are_made_at_the_study_threshold(run):
    """Each block says which threshold made it: the study block is the study threshold over study means."""
    from xrai.evaluate.metrics import study_level

    report = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    pred = ev.read_predictions(run / "predictions_valid.csv")
    studies = study_level(pred)
    called = studies["probability"] >= report["study_threshold"]
    tn, fp, fn, tp = np.ravel(report["study"]["confusion_matrix"])
    assert tp + fp == int(called.sum()) and tp == int((called & (studies["label"] == 1)).sum())
    t = report["threshold"]
    tn, fp, fn, tp = np.ravel(report["image"]["confusion_matrix"])
    assert tp + fp == int((pred["probability"] >= t).sum())
    yj, sens = report["operating_points"]["youden"], report["operating_points"]["sensitivity"]
    assert yj["threshold"] == t and yj["study_threshold"] == report["study_threshold"]
    assert sens["target"] == 0.95 and sens["image"]["sensitivity"] >= 0.95


def test_probabilities_are_calibrated_on_valid_and_the_raw_kept(run):
    from scipy.special import expit

    valid = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    test = _quiet(evaluate_run, run, split="test", progress=False, n_bootstrap=0)
    cal = valid["calibration"]
    assert cal["fitted_on"] == "valid" and cal["slope"] > 0 and cal["applied"] and cal["method"] == "platt"
    assert (test["calibration"]["slope"], test["calibration"]["intercept"]) == (cal["slope"], cal["intercept"])
    for report in (valid, test):
        c = report["calibration"]
        assert set(c["ece"]) == {"uncalibrated", "calibrated"} and c["bins"] == 15
        assert c["uncalibrated"]["threshold"] is not None and c["uncalibrated"]["image"]["auroc"] is not None
    pred = ev.read_predictions(run / "predictions_test.csv")
    np.testing.assert_allclose(pred["probability"], expit(cal["slope"] * pred["logit"] + cal["intercept"]), rtol=1e-6)
    assert cal["nll"]["calibrated"] <= cal["nll"]["uncalibrated"] + 1e-9  # fitted to minimise it on valid


def test_a_changed_checkpoint_is_noticed_by_evaluate_and_predict(run):
    """report_valid.json records the checkpoint's hash; overwrite best.pt and the next evaluate and the next
    load (predict, serve, notebooks) refuses the stale one, naming the command that chooses it again."""
    from xrai.errors import is_user_error
    from xrai.runs.load import StaleThresholdWarning, load_run
    from xrai.runs.operating import StaleOperatingPointError, checkpoint_sha256

    first = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    best = run / "checkpoints" / "best.pt"
    assert first["checkpoint"] == {"file": "checkpoints/best.pt", "sha256": checkpoint_sha256(best)}
    assert load_run(run).point.source == "valid"

    def retrain(scale: float) -> None:  # what a new fit() leaves: other weights in best.pt
        ckpt = torch.load(best, weights_only=True)
        head = [k for k in ckpt["model"] if k.startswith("head") and k.endswith("weight")][0]
        ckpt["model"][head] = ckpt["model"][head] * scale
        torch.save(ckpt, best)

    retrain(3.0)
    with pytest.warns(StaleThresholdWarning, match="was made with checkpoint"):
        test = _quiet(evaluate_run, run, split="test", progress=False, n_bootstrap=0)
    valid = json.loads((run / "report_valid.json").read_text())
    assert valid["checkpoint"]["sha256"] == checkpoint_sha256(best) == test["checkpoint"]["sha256"]
    assert valid["calibration"]["intercept"] != first["calibration"]["intercept"]  # fitted again
    assert test["threshold"] == valid["threshold"]

    retrain(0.5)
    # loading never writes to the run: a stale operating point is refused in one line naming the command
    before = (run / "report_valid.json").read_bytes()
    with pytest.raises(StaleOperatingPointError, match=r"was made with checkpoint.*python -m xrai evaluate --run"):
        load_run(run)
    assert (run / "report_valid.json").read_bytes() == before
    assert is_user_error(StaleOperatingPointError("x"))  # the CLI prints it in one line, exit 2
    # evaluate is the explicit step that chooses it again
    _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    loaded = load_run(run)
    assert loaded.point.source == "valid" and loaded.checkpoint_sha256 == checkpoint_sha256(best)
    assert json.loads((run / "report_valid.json").read_text())["checkpoint"]["sha256"] == loaded.checkpoint_sha256
    # asked for explicitly, the defaults with the reason, never the stale numbers
    retrain(2.0)
    (run / "manifest.csv").unlink()
    stale = load_run(run, stale="default")
    assert stale.point.source == "default" and stale.threshold == 0.5 and "checkpoint" in stale.point.note


def test_audit_counts_from_audit_csv(run, synthetic_manifest):
    paths = synthetic_manifest["path"].tolist()
    pd.DataFrame({
        "group": [0, 0, 1, 1], "path": paths[:4], "label": [0, 1, 0, 0],
        "split": ["train", "train", "train", "test"], "kind": ["exact"] * 4,
        "crosses": ["label", "label", "split", "split"],
    }).to_csv(run / "audit.csv", index=False)
    report = evaluate_run(run, split="valid", progress=False, n_bootstrap=0, explain_images=0)
    assert report["audit"] == {"cross_split_groups": 1, "cross_label_groups": 1}


def test_body_part_filter_of_the_run(run):
    from xrai.config import TrainConfig

    checkpoint = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    checkpoint["config"]["body_part"] = "wrist"
    torch.save(checkpoint, run / "checkpoints" / "best.pt")
    TrainConfig.from_dict(checkpoint["config"]).to_json(run / "config.json")
    report = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    assert list(report["per_body_part"]) == ["wrist"]


def test_evaluate_external_uses_run_threshold(run, synthetic_manifest):
    _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=0)
    external = synthetic_manifest[synthetic_manifest["body_part"].isin(["hand", "elbow"])]
    report = evaluate_external(run, external, progress=False, n_bootstrap=0)
    assert list(report)[:9] == DESIGN_REPORT_KEYS
    assert report["threshold"] == run_threshold(run) and report["threshold_from"] == "valid"
    assert report["split"] == "external" and report["image"]["n"] == len(external)
    saved = json.loads((run / "report_external.json").read_text())
    assert (saved["split"], saved["threshold"], saved["image"]["n"]) == ("external", report["threshold"], len(external))
    assert len(pd.read_csv(run / "predictions_external.csv")) == len(external)
    with pytest.raises(ValueError, match="plain word"):
        evaluate_external(run, external, name="test")


def test_run_threshold_needs_valid_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate --run"):
        run_threshold(tmp_path)


def test_predict_drops_bad_images_and_tta(fake_run, synthetic_manifest, tmp_path):
    from xrai.runs.load import load_model

    model, config = load_model(fake_run)
    rows = synthetic_manifest.head(6).copy()
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    rows.loc[rows.index[2], "path"] = str(bad)
    with pytest.warns(UserWarning, match="dropped 1 unreadable"):
        pred = predict(model, rows, config=config, batch_size=4, device="cpu", progress=False)
    assert list(pred.columns) == PREDICTION_COLUMNS + ["logit"]
    assert str(bad) not in set(pred["path"]) and len(pred) == 5
    assert pred["path"].tolist() == [p for p in rows["path"] if p != str(bad)]  # manifest order kept
    # batching does not change the numbers
    one = predict(model, rows.drop(rows.index[2]), config=config, batch_size=1, device="cpu", progress=False)
    np.testing.assert_allclose(one["probability"], pred["probability"], atol=1e-5)


class _LeftMinusRight(torch.nn.Module):
    """logit = mean(left half) - mean(right half): its flip is the negative, so flip-TTA gives exactly 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        w = x.shape[-1] // 2
        return (x[..., :w].mean(dim=(1, 2, 3)) - x[..., -w:].mean(dim=(1, 2, 3)))[:, None] * 10 + self.dummy


def test_tta_averages_the_flip(synthetic_manifest):
    from xrai.config import TrainConfig

    config = TrainConfig(data="synthetic", img_size=64)
    rows = synthetic_manifest.head(4)
    plain = predict(_LeftMinusRight(), rows, config=config, device="cpu", tta=False, progress=False)
    tta = predict(_LeftMinusRight(), rows, config=config, device="cpu", tta=True, progress=False)
    default = predict(_LeftMinusRight(), rows, config=config, device="cpu", progress=False)  # the recipe's: on
    assert not np.allclose(plain["probability"], 0.5)
    np.testing.assert_allclose(tta["probability"], 0.5, atol=1e-6)
    np.testing.assert_allclose(default["probability"], tta["probability"])


def test_report_without_studies_or_second_class():
    pred = pd.DataFrame({"path": list("abcd"), "probability": [0.2, 0.4, 0.6, 0.9], "label": [1, 1, 1, 1],
                         "body_part": ["hand", "hand", "leg", "leg"], "patient_id": "", "study_id": ""})
    with pytest.warns(UserWarning, match="only one class"):
        report = build_report(pred, split="test", threshold=0.5, threshold_from="valid", split_method=None,
                              audit={"cross_split_groups": 0, "cross_label_groups": 0}, n_bootstrap=30)
    assert report["study"] is None and report["study_threshold"] is None  # FracAtlas-like: no study ids
    assert report["image"]["auroc"] is None and report["image"]["auroc_ci"] is None
    assert report["image"]["kappa_ci"] is None or len(report["image"]["kappa_ci"]) == 2
    json.dumps(report, allow_nan=False)


def test_evaluate_writes_a_model_card_that_states_the_reports(run):
    valid = _quiet(evaluate_run, run, split="valid", progress=False, n_bootstrap=20)
    test = _quiet(evaluate_run, run, split="test", progress=False, n_bootstrap=20, explain_images=4)
    card = (run / "model_card.md").read_text()
    assert card.startswith("# Model card: run")
    assert "research and teaching, not diagnosis" in card and "## Known limits" in card
    assert "synthetic phantoms" in card and "official + test carved from train" in card  # data and split
    assert "Leakage audit: not run" in card  # the fake run has no audit.csv, and the card says so
    assert "mobilenet_v2" in card and "adamw" in card  # the recipe
    assert f"Image threshold {valid['threshold']:.3f}" in card
    assert f"study threshold {valid['study_threshold']:.3f}" in card
    assert f"sigmoid({valid['calibration']['slope']:.3f} * logit {valid['calibration']['intercept']:+.3f})" in card
    assert f"{test['image']['auroc']:.3f} [{test['image']['auroc_ci'][0]:.3f}" in card  # metrics with intervals
    assert "Per body part (test)" in card and "| wrist |" in card
    assert "ROAD" in card and "gradcam++" in card and "Spearman" in card
    assert "DenseNet-169" not in card  # no MURA baseline on a synthetic run
