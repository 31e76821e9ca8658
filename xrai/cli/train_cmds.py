"""``python -m xrai train | cv``: training, on one process or several (torchrun), and grouped cross-validation.

``fit`` and ``cross_validate`` are looked up on their modules when a command runs (``trainer.fit``,
``cv.cross_validate``), so a test may replace them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import xrai.train.cv as cv
import xrai.train.trainer as trainer
from xrai import plots
from xrai.cli.commands import _run_config, _train_config
from xrai.cli.data_cmds import config_manifest
from xrai.config import TrainConfig
from xrai.data import read_manifest
from xrai.evaluate.report import figure
from xrai.recipe import describe_recipe
from xrai.runs.layout import CV_JSON, FOLDS_DIR, RunFolder
from xrai.train import distributed
from xrai.train.launcher import launch, resolve_nproc

__all__ = ["cmd_cv", "cmd_train", "save_curves"]


def save_curves(run_dir: Path) -> None:
    """curves.png from the run's history.csv."""
    plots.plot_history(pd.read_csv(RunFolder(run_dir).history_csv), run_dir / "curves.png")


def _run_dir(out: str | None, config: TrainConfig, suffix: str = "") -> Path:
    """--out, or runs/<data>_<model>[_<part>]<suffix>."""
    part = "" if config.body_parts() is None else "_" + "-".join(config.body_parts())
    return Path(out or f"runs/{config.data}_{config.model}{part}{suffix}")


def cmd_train(args) -> int:
    config = _run_config(args)
    run_dir = _run_dir(args.out, config)
    folder = RunFolder(run_dir)

    def manifest(_=None):
        if folder.manifest_csv.is_file():
            return read_manifest(run_dir)  # the run's own split, so a resume or a re-run sees the same rows
        if args.manifest is not None:
            return read_manifest(args.manifest)
        return config_manifest(config)

    print(f"{config.model}, {'ImageNet weights' if config.pretrained else 'from scratch'}: {describe_recipe(config)}")
    nproc = 1 if args.nproc is None else resolve_nproc(args.nproc, config.device)
    if nproc > 1:  # torchrun in a subprocess; this process draws the curves once it is done
        if distributed.world_size_from_env() > 1:
            raise ValueError("--nproc starts torchrun, but this process already runs under torchrun; drop --nproc")
        fresh = not folder.manifest_csv.is_file()  # else the workers read the run folder's own
        result = launch(config, run_dir, nproc=nproc, resume=args.resume, manifest=manifest() if fresh else None)
        writer = True
    else:
        ctx = distributed.init(config.device)  # torchrun's rank, or this process alone
        # Rank 0 first: it downloads or generates the data once and notes where the images are.
        result = trainer.fit(config, ctx.main_first(manifest), run_dir, resume=args.resume)
        writer = ctx.is_main
        distributed.teardown()
    if writer:
        save_curves(run_dir)
        print(f"best {config.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}; run folder: {run_dir}")
    return 0


def cmd_cv(args) -> int:
    config = _train_config(args)
    run_dir = _run_dir(args.out, config, "_cv")
    folder = RunFolder(run_dir)
    if args.resume and folder.manifest_csv.is_file():
        manifest = read_manifest(run_dir)  # the CV's own folds
    else:
        manifest = config_manifest(config)
    print(f"{config.model}, {'ImageNet weights' if config.pretrained else 'from scratch'}: {describe_recipe(config)}")
    result = cv.cross_validate(config, manifest, run_dir, folds=args.folds, resume=args.resume, final=args.final)
    summary = result.summary
    auroc = summary["summary"]["image"]["auroc"]
    print(f"{args.folds}-fold CV AUROC {figure(auroc['mean'])} +- {figure(auroc['std'])} (std over folds; per fold "
          f"{', '.join(figure(v) for v in auroc['values'])}); out-of-fold AUROC {figure(summary['oof']['auroc'])} at "
          f"threshold {summary['oof']['threshold']:.3f}; {summary['epochs']['chosen']} epochs "
          f"({summary['epochs']['rule']})")
    print(f"run folder: {run_dir} ({CV_JSON}, {folder.report_json('oof').name}, {FOLDS_DIR}/); the folds' ensemble: "
          f"python -m xrai evaluate --run {run_dir} --split test")
    if result.final is not None:
        print(f"final model on every train+valid image: {run_dir / 'final'} "
              f"(python -m xrai evaluate --run {run_dir / 'final'} --split test)")
    return 0
