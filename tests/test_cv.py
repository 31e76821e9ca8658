"""Grouped k-fold CV, the fold ensemble and the final fit, on the tiny synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from xrai.config import TrainConfig
from xrai.data import read_manifest
from xrai.evaluate.run import evaluate_run
from xrai.models.ensemble import FoldEnsemble
from xrai.runs.layout import read_predictions
from xrai.train.cv import assign_folds, cross_validate, fold_manifest, summarise_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDS = 3


def _config(**changes) -> TrainConfig:
    base = dict(data="synthetic", pretrained=False, epochs=2, img_size=32, batch_size=16, num_workers=0,
                input_path="cached", max_batches=2, warmup_epochs=0, patience=0, keep="last", seed=0)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def cv_run(synthetic_manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cv") / "run"
    result = cross_validate(_config(), synthetic_manifest, run_dir, folds=FOLDS, final=True, progress=False)
    return run_dir, result


def test_folds_are_grouped_stratified_and_leave_test_alone(synthetic_manifest):
    fold, grouping = assign_folds(synthetic_manifest, folds=FOLDS, seed=0, progress=False)
    assert grouping == "patient"
    test = synthetic_manifest["split"] == "test"
    assert (fold[test] == -1).all() and set(fold[~test]) == set(range(FOLDS))
    frame = synthetic_manifest.assign(fold=fold)[~test]
    assert (frame.groupby("patient_id")["fold"].nunique() == 1).all()  # no patient in two folds
    assert (frame.groupby("fold")["label"].nunique() == 2).all()  # both labels in every fold
    again, _ = assign_folds(synthetic_manifest, folds=FOLDS, seed=0, progress=False)
    pd.testing.assert_series_equal(fold, again)  # same seed, same folds
    table = synthetic_manifest.assign(fold=fold)
    one = fold_manifest(table, 1)
    assert (one.loc[fold == 1, "split"] == "valid").all() and (one.loc[test, "split"] == "test").all()
    assert set(one.loc[(fold >= 0) & (fold != 1), "split"]) == {"train"}


def test_without_patient_ids_folds_keep_duplicates_together(synthetic_manifest):
    from xrai.data import duplicate_groups

    anonymous = synthetic_manifest.assign(patient_id="", study_id="")
    copy = anonymous[anonymous["split"] == "train"].head(2).assign(split="valid")  # the same files again
    anonymous = pd.concat([anonymous, copy], ignore_index=True)
    fold, grouping = assign_folds(anonymous, folds=FOLDS, seed=0, progress=False)
    assert grouping == "duplicate-group"
    pool = anonymous["split"] != "test"
    groups = duplicate_groups(anonymous[pool], progress=False)
    assert (pd.DataFrame({"g": groups, "fold": fold[pool]}).groupby("g")["fold"].nunique() == 1).all()
    assert groups.duplicated().any()


def test_fold_errors_are_one_line(synthetic_manifest):
    with pytest.raises(ValueError, match="folds must be >= 2"):
        assign_folds(synthetic_manifest, folds=1, progress=False)
    with pytest.raises(ValueError, match="use fewer folds"):
        assign_folds(synthetic_manifest, folds=500, progress=False)


def test_run_folder_oof_and_summary(cv_run):
    run_dir, result = cv_run
    for name in ("manifest.csv", "audit.csv", "config.json", "cv.json", "predictions_oof.csv", "report_oof.json"):
        assert (run_dir / name).is_file(), name
    table = read_manifest(run_dir)
    pool = table[table["fold"] >= 0]
    assert set(table["split"]) <= {"train", "test"} and (table.loc[table["fold"] < 0, "split"] == "test").all()
    oof = read_predictions(run_dir / "predictions_oof.csv")
    assert sorted(oof["path"]) == sorted(pool["path"])  # every pool image once, no test image
    assert (oof["fold"].to_numpy() == pool.set_index("path").loc[oof["path"], "fold"].to_numpy()).all()
    summary = json.loads((run_dir / "cv.json").read_text())
    reports = [json.loads((run_dir / "folds" / str(k) / "report_valid.json").read_text()) for k in range(FOLDS)]
    values = [r["image"]["auroc"] for r in reports]
    auroc = summary["summary"]["image"]["auroc"]
    assert auroc["values"] == values
    assert auroc["mean"] == pytest.approx(np.mean(values)) and auroc["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["test_rows_untouched"] == int((table["fold"] < 0).sum())
    assert summary["epochs"]["chosen"] == 2 and summary["oof"]["threshold_from"] == "oof"
    oof_report = json.loads((run_dir / "report_oof.json").read_text())
    assert oof_report["split"] == "oof" and oof_report["threshold"] == summary["oof"]["threshold"]
    # the OOF operating point is bound to the folds' checkpoints, and chosen on their logits
    from xrai.runs.operating import calibration_from_report, folds_sha256

    assert oof_report["checkpoint"]["sha256"] == folds_sha256(run_dir, FOLDS)
    calibration, _ = calibration_from_report(oof_report)  # the OOF report's calibrator (raw where not applied)
    np.testing.assert_allclose(oof["probability"], calibration.apply(oof["logit"]))
    assert result.summary == summary


def test_summary_statistics_skip_undefined_metrics():
    stats = summarise_metrics([{"auroc": 0.6}, {"auroc": None}, {"auroc": 0.8}])["auroc"]
    assert stats["mean"] == pytest.approx(0.7) and stats["values"] == [0.6, None, 0.8]


def test_ensemble_is_the_mean_probability_of_the_folds(cv_run):
    from xrai.runs.load import load_model

    run_dir, _ = cv_run
    ensemble, config = load_model(run_dir)
    assert isinstance(ensemble, FoldEnsemble) and len(ensemble.members) == FOLDS
    x = torch.randn(4, 3, config.image_size, config.image_size)
    with torch.inference_mode():
        mean = torch.stack([torch.sigmoid(m(x).reshape(-1)) for m in ensemble.members]).mean(0)
        out = ensemble(x)
    assert out.shape == (4, 1)
    torch.testing.assert_close(torch.sigmoid(out.reshape(-1)), mean, atol=1e-5, rtol=1e-4)


def test_load_run_gives_the_ensemble_at_the_oof_operating_point(cv_run):
    from xrai.evaluate.predictions import predict
    from xrai.runs.load import load_run

    run_dir, result = cv_run
    run = load_run(run_dir)
    oof_report = json.loads((run_dir / "report_oof.json").read_text())
    assert isinstance(run.model, FoldEnsemble) and len(run.model.members) == FOLDS
    assert run.point.source == "oof" and run.threshold == result.summary["oof"]["threshold"]
    assert run.calibration.slope == (oof_report["calibration"]["slope"] if run.calibrated else 1.0)
    assert run.checkpoint_sha256 == oof_report["checkpoint"]["sha256"] and "report_oof.json" in run.threshold_from
    rows = read_manifest(run_dir).head(4)
    pred = predict(run, rows, progress=False)
    x = torch.randn(2, 3, run.config.image_size, run.config.image_size)
    calibrated, raw = run.probabilities(x)
    with torch.inference_mode():
        expected = torch.sigmoid(run.model(x).reshape(-1)).numpy()
    np.testing.assert_allclose(raw, expected, atol=1e-5)  # tta off in this recipe: the ensemble as it is
    assert len(pred) == 4 and np.isfinite(pred["logit"]).all()


def test_predict_and_serve_a_cv_run(cv_run, capsys):
    import io

    from PIL import Image
    from test_app import upload

    from xrai.cli.commands import main
    from xrai.deploy.app import create_app

    run_dir, result = cv_run
    image = read_manifest(run_dir)["path"].iloc[0]
    assert main(["predict", "--run", str(run_dir), image]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert line["threshold"] == pytest.approx(result.summary["oof"]["threshold"])
    buffer = io.BytesIO()
    Image.open(image).save(buffer, format="PNG")
    client = create_app(run_dir).test_client()
    answer = upload(client, buffer.getvalue(), filename="x.png").get_json()
    assert answer["probability"] == pytest.approx(line["probability"], abs=1e-5)


def test_ensemble_report_uses_the_oof_threshold(cv_run):
    run_dir, result = cv_run
    report = evaluate_run(run_dir, split="test", progress=False, n_bootstrap=50, explain_images=0)
    assert report["threshold_from"] == "oof" and report["threshold"] == result.summary["oof"]["threshold"]
    assert report["checkpoint"]["file"] == "folds/*/checkpoints/best.pt"
    card = (run_dir / "model_card.md").read_text()
    assert "chosen on the out-of-fold predictions of a grouped CV" in card and "| oof |" in card
    oof = evaluate_run(run_dir, split="valid", progress=False)  # a CV run's validation: its OOF report
    assert oof["split"] == "oof" and oof == json.loads((run_dir / "report_oof.json").read_text())


def test_gradcam_through_the_ensemble(cv_run):
    from xrai.explain.cam import CamExplainer
    from xrai.runs.load import load_model

    ensemble, config = load_model(cv_run[0])
    x = torch.randn(2, 3, config.image_size, config.image_size)
    with CamExplainer(ensemble) as explainer:
        cams = explainer(x, target_class=1)
    assert cams.shape == (2, config.image_size, config.image_size) and len(explainer.target_layers) == FOLDS
    with torch.inference_mode():
        expected = torch.sigmoid(ensemble(x).reshape(-1)).numpy()
    np.testing.assert_allclose(explainer.probabilities, expected, atol=1e-5)


def test_final_fit_on_the_whole_pool(cv_run):
    run_dir, result = cv_run
    final = run_dir / "final"
    history = pd.read_csv(final / "history.csv")
    assert len(history) == result.summary["epochs"]["chosen"] and history["val_auroc"].isna().all()
    config = TrainConfig.from_json(final / "config.json")
    assert config.patience == 0 and config.keep == "last"
    manifest = read_manifest(final)
    assert set(manifest["split"]) == {"train", "test"}
    assert (manifest["split"] == "train").sum() == result.summary["pool"]["n"]
    report = evaluate_run(final, split="test", progress=False, n_bootstrap=50, explain_images=0)
    assert report["threshold_from"] == "oof" and report["threshold"] == result.summary["oof"]["threshold"]
    from xrai.runs.load import load_run

    run = load_run(final)
    assert run.point.source == "oof" and run.threshold == result.summary["oof"]["threshold"]
    with pytest.raises(ValueError, match="no validation split of its own"):
        evaluate_run(final, split="valid", progress=False)


def test_a_stale_oof_threshold_is_refused_and_says_rerun_the_cv(cv_run, tmp_path):
    # Loading reads only (issue 21): a stale out-of-fold point is refused in one line naming the fix;
    # stale="default" (what evaluate asks for) gives the defaults with that reason as the note.
    import shutil
    import warnings

    from xrai.errors import is_user_error
    from xrai.labels import DEFAULT_THRESHOLD
    from xrai.runs.layout import THRESHOLD_JSON
    from xrai.runs.load import load_run
    from xrai.runs.operating import StaleOperatingPointError

    run_dir = tmp_path / "run"
    shutil.copytree(cv_run[0], run_dir)
    for folder, name in ((run_dir, "report_oof.json"), (run_dir / "final", THRESHOLD_JSON)):
        report = json.loads((folder / name).read_text())
        report["checkpoint"]["sha256"] = "0" * 64  # chosen with another checkpoint
        (folder / name).write_text(json.dumps(report))
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(StaleOperatingPointError, match=f"{name} was made with checkpoint sha256 000000000000"
                           r".*rerun the CV") as caught:
            load_run(folder)
        assert is_user_error(caught.value) and "\n" not in str(caught.value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no re-evaluation (an out-of-fold threshold is not chosen on valid)
            run = load_run(folder, stale="default")
        assert run.point.source != "oof" and run.threshold == DEFAULT_THRESHOLD
        assert f"{name} was made with checkpoint sha256 000000000000" in run.point.note
        assert "rerun the CV" in run.point.note
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


def test_a_finished_cv_is_not_overwritten(cv_run, synthetic_manifest):
    run_dir, result = cv_run
    with pytest.raises(FileExistsError, match="resume"):
        cross_validate(_config(), synthetic_manifest, run_dir, folds=FOLDS, progress=False)
    stamp = (run_dir / "folds" / "0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = cross_validate(_config(), synthetic_manifest, run_dir, folds=FOLDS, resume=True, progress=False)
    assert (run_dir / "folds" / "0" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp  # nothing retrained
    assert again.summary["summary"] == result.summary["summary"]


def test_cli_cv_runs_and_reports(synthetic_root, tmp_path, capsys):
    from xrai.cli.commands import main

    out = tmp_path / "cli"
    args = ["cv", "--data", "synthetic", "--root", str(synthetic_root), "--no-pretrained", "--img-size", "32",
            "--epochs", "1", "--batch-size", "32", "--folds", "2", "--input-path", "cached", "--num-workers", "0",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2-fold CV AUROC" in printed and "out-of-fold AUROC" in printed
    assert main(["evaluate", "--run", str(out)]) == 0  # the ensemble: its OOF report, then test at that threshold
    printed = capsys.readouterr().out
    assert "oof: n=" in printed and "test: n=" in printed and "(chosen on oof)" in printed
    assert (out / "roc_oof.png").is_file() and (out / "roc_test.png").is_file()
    assert main(args) == 2  # the folder is taken: one line, exit 2
    assert "--resume" in capsys.readouterr().err


def test_flip_tta_is_the_same_probability_in_predict_and_explain(cv_run):
    from xrai.evaluate.predictions import predict
    from xrai.explain.cam import explain_paths
    from xrai.runs.load import load_model

    run_dir, _ = cv_run
    ensemble, config = load_model(run_dir)
    config = config.replace(tta=True)
    rows = read_manifest(run_dir).head(3)
    expected = predict(ensemble, rows, config=config, progress=False)["probability"].to_numpy()  # tta from config
    for with_cam in (True, False):
        got = [r["probability"] for r in explain_paths(ensemble, config, rows["path"], threshold=0.5,
                                                       with_cam=with_cam)]
        np.testing.assert_allclose(got, expected, atol=1e-5)
