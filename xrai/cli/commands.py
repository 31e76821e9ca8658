"""Command line: python -m xrai {demo,download,audit,train,cv,evaluate,explain,predict,bench,export,serve,cache,wheelhouse}.

A failure the user can fix (``xrai.errors.is_user_error``) prints one line and exits 2; -v shows the
traceback. Anything else is a bug: a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from xrai.config import TrainConfig
from xrai.errors import is_user_error, one_line
from xrai.fileio import atomic_write_csv
from xrai.recipe import DEFAULT_RECIPE

SOURCES = ("synthetic", "mura", "fracatlas", "folder", "multiregion", "bonefracture")


def _add_data_args(p: argparse.ArgumentParser, *, default: str | None = "synthetic") -> None:
    p.add_argument("--data", default=default, choices=SOURCES, help="dataset source (default: %(default)s)")
    p.add_argument("--root", default=None, help="dataset folder; omitted: download it (or the synthetic default)")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help="share of images for valid where the source has no valid split (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=TrainConfig.test_fraction,
                   help="share of images for test where the source has no test split (default: %(default)s)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags train and cv share: data, model, optimisation and the recipe (None: the recipe's value)."""
    from xrai.config import KEEPS, OPTIMIZERS, RESIZES, SCHEDULERS
    from xrai.recipe import RECIPES

    _add_data_args(p)
    p.add_argument("--body-part", default="all", help="all, one MURA part (wrist) or several (wrist,hand)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--img-size", type=int, default=None, help="crop side (default 224; 128 on synthetic)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (default: yes)")
    p.add_argument("--freeze", action="store_true", help="train the head alone (frozen backbone)")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--monitor", default=TrainConfig.monitor, choices=("auroc", "accuracy", "loss"))
    p.add_argument("--prune-sparsity", type=float, default=0.0, help="SynFlow pruning at init, e.g. 0.95")
    p.add_argument("--input-path", default="auto", choices=("auto", "cached", "classic"))
    p.add_argument("--num-workers", type=int, default=TrainConfig.num_workers)
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic kernels, no cuDNN autotuning (slower; for bit-exact reruns)")
    p.add_argument("--seed", type=int, default=0)
    _add_split_args(p)
    p.add_argument("--logger", action="append", default=[], choices=("mlflow", "wandb"), dest="loggers")
    g = p.add_argument_group("recipe (docs/recipe.md; unset flags take the --recipe's value, else the default)")
    g.add_argument("--recipe", default=None, choices=tuple(RECIPES), help=f"a named recipe (default {DEFAULT_RECIPE}, TrainConfig's; v1: the old one)")
    g.add_argument("--resize", default=None, choices=RESIZES, help="fit images to a square: keep aspect "
                   "(letterbox) or stretch")
    g.add_argument("--crop-scale", type=float, default=None, help="smallest random crop, as a share of the area")
    g.add_argument("--aug-strength", type=float, default=None, help="rotation and intensity jitter, x1 = "
                   "+-10 degrees and +-20%% (0: crop and flip only)")
    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    g.add_argument("--scheduler", default=None, choices=SCHEDULERS)
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up of the cosine schedule")
    g.add_argument("--lr", type=float, default=None, help="(peak) learning rate")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--label-smoothing", type=float, default=None)
    g.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights, e.g. 0.99 (0: off)")
    g.add_argument("--pos-weighting", action=argparse.BooleanOptionalAction, default=None,
                   help="weigh abnormal images by n_normal / n_abnormal in the loss")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image's probability with its left-right flip's when evaluating")
    g.add_argument("--keep", default=None, choices=KEEPS, help="hand on the best validated or the last epoch")
    g.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without gain (0: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xrai",
        description="Train, evaluate and explain musculoskeletal X-ray classifiers (MURA, FracAtlas).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic set (CPU, ~2 min)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="mobilenet_v2")

    p = sub.add_parser("download", help="fetch a dataset with kagglehub (or find it attached in Kaggle)")
    p.add_argument("name", choices=("mura", "fracatlas", "multiregion", "bonefracture"))
    p.add_argument("--force", action="store_true", help="download again even if cached")

    p = sub.add_parser("audit", help="write manifest.csv and audit.csv (duplicates across splits and labels)")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--seed", type=int, default=0)
    _add_split_args(p)

    p = sub.add_parser("train", help="train a classifier (resumable)")
    _add_train_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>_<model>[_<part>])")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    # several processes (torchrun) and runs described by files
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nproc", default=None, metavar="N|auto",
                   help="train on N processes (auto: one per visible GPU) by starting torchrun")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="with several processes, BatchNorm statistics over the global batch (default: yes)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a JSON file (a run's config.json); flags set away from their defaults "
                        "override it")
    p.add_argument("--manifest", default=None, metavar="DIR",
                   help="train on DIR/manifest.csv (another run folder's split) instead of loading --data; "
                        "a run folder's own manifest.csv still wins")

    p = sub.add_parser("cv", help="grouped k-fold cross-validation: a run per fold, out-of-fold report, the "
                                  "folds' ensemble (resumable)")
    _add_train_args(p)
    p.add_argument("--folds", type=int, default=5, help="k (default: %(default)s)")
    p.add_argument("--final", action="store_true",
                   help="then train one model on all train+valid images for the CV's number of epochs")
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>_<model>[_<part>]_cv)")
    p.add_argument("--resume", action="store_true", help="continue the CV in --out")

    p = sub.add_parser("evaluate", help="score a run: report_<split>.json, predictions and figures")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--split", default=None, choices=("valid", "test"),
                   help="one split (default: valid, then test)")
    p.add_argument("--data", default=None, choices=SOURCES, help="score an external dataset instead")
    p.add_argument("--root", default=None)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontally flipped image (default: as the run's recipe says)")

    p = sub.add_parser("explain", help="write a Grad-CAM overlay PNG per image")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++", "eigencam"))

    p = sub.add_parser("predict", help="print one JSON line per image: path, probability, label, threshold")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+")

    p = sub.add_parser("bench", help="input-path and model throughput, side by side")
    _add_data_args(p)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--recipe", nargs="?", const=DEFAULT_RECIPE, default=None, metavar="NAME",
                   help="instead: grouped CV AUROC of a training recipe (default: the default one) from scratch on the CPU, "
                        "5 folds, 128 px, 12 epochs, seed 0 (docs/recipe.md); use --data fracatlas --root DIR")
    p.add_argument("--quick", action="store_true", help="with --recipe: the ranking budget, 3 folds, 96 px, 8 epochs")
    p.add_argument("--out", default=None, help="with --recipe: the CV run folder (default runs/bench_recipe/...)")
    p.add_argument("--markdown", default=None, metavar="FILE.json",
                   help="measure nothing: print the README's performance table from a saved bench JSON")
    p.add_argument("--nproc", default=None, metavar="N|auto",
                   help="also time training on 1 and N processes (auto: one per GPU) and the scaling efficiency")

    from xrai.deploy.wheelhouse import KAGGLE_PLATFORM, KAGGLE_PYTHON

    p = sub.add_parser("wheelhouse", help="xrai's wheel + the wheels Kaggle lacks, for Internet-off notebooks")
    p.add_argument("--out", default="wheelhouse", help="folder to fill (default: %(default)s)")
    p.add_argument("--python-version", default=KAGGLE_PYTHON, help="the target's Python (default: %(default)s)")
    p.add_argument("--platform", default=KAGGLE_PLATFORM, help="the target's pip platform tag (default: %(default)s)")
    p.add_argument("--xrai-only", action="store_true", help="only xrai's own wheel (works offline)")

    p = sub.add_parser("export", help="the run's model (or CV ensemble) as ONNX or TorchScript, with a sidecar JSON")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"), dest="fmt")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default: %(default)s)")
    p.add_argument("--out", default=None, help="model file (default: RUN_DIR/model.onnx or model.torchscript.pt)")

    p = sub.add_parser("serve", help="the upload page and JSON API for a trained run (waitress)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run folder (PyTorch, with Grad-CAM)")
    what.add_argument("--onnx", help="an exported model.onnx (onnxruntime, no torch, no Grad-CAM)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--threads", type=int, default=None, help="request threads (default: 4, xrai.deploy.server.SERVER_THREADS)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch's intra-op threads, onnxruntime's with --onnx (default: the CPUs this process may use)")
    p.add_argument("--debug", action="store_true", help="Flask's development server instead (local debugging)")

    p = sub.add_parser("cache", help="list the decoded-image caches; --prune removes unused ones")
    p.add_argument("--dir", default=None, help="cache folder (default: $XRAI_HOME/cache)")
    p.add_argument("--prune", action="store_true", help="remove caches unused for --older-than days or over --max-gb")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="with --prune: remove caches not used for DAYS days (default: 30)")
    p.add_argument("--max-gb", type=float, default=None, help="with --prune: then keep at most this many GB")
    p.add_argument("--dry-run", action="store_true", help="with --prune: only list what would be removed")
    return parser


