"""The command line, as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from xrai.__main__ import COMMANDS, build_parser, main


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrai", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    proc = _run("--help")
    assert proc.returncode == 0
    for name in ("demo", "download", "audit", "train", "cv", "evaluate", "explain", "predict", "bench", "serve"):
        assert name in proc.stdout
    assert set(COMMANDS) == {"demo", "download", "audit", "train", "cv", "evaluate", "explain", "predict", "bench",
                             "serve"}


def test_train_flags_map_onto_the_config():
    from xrai.__main__ import _train_config

    args = build_parser().parse_args(
        ["train", "--data", "fracatlas", "--root", "/x", "--body-part", "wrist", "--model", "resnet18",
         "--epochs", "2", "--img-size", "160", "--batch-size", "8", "--no-pretrained", "--freeze",
         "--head", "mlp", "--prune-sparsity", "0.95", "--scheduler", "step", "--logger", "mlflow"])
    cfg = _train_config(args)
    assert (cfg.data, cfg.root, cfg.body_part, cfg.model, cfg.epochs, cfg.image_size, cfg.batch_size) == (
        "fracatlas", "/x", "wrist", "resnet18", 2, 160, 8)
    assert (cfg.pretrained, cfg.freeze, cfg.head, cfg.prune_sparsity, cfg.scheduler, cfg.loggers) == (
        False, True, "mlp", 0.95, "step", ["mlflow"])


def test_audit_writes_manifest_and_audit(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["audit", "--data", "synthetic", "--root", str(synthetic_root), "--out", str(out)]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    assert {"path", "label", "body_part", "patient_id", "study_id", "split", "source"} <= set(manifest.columns)
    assert set(manifest["split"]) == {"train", "valid", "test"}
    audit = pd.read_csv(out / "audit.csv")
    assert list(audit.columns[:6]) == ["group", "path", "label", "split", "kind", "crosses"]
    assert "duplicate groups crossing splits" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    out = (demo_run / "demo_stdout.txt").read_text()
    for name in ("manifest.csv", "audit.csv", "config.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "history.csv", "curves.png", "predictions_valid.csv", "predictions_test.csv",
                 "report_valid.json", "report_test.json", "confusion_matrix_test.png", "roc_test.png",
                 "pr_test.png", "per_body_part_test.png"):
        assert (demo_run / name).is_file(), name
    assert list((demo_run / "gradcam").glob("*.png"))
    valid = json.loads((demo_run / "report_valid.json").read_text())
    test = json.loads((demo_run / "report_test.json").read_text())
    assert test["threshold"] == valid["threshold"] and test["threshold_from"] == "valid"
    assert "AUROC" in out and "report_test.json" in out and "gradcam" in out


@pytest.mark.slow
def test_demo_model_learns_the_fracture_line(demo_run):
    valid = json.loads((demo_run / "report_valid.json").read_text())
    assert valid["image"]["auroc"] >= 0.95, valid["image"]


@pytest.mark.slow
def test_predict_and_explain_go_on_past_a_bad_image(demo_run, tmp_path):
    manifest = pd.read_csv(demo_run / "predictions_test.csv")
    good = manifest["path"].iloc[:2].tolist()
    bad = tmp_path / "not_an_xray.png"
    bad.write_text("hello")
    proc = _run("predict", "--run", str(demo_run), good[0], str(bad), good[1])
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["path"] for line in lines] == [good[0], str(bad), good[1]]
    assert "error" in lines[1] and 0.0 <= lines[0]["probability"] <= 1.0 and lines[0]["label"] in (0, 1)
    assert lines[0]["threshold"] == json.loads((demo_run / "report_valid.json").read_text())["threshold"]

    out = tmp_path / "cams"
    proc = _run("explain", "--run", str(demo_run), good[0], str(bad), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.slow
def test_evaluate_external_at_the_runs_threshold(demo_run, synthetic_root, capsys):
    assert main(["evaluate", "--run", str(demo_run), "--data", "synthetic", "--root", str(synthetic_root)]) == 0
    report = json.loads((demo_run / "report_external.json").read_text())
    valid = json.loads((demo_run / "report_valid.json").read_text())
    assert report["threshold"] == valid["threshold"]


@pytest.mark.slow
def test_training_into_a_taken_run_folder_is_one_clear_line(demo_run, capsys):
    code = main(["train", "--data", "synthetic", "--no-pretrained", "--epochs", "1", "--out", str(demo_run)])
    err = capsys.readouterr().err
    assert code == 2
    assert "already holds a run" in err and "--resume" in err and "Traceback" not in err
