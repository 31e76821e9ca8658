"""Every figure function returns a Figure and writes a PNG when given a path (Agg, no display)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _checks import assert_picture
from matplotlib.figure import Figure

from xrai import plots
from xrai.config import TrainConfig
from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_options
from xrai.data.dataset import ClassicBatches


def _png(path: Path) -> None:
    assert_picture(path, min_side=200)  # a matplotlib figure: hundreds of px a side, with marks on it


def test_plot_history(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55],
                            "val_auroc": [0.6, 0.8, 0.9], "val_accuracy": [0.55, 0.7, 0.8], "lr": [1e-3] * 3,
                            "seconds": [1.0] * 3, "images_per_s": [100.0] * 3})
    fig = plots.plot_history(history, tmp_path / "curves.png")
    assert isinstance(fig, Figure)
    _png(tmp_path / "curves.png")


def test_plot_confusion_matrix_counts_and_row_percent(tmp_path):
    fig = plots.plot_confusion_matrix([[8, 2], [1, 3]], tmp_path / "cm.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "8\n80.0%" in texts and "3\n75.0%" in texts
    _png(tmp_path / "cm.png")


def test_plot_roc_and_pr(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    fig = plots.plot_roc(y, p, tmp_path / "roc.png", threshold=0.5, auroc_ci=[0.7, 0.9])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("AUROC" in t and "95% CI 0.700-0.900" in t for t in legend)
    assert any("threshold 0.500" in t for t in legend)
    plots.plot_pr(y, p, tmp_path / "pr.png", threshold=0.5)
    _png(tmp_path / "roc.png")
    _png(tmp_path / "pr.png")
    plots.plot_roc(np.ones(5), np.linspace(0, 1, 5))  # one class: no crash


def test_plot_per_body_part_shows_baseline_on_mura_runs_only(tmp_path):
    from xrai.evaluate.metrics import mura_baseline

    report = {"split": "valid", "study": {"kappa": 0.6}, "image": {"kappa": 0.5},
              "per_body_part": {"wrist": {"n": 10, "auroc": 0.9, "kappa": 0.7, "study_kappa": 0.8},
                                "finger": {"n": 6, "auroc": None, "kappa": None, "study_kappa": None}},
              "baseline": mura_baseline("mura", "MURA's public valid split")}
    fig = plots.plot_per_body_part(report, tmp_path / "parts.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("DenseNet-169" in t and "hidden test set" in t for t in legend) and any("0.705" in t for t in legend)
    heights = sorted(round(b.get_height(), 3) for b in fig.axes[0].patches if np.isfinite(b.get_height()))
    assert 0.931 in heights and 0.389 in heights and 0.8 in heights  # baseline wrist/finger beside ours
    _png(tmp_path / "parts.png")
    # a FracAtlas or synthetic run is not compared with a MURA figure
    other = plots.plot_per_body_part({**report, "baseline": None})
    legend = [t.get_text() for t in other.axes[0].get_legend().get_texts()]
    assert not any("DenseNet" in t or "0.705" in t for t in legend)


def test_plot_reliability(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 500)
    y = (rng.random(500) < 1 / (1 + np.exp(-z / 2))).astype(int)
    fig = plots.plot_reliability(y, 1 / (1 + np.exp(-z / 2)), tmp_path / "rel.png", raw_prob=1 / (1 + np.exp(-z)))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("uncalibrated: ECE") for t in legend) and any(t.startswith("calibrated: ECE") for t in legend)
    assert "15 equal-width bins" in fig.axes[0].get_title()
    _png(tmp_path / "rel.png")


def test_save_run_figures(tmp_path, synthetic_manifest):
    run = tmp_path / "run"
    run.mkdir()
    test = synthetic_manifest[synthetic_manifest["split"] == "test"]
    rng = np.random.default_rng(0)
    pred = test[["path", "label", "body_part", "patient_id", "study_id"]].assign(
        probability=np.clip(0.3 + 0.4 * test["label"] + rng.normal(0, 0.2, len(test)), 0, 1))
    pred.to_csv(run / "predictions_test.csv", index=False)
    from xrai.evaluate.run import build_report

    report = build_report(pred, split="test", threshold=0.5, threshold_from="valid", split_method="official",
                          audit={"cross_split_groups": 0, "cross_label_groups": 0}, n_bootstrap=50)
    (run / "report_test.json").write_text(json.dumps(report))
    pd.DataFrame({"epoch": [1, 2], "train_loss": [0.6, 0.4], "val_loss": [0.6, 0.5], "val_auroc": [0.7, 0.8],
                  "val_accuracy": [0.6, 0.7]}).to_csv(run / "history.csv", index=False)
    written = plots.save_run_figures(run, "test")
    assert set(written) == {"confusion_matrix", "roc", "pr", "per_body_part", "reliability", "curves"}
    for name in ("confusion_matrix_test.png", "roc_test.png", "pr_test.png", "per_body_part_test.png",
                 "reliability_test.png", "curves.png"):
        _png(run / name)
    with pytest.raises(FileNotFoundError, match="evaluate"):
        plots.save_run_figures(run, "valid")


def test_eda_figures(tmp_path, synthetic_manifest):
    for name, fig in {
        "balance": plots.plot_class_balance(synthetic_manifest, tmp_path / "balance.png"),
        "grid": plots.plot_sample_grid(synthetic_manifest, tmp_path / "grid.png", n=3),
        "sizes": plots.plot_image_sizes(synthetic_manifest, tmp_path / "sizes.png", sample=30),
        "patients": plots.plot_patients_per_part(synthetic_manifest, tmp_path / "patients.png"),
    }.items():
        assert isinstance(fig, Figure), name
        _png(tmp_path / f"{name}.png")


def test_plot_audit_groups(tmp_path, synthetic_manifest):
    paths = synthetic_manifest["path"].tolist()
    audit = pd.DataFrame({
        "group": [0, 0, 1, 1, 1], "path": paths[:5], "label": [0, 1, 0, 0, 0],
        "split": ["train", "test", "train", "train", "train"], "kind": ["exact", "exact", "near", "near", "near"],
        "crosses": ["split+label", "split+label", "", "", ""],
    })
    fig = plots.plot_audit_groups(audit, tmp_path / "audit.png", groups=2, per_group=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("group 0 [split+label")  # the worst group comes first
    _png(tmp_path / "audit.png")
    plots.plot_audit_groups(audit.iloc[:0], tmp_path / "empty.png")
    _png(tmp_path / "empty.png")


def test_augmented_batch_is_what_the_training_loop_feeds(tmp_path, synthetic_manifest):
    """The pictures are epoch 0's first training inputs: the classic batch source's, un-normalised."""
    config = TrainConfig(data="synthetic", pretrained=False, img_size=64, batch_size=8, aug_strength=1.5, seed=3)
    images, labels = plots.augmented_inputs(config, synthetic_manifest, n=12)
    train = synthetic_manifest[synthetic_manifest["split"] == "train"]
    source = ClassicBatches(train, image_size=64, resize_size=config.resize_size, batch_size=8, train=True, seed=3,
                            num_workers=0, device="cpu", progress=False, resize=config.resize,
                            augment=augment_options(crop_scale=config.crop_scale, aug_strength=1.5))
    fed = list(source.epoch(0))
    x = torch.cat([b[0] for b in fed])[:12]
    y = torch.cat([b[1] for b in fed])[:12]
    assert images.shape == (12, 64, 64) and labels.tolist() == y.int().tolist()
    for channel in range(3):  # grey in every channel, normalised per channel
        seen = (x[:, channel] * IMAGENET_STD[channel] + IMAGENET_MEAN[channel]).clamp(0, 1).numpy()
        np.testing.assert_allclose(images, seen, atol=1e-5)

    config.to_json(tmp_path / "config.json")  # a run folder works as well as a config
    fig = plots.augmented_batch(tmp_path, synthetic_manifest, n=12, seed=3, path=tmp_path / "batch.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [("normal", "abnormal")[int(v)] for v in y]
    _png(tmp_path / "batch.png")
    other = plots.augmented_inputs(config.replace(seed=4), synthetic_manifest, n=12)[0]
    assert not np.allclose(other, images)  # another seed, another draw
    with pytest.raises(FileNotFoundError, match="config.json"):
        plots.augmented_batch(tmp_path / "none", synthetic_manifest)