# ---- commands ---------------------------------------------------------------------------------


def cmd_download(args) -> int:
    from xrai.data import download

    print(download(args.name, force=args.force))
    return 0


def _load_manifest(data: str, root: str | None, seed: int = 0, *, val_fraction: float = TrainConfig.val_fraction,
                   test_fraction: float = TrainConfig.test_fraction):
    from xrai.data import load

    return load(data, root=root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


def _config_manifest(config: TrainConfig):
    """The split a config asks for: its data, root, seed and split fractions (train and cv both)."""
    return _load_manifest(config.data, config.root, config.seed, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction)


def _save_with_audit(manifest, out: Path) -> dict:
    """Write the manifest and its leakage audit (audit.csv) into `out`; the audit's summary counts."""
    from xrai.data import audit, audit_summary, save_manifest

    save_manifest(manifest, out)
    table = audit(manifest)
    atomic_write_csv(out / "audit.csv", table)
    return audit_summary(table)


def cmd_audit(args) -> int:
    out = Path(args.out)
    manifest = _load_manifest(args.data, args.root, args.seed, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction)
    summary = _save_with_audit(manifest, out)
    print(f"{len(manifest)} images; duplicate groups crossing splits: {summary['cross_split_groups']}, "
          f"crossing labels: {summary['cross_label_groups']}")
    print(f"wrote {out / 'manifest.csv'} and {out / 'audit.csv'}")
    return 0


def _train_config(args) -> TrainConfig:
    from xrai.recipe import RECIPE_FIELDS, RECIPES

    recipe = dict(RECIPES[args.recipe]) if args.recipe else {}
    recipe.update({name: getattr(args, name) for name in RECIPE_FIELDS if getattr(args, name) is not None})
    return TrainConfig(
        data=args.data, root=args.root, body_part=args.body_part, model=args.model, epochs=args.epochs,
        img_size=args.img_size, pretrained=args.pretrained, freeze=args.freeze, head=args.head,
        dropout=args.dropout, monitor=args.monitor, prune_sparsity=args.prune_sparsity,
        input_path=args.input_path, num_workers=args.num_workers, seed=args.seed, loggers=args.loggers,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, deterministic=args.deterministic, **recipe,
    )


def _run_config(args) -> TrainConfig:
    """The train flags' config; with --config, the file's, overridden by the flags set away from their defaults."""
    def from_flags(values) -> TrainConfig:
        return _train_config(values).replace(device=values.device, sync_bn=values.sync_bn)

    config = from_flags(args)
    if args.config is None:
        return config
    defaults = from_flags(build_parser().parse_args(["train"])).to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    return TrainConfig.from_json(Path(args.config)).replace(**changed)


def cmd_train(args) -> int:
    from xrai.data import read_manifest
    from xrai.train import distributed
    from xrai.train.launcher import launch, resolve_nproc
    from xrai.train.trainer import fit

    config = _run_config(args)
    part = "" if config.body_parts() is None else "_" + "-".join(config.body_parts())
    run_dir = Path(args.out or f"runs/{config.data}_{config.model}{part}")

    def manifest(_=None):
        if (run_dir / "manifest.csv").is_file():
            return read_manifest(run_dir)  # the run's own split, so a resume or a re-run sees the same rows
        if args.manifest is not None:
            return read_manifest(args.manifest)
        return _config_manifest(config)

    nproc = 1 if args.nproc is None else resolve_nproc(args.nproc, config.device)
    if nproc > 1:  # torchrun in a subprocess; this process draws the curves once it is done
        if distributed.world_size_from_env() > 1:
            raise ValueError("--nproc starts torchrun, but this process already runs under torchrun; drop --nproc")
        fresh = not (run_dir / "manifest.csv").is_file()  # else the workers read the run folder's own
        result = launch(config, run_dir, nproc=nproc, resume=args.resume, manifest=manifest() if fresh else None)
        writer = True
    else:
        ctx = distributed.init(config.device)  # torchrun's rank, or this process alone
        # Rank 0 first: it downloads or generates the data once and notes where the images are.
        result = fit(config, ctx.main_first(manifest), run_dir, resume=args.resume)
        writer = ctx.is_main
        distributed.teardown()
    if writer:
        _save_curves(run_dir)
        print(f"best {config.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}; run folder: {run_dir}")
    return 0


def cmd_cv(args) -> int:
    from xrai.data import read_manifest
    from xrai.train.cv import cross_validate

    config = _train_config(args)
    part = "" if config.body_parts() is None else "_" + "-".join(config.body_parts())
    run_dir = Path(args.out or f"runs/{config.data}_{config.model}{part}_cv")
    if args.resume and (run_dir / "manifest.csv").is_file():
        manifest = read_manifest(run_dir)  # the CV's own folds
    else:
        manifest = _config_manifest(config)
    result = cross_validate(config, manifest, run_dir, folds=args.folds, resume=args.resume, final=args.final)
    summary = result.summary
    auroc = summary["summary"]["image"]["auroc"]
    print(f"{args.folds}-fold CV AUROC {_fmt(auroc['mean'])} +- {_fmt(auroc['std'])} (std over folds; per fold "
          f"{', '.join(_fmt(v) for v in auroc['values'])}); out-of-fold AUROC {_fmt(summary['oof']['auroc'])} at "
          f"threshold {summary['oof']['threshold']:.3f}; {summary['epochs']['chosen']} epochs "
          f"({summary['epochs']['rule']})")
    print(f"run folder: {run_dir} (cv.json, report_oof.json, folds/); the folds' ensemble: "
          f"python -m xrai evaluate --run {run_dir} --split test")
    if result.final is not None:
        print(f"final model on every train+valid image: {run_dir / 'final'} "
              f"(python -m xrai evaluate --run {run_dir / 'final'} --split test)")
    return 0


def _save_curves(run_dir: Path) -> None:
    import pandas as pd

    from xrai import plots

    history = pd.read_csv(run_dir / "history.csv")
    plots.plot_history(history, run_dir / "curves.png")


def _evaluate(run_dir: Path, splits: list[str], *, tta: bool | None = None) -> dict[str, dict]:
    """Evaluate each split in turn; the explanation scores (tens of seconds on a CPU) on the last one."""
    from xrai import plots
    from xrai.evaluate.run import evaluate_run

    reports = {}
    for split in splits:
        explain = None if split == splits[-1] else 0  # None: the default sample
        reports[split] = evaluate_run(run_dir, split=split, tta=tta, explain_images=explain)
        plots.save_run_figures(run_dir, reports[split]["split"])  # a CV run's "valid" is its "oof"
    return reports


def _headline(report: dict) -> str:
    """One line per report: image figures at the image threshold, study figures at the study threshold;
    the MURA baseline only on MURA runs, with what it was measured on."""
    image = report["image"]
    parts = [f"{report['split']}: n={image['n']}", f"AUROC {_fmt(image.get('auroc'))} {_ci(image.get('auroc_ci'))}",
             f"kappa {_fmt(image.get('kappa'))} {_ci(image.get('kappa_ci'))}",
             f"sensitivity {_fmt(image.get('sensitivity'))}", f"specificity {_fmt(image.get('specificity'))}",
             f"at image threshold {report['threshold']:.3f}"]
    if report.get("study"):
        parts.append(f"study kappa {_fmt(report['study'].get('kappa'))} {_ci(report['study'].get('kappa_ci'))} "
                     f"at study threshold {report['study_threshold']:.3f}")
    line = ", ".join(parts) + f" (chosen on {report['threshold_from']})"
    if report.get("baseline"):
        line += (f"\n  MURA DenseNet-169 baseline study kappa {report['baseline']['study_kappa']['overall']:.3f}: "
                 f"{report['baseline']['caveat']}")
    return line


def _extras(report: dict) -> list[str]:
    """Calibration, the screening operating point and the explanation scores of a report, as lines."""
    from xrai.evaluate.report import calibration_words  # lazy: the CLI's start-up time

    lines = []
    cal = report.get("calibration")
    if cal:
        lines.append(f"  calibration: {calibration_words(cal)}; ECE ({cal['bins']} equal-width "
                     f"bins) {cal['ece']['uncalibrated']:.3f} uncalibrated -> {cal['ece']['calibrated']:.3f}")
    point = (report.get("operating_points") or {}).get("sensitivity")
    if point:
        lines.append(f"  screening point (sensitivity >= {point['target']:.2f} on valid): threshold "
                     f"{point['threshold']:.3f} -> sensitivity {_fmt(point['image']['sensitivity'])}, specificity "
                     f"{_fmt(point['image']['specificity'])}")
    block = report.get("explain")
    if block:
        for method, v in block["methods"].items():
            check = "passes" if v["randomisation"]["passes"] else "FAILS"
            point = v.get("pointing_game")
            lines.append(f"  {method}: ROAD {_fmt(v['road_combined']['mean'])}, randomisation check {check} "
                         f"(Spearman {_fmt(v['randomisation']['spearman_mean'])})"
                         + (f", pointing game {point['pointing_game']:.2f} (chance {point['chance']:.2f})"
                            if point else ""))
        lines.append(f"  (noise map ROAD {_fmt(block['noise_map']['road_combined']['mean'])}; "
                     f"{block['sample']['n_images']} images, seed {block['sample']['seed']})")
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def cmd_evaluate(args) -> int:
    run_dir = Path(args.run)
    if args.data:
        from xrai.evaluate.run import evaluate_external

        report = evaluate_external(run_dir, _load_manifest(args.data, args.root))
        print(_headline(report))
        print("\n".join(_extras(report)))
        print(f"wrote {run_dir / 'report_external.json'}")
        return 0
    from xrai.runs.layout import THRESHOLD_JSON, RunFolder

    # A final fit has no valid split (its threshold is its CV's out-of-fold one, given to it: the rule
    # evaluate_run refuses "valid" by); a CV run's "valid" is its out-of-fold report.
    final_fit = RunFolder(run_dir).operating_point_file.name == THRESHOLD_JSON
    splits = [args.split] if args.split else ["test"] if final_fit else ["valid", "test"]
    for report in _evaluate(run_dir, splits, tta=args.tta).values():
        print(_headline(report))
        print("\n".join(_extras(report)))
    print(f"reports and figures in {run_dir}; model card: {run_dir / 'model_card.md'}")
    return 0


def _explain_or_predict(run: str, images: list[str], out: str | None, method: str = "gradcam") -> int:
    from xrai.explain.cam import explain_paths
    from xrai.runs.load import load_run

    loaded = load_run(run)  # a threshold chosen with another checkpoint is chosen again first
    if loaded.point.source == "default":
        raise FileNotFoundError(f"no threshold for this checkpoint: {loaded.point.note}; run "
                                f"`python -m xrai evaluate --run {run} --split valid` first")
    threshold = loaded.threshold
    results = explain_paths(loaded.model, loaded.config, images, threshold=threshold, out_dir=out, method=method,
                            with_cam=out is not None, calibration=loaded.calibration)
    failures = 0
    for r in results:
        if r.get("error"):
            failures += 1
            print(json.dumps({"path": r["path"], "error": r["error"]}), flush=True)
            continue
        line = {"path": r["path"], "probability": round(float(r["probability"]), 6), "label": int(r["label"]),
                "threshold": threshold, "calibration": loaded.calibration.to_dict()}
        if r.get("overlay"):
            line["overlay"] = str(r["overlay"])
        print(json.dumps(line), flush=True)
    return 1 if failures == len(results) else 0


def cmd_predict(args) -> int:
    return _explain_or_predict(args.run, args.images, None)


def cmd_explain(args) -> int:
    return _explain_or_predict(args.run, args.images, args.out, args.method)


def cmd_bench(args) -> int:
    if args.recipe is not None:
        from xrai.recipe import bench_recipe

        bench_recipe(args.recipe, data=args.data, root=args.root, quick=args.quick, out=args.out,
                     json_path=args.json)
        return 0
    if args.markdown:
        from xrai.bench.report import (
            markdown_table,  # no torch: formatting a saved JSON
        )

        path = Path(args.markdown)
        if not path.is_file():
            raise FileNotFoundError(f"no bench JSON at {path}; write one with python -m xrai bench --json {path}")
        print(markdown_table(json.loads(path.read_text())))
        return 0
    from xrai.bench.run import run_bench

    nproc = None
    if args.nproc is not None:
        from xrai.train.launcher import resolve_nproc

        nproc = resolve_nproc(args.nproc, args.device)
        if nproc < 2:
            raise ValueError(f"--nproc {args.nproc} gives {nproc} process on this machine; the scaling bench compares "
                             "1 with N >= 2 (one per GPU), or pass --nproc 2 --device cpu to try it on CPU processes")
    run_bench(data=args.data, root=args.root, model=args.model, img_size=args.img_size, device=args.device,
              json_path=args.json, nproc=nproc)
    return 0


def cmd_serve(args) -> int:
    from xrai.deploy.server import serve

    for flag, value in (("--threads", args.threads), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    threads = {} if args.threads is None else {"threads": args.threads}
    serve(args.run, onnx=args.onnx, host=args.host, port=args.port, torch_threads=args.torch_threads,
          debug=args.debug, **threads)
    return 0


def cmd_export(args) -> int:
    from xrai.deploy.export import export_run

    result = export_run(args.run, fmt=args.fmt, which=args.which, out=args.out)
    serve = f"; serve it with `python -m xrai serve --onnx {result.path}`" if args.fmt == "onnx" else ""
    print(f"wrote {result.path} and {result.sidecar.name} (largest difference from PyTorch "
          f"{result.max_difference:.1e}){serve}")
    return 0


def cmd_cache(args) -> int:
    from xrai.data.cache import default_cache_dir
    from xrai.data.cachedir import DEFAULT_PRUNE_DAYS, list_caches, prune_caches

    root = Path(args.dir) if args.dir else default_cache_dir()
    if not args.prune:
        if args.older_than is not None or args.max_gb is not None or args.dry_run:
            raise ValueError("--older-than, --max-gb and --dry-run go with --prune")
        caches = list_caches(root)
        total = sum(c.bytes for c in caches) / 1e9
        print(f"{root}: {len(caches)} cache(s), {total:.2f} GB")
        for c in caches:
            print("  " + _cache_line(c))
        return 0
    days = DEFAULT_PRUNE_DAYS if args.older_than is None else args.older_than
    removed = prune_caches(root, older_than_days=days, max_gb=args.max_gb, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for c in removed:
        print(f"{verb} " + _cache_line(c))
    cap = f" or beyond {args.max_gb:g} GB" if args.max_gb is not None else ""
    print(f"{verb} {len(removed)} cache(s), {sum(c.bytes for c in removed) / 1e9:.2f} GB "
          f"(unused for more than {days:g} days{cap}, or from an older xrai)")
    return 0


def _cache_line(c) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used))
    what = f"{c.images:,} images at {c.size_px} px" if c.current else "stale (an older xrai's format)"
    return f"{c.path.name}  {c.bytes / 1e9:.2f} GB  {what}  last used {when} ({c.days_unused:.0f} days ago)"


def cmd_demo(args) -> int:
    """Data, audit, training, evaluation on valid and test, and the Grad-CAM gallery, on the synthetic set."""
    from xrai.data import load
    from xrai.evaluate.galleries import gallery
    from xrai.train.trainer import fit

    start = time.perf_counter()
    run_dir = Path(args.out)
    manifest = load("synthetic")
    summary = _save_with_audit(manifest, run_dir)
    print(f"data: {len(manifest)} synthetic images ({manifest.attrs.get('split_method', '')}); "
          f"duplicate groups crossing splits: {summary['cross_split_groups']}")
    config = TrainConfig(data="synthetic", model=args.model, pretrained=False, epochs=args.epochs)
    fit(config, manifest, run_dir, resume=(run_dir / "checkpoints" / "last.pt").is_file())
    _save_curves(run_dir)
    reports = _evaluate(run_dir, ["valid", "test"])
    pictures = gallery(run_dir, split="test")
    print()
    for report in reports.values():
        print(_headline(report))
        print("\n".join(_extras(report)))
    print(f"done in {time.perf_counter() - start:.0f} s")
    print(f"reports : {run_dir / 'report_valid.json'}, {run_dir / 'report_test.json'}")
    print(f"figures : {run_dir}/curves.png, confusion_matrix_test.png, roc_test.png, pr_test.png, "
          f"per_body_part_test.png, reliability_test.png")
    print(f"card    : {run_dir / 'model_card.md'}")
    galleries = sum(1 for key in pictures if key in ("tp", "fp", "fn"))
    print(f"Grad-CAM: {run_dir / 'gradcam'} ({galleries} galleries, {len(pictures) - galleries} single overlays)")
    print(f"next    : python -m xrai serve --run {run_dir}")
    return 0


def cmd_wheelhouse(args) -> int:
    from xrai.deploy.wheelhouse import build_wheelhouse

    # pip's own failure (no network, no wheel for the platform) is a WheelhouseError: main() makes it one line.
    wheels = build_wheelhouse(args.out, python_version=args.python_version, platform=args.platform,
                              xrai_only=args.xrai_only)
    print(f"wrote {len(wheels)} wheels to {args.out}: {', '.join(w.name for w in wheels)}")
    print("next: upload the folder as a Kaggle dataset and attach it to each notebook (README: Kaggle, Internet off)")
    return 0


COMMANDS = {
    "demo": cmd_demo, "download": cmd_download, "audit": cmd_audit, "train": cmd_train, "cv": cmd_cv,
    "evaluate": cmd_evaluate, "explain": cmd_explain, "predict": cmd_predict, "bench": cmd_bench,
    "export": cmd_export, "serve": cmd_serve, "cache": cmd_cache, "wheelhouse": cmd_wheelhouse,
}


def _rank_tag() -> str:
    """" [rank R]" under torchrun with several processes (their errors share one console), else ""."""
    return f" [rank {os.environ.get('RANK', '?')}]" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # xrai's own progress at INFO; other libraries only from WARNING up (onnx's exporter alone logs
    # ~70 INFO lines per export), everything with -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("xrai").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"xrai {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.verbose or not is_user_error(error):
            raise  # -v, or a bug: the traceback, exit code 1
        # A user's mistake (a taken run folder, a torn checkpoint, no network, a bad option) reads as one line.
        print(f"xrai {args.command}{_rank_tag()}: {one_line(error)} (-v shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
