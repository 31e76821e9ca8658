"""The command line, as a user types it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest
from _checks import assert_picture, child_env
from PIL import Image

from xrai.cli.commands import COMMANDS, build_parser, main


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrai", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    proc = _run("--help")
    assert proc.returncode == 0
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == set(COMMANDS)  # every subcommand has a handler and every handler a subcommand
    for name in COMMANDS:
        assert name in proc.stdout
    assert "cv" in COMMANDS


def test_help_and_the_torch_free_commands_import_no_torch(tmp_path):
    # The parser alone, and the commands that must work where torch (or pandas) is not installed: --help of
    # every command, and serve --onnx (the Dockerfile's onnx image has neither).
    env = child_env(block=("torch", "torchvision", "pandas", "sklearn"))
    for args in (["--help"], *([name, "--help"] for name in COMMANDS)):
        proc = subprocess.run([sys.executable, "-m", "xrai", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0 and "usage: python -m xrai" in proc.stdout, (args, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "xrai", "serve", "--onnx", str(tmp_path / "model.onnx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("xrai serve: no exported model"), proc.stderr
    code = "import sys\nfrom xrai.cli.commands import build_parser\nbuild_parser().parse_args(['train'])\n" \
           "heavy = [m for m in ('torch', 'pandas', 'sklearn') if m in sys.modules]\nassert not heavy, heavy\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr


def test_bench_markdown_needs_no_torch(tmp_path):
    from _checks import REPO

    proc = subprocess.run([sys.executable, "-m", "xrai", "bench", "--markdown", str(REPO / "docs" / "bench" /
                                                                                      "cpu-2core.json")],
                          capture_output=True, text=True, env=child_env(block=("torch", "torchvision")), timeout=120)
    assert proc.returncode == 0 and "| What | Figure |" in proc.stdout, proc.stderr


def test_train_flags_map_onto_the_config():
    from xrai.cli.commands import _train_config

    args = build_parser().parse_args(
        ["train", "--data", "fracatlas", "--root", "/x", "--body-part", "wrist", "--model", "resnet18",
         "--epochs", "2", "--img-size", "160", "--batch-size", "8", "--no-pretrained", "--freeze",
         "--head", "mlp", "--prune-sparsity", "0.95", "--scheduler", "step", "--logger", "mlflow"])
    cfg = _train_config(args)
    assert (cfg.data, cfg.root, cfg.body_part, cfg.model, cfg.epochs, cfg.image_size, cfg.batch_size) == (
        "fracatlas", "/x", "wrist", "resnet18", 2, 160, 8)
    assert (cfg.pretrained, cfg.freeze, cfg.head, cfg.prune_sparsity, cfg.scheduler, cfg.loggers) == (
        False, True, "mlp", 0.95, "step", ["mlflow"])
    assert cfg.deterministic is False
    assert _train_config(build_parser().parse_args(["train", "--deterministic"])).deterministic is True


def test_audit_writes_manifest_and_audit(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["audit", "--data", "synthetic", "--root", str(synthetic_root), "--out", str(out)]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    assert {"path", "label", "body_part", "patient_id", "study_id", "split", "source"} <= set(manifest.columns)
    assert set(manifest["split"]) == {"train", "valid", "test"}
    audit = pd.read_csv(out / "audit.csv")
    assert list(audit.columns[:6]) == ["group", "path", "label", "split", "kind", "crosses"]
    assert "duplicate groups crossing splits" in capsys.readouterr().out


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """60 tiny distinct images in two class folders and no split folders: every split is made by load()."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for _label, name in enumerate(("not fractured", "fractured")):
        (root / name).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def test_split_fractions_from_the_cli_shape_the_split(class_folders, tmp_path, monkeypatch, capsys):
    counts = {}
    for name, flags in {"default": [], "wider": ["--val-fraction", "0.3", "--test-fraction", "0.25"]}.items():
        out = tmp_path / name
        assert main(["audit", "--data", "folder", "--root", str(class_folders), "--out", str(out), *flags]) == 0
        counts[name] = pd.read_csv(out / "manifest.csv")["split"].value_counts().to_dict()
    assert counts["default"] == {"train": 42, "valid": 9, "test": 9}  # 70/15/15 of 60
    assert counts["wider"] == {"train": 27, "valid": 18, "test": 15}  # 45/30/25

    import xrai.train.cv
    import xrai.train.trainer

    for command, module, name in (("train", xrai.train.trainer, "fit"), ("cv", xrai.train.cv, "cross_validate")):
        seen = {}

        def stop(config, manifest, run_dir, seen=seen, **kwargs):  # stop before training: the split is what is tested
            seen.update(config=config, counts=manifest["split"].value_counts().to_dict())
            raise ValueError("stopped by the test")

        monkeypatch.setattr(module, name, stop)
        assert main([command, "--data", "folder", "--root", str(class_folders), "--out", str(tmp_path / command),
                     "--val-fraction", "0.3", "--test-fraction", "0.25"]) == 2
        assert (seen["config"].val_fraction, seen["config"].test_fraction) == (0.3, 0.25), command
        assert seen["counts"] == counts["wider"], command


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    out = (demo_run / "demo_stdout.txt").read_text()
    for name in ("manifest.csv", "audit.csv", "config.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "history.csv", "predictions_valid.csv", "predictions_test.csv", "report_valid.json",
                 "report_test.json", "model_card.md"):
        assert (demo_run / name).is_file() and (demo_run / name).stat().st_size > 0, name
    for name in ("curves.png", "confusion_matrix_test.png", "roc_test.png", "pr_test.png", "per_body_part_test.png",
                 "reliability_test.png"):
        assert_picture(demo_run / name, min_side=200)
    assert len(pd.read_csv(demo_run / "history.csv")) == 3  # the demo's three epochs
    assert len(pd.read_csv(demo_run / "predictions_test.csv")) == len(pd.read_csv(demo_run / "manifest.csv")
                                                                       .query("split == 'test'"))
    overlays = sorted((demo_run / "gradcam").glob("*.png"))
    assert len(overlays) >= 3 and all(assert_picture(p, min_side=64) is not None for p in overlays)
    valid = json.loads((demo_run / "report_valid.json").read_text())
    test = json.loads((demo_run / "report_test.json").read_text())
    assert test["threshold"] == valid["threshold"] and test["threshold_from"] == "valid"
    assert "AUROC" in out and "report_test.json" in out and "gradcam" in out


