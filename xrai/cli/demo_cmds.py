"""``python -m xrai demo``: the whole pipeline on the built-in synthetic set: data and audit, training,
evaluation on valid and test, and the Grad-CAM gallery."""

from __future__ import annotations

import time
from pathlib import Path

import xrai.train.trainer as trainer
from xrai.cli.data_cmds import save_with_audit
from xrai.cli.evaluate_cmds import evaluate_splits
from xrai.cli.report_lines import print_report
from xrai.cli.train_cmds import save_curves
from xrai.config import TrainConfig
from xrai.data import load
from xrai.evaluate.galleries import GALLERY_KINDS, gallery
from xrai.runs.layout import RunFolder

__all__ = ["cmd_demo"]


def cmd_demo(args) -> int:
    """Data, audit, training, evaluation on valid and test, and the Grad-CAM gallery, on the synthetic set."""
    start = time.perf_counter()
    run_dir = Path(args.out)
    folder = RunFolder(run_dir)
    manifest = load("synthetic")
    summary = save_with_audit(manifest, run_dir)
    print(f"data: {len(manifest)} synthetic images ({manifest.attrs.get('split_method', '')}); "
          f"duplicate groups crossing splits: {summary['cross_split_groups']}")
    config = TrainConfig(data="synthetic", model=args.model, pretrained=False, epochs=args.epochs)
    trainer.fit(config, manifest, run_dir, resume=folder.checkpoint("last").is_file())
    save_curves(run_dir)
    reports = evaluate_splits(run_dir, ["valid", "test"])
    pictures = gallery(run_dir, split="test")
    print()
    for report in reports.values():
        print_report(report)
    print(f"done in {time.perf_counter() - start:.0f} s")
    print(f"reports : {folder.report_json('valid')}, {folder.report_json('test')}")
    print(f"figures : {run_dir}/curves.png, confusion_matrix_test.png, roc_test.png, pr_test.png, "
          f"per_body_part_test.png, reliability_test.png")
    print(f"card    : {folder.model_card}")
    galleries = sum(1 for key in pictures if key in GALLERY_KINDS)
    print(f"Grad-CAM: {folder.gradcam} ({galleries} galleries, {len(pictures) - galleries} single overlays)")
    print(f"next    : python -m xrai serve --run {run_dir}")
    return 0