@pytest.mark.slow
def test_demo_reports_thresholds_calibration_explanations_and_a_model_card(demo_run):
    from xrai.explain.cam import CAM_METHODS

    out = (demo_run / "demo_stdout.txt").read_text()
    valid = json.loads((demo_run / "report_valid.json").read_text())
    test = json.loads((demo_run / "report_test.json").read_text())
    # study and image thresholds, each chosen on valid and named beside the figures it made
    assert valid["study_threshold"] is not None and test["study_threshold"] == valid["study_threshold"]
    assert "at image threshold" in out and "at study threshold" in out
    # ECE before and after the temperature fitted on valid; the screening operating point
    for report in (valid, test):
        ece = report["calibration"]["ece"]
        assert 0 <= ece["uncalibrated"] <= 1 and 0 <= ece["calibrated"] <= 1
    assert "ECE" in out and "screening point" in out
    # ROAD per CAM method and the randomisation check on test; the pointing game beats chance
    methods = test["explain"]["methods"]
    assert set(methods) == set(CAM_METHODS)
    for scores in methods.values():
        assert scores["road_combined"]["n"] > 0 and scores["randomisation"]["n"] > 0
    assert methods["gradcam"]["pointing_game"]["pointing_game"] > methods["gradcam"]["pointing_game"]["chance"]
    assert "ROAD" in out and "randomisation check" in out
    # no MURA baseline on a synthetic run
    assert test["baseline"] is None and "DenseNet-169" not in out
    card = (demo_run / "model_card.md").read_text()
    assert "research and teaching, not diagnosis" in card and "Known limits" in card
    assert f"Image threshold {valid['threshold']:.3f}" in card and f"study threshold {valid['study_threshold']:.3f}" in card
    assert "ECE" in card and "ROAD" in card and "Spearman" in card and "model_card.md" in out


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
    [written] = out.glob("*.png")
    assert assert_picture(written, min_side=64).shape[1] == Image.open(good[0]).size[0]  # the X-ray, overlaid


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
