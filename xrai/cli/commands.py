"""Command line: python -m xrai {demo,download,audit,train,cv,evaluate,explain,predict,bench,export,serve,cache,wheelhouse}.

This module builds the parser (one small function per command) and dispatches: each command's code lives in a
module of this package grouped by stage (``data_cmds``, ``train_cmds``, ``evaluate_cmds``, ``explain_cmds``,
``bench_cmds``, ``export_cmds``, ``deploy_cmds``, ``demo_cmds``), imported with ``importlib`` only when that
command runs, so ``python -m xrai --help`` (and ``serve --onnx``) import no torch.

A failure the user can fix (``xrai.errors.is_user_error``) prints one line and exits 2; -v shows the
traceback. Anything else is a bug: a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xrai.config import KEEPS, OPTIMIZERS, RESIZES, SCHEDULERS, TrainConfig
from xrai.deploy.wheelhouse import DEFAULT_WEIGHTS, KAGGLE_PLATFORM, KAGGLE_PYTHON
from xrai.errors import is_user_error, one_line
from xrai.labels import SOURCES
from xrai.recipe import DEFAULT_RECIPE, PRETRAINED_RECIPE, RECIPE_FIELDS, RECIPES, default_recipe
from xrai.runs.layout import AUDIT_CSV, CHECKPOINTS_DIR, CONFIG_JSON, MANIFEST_CSV

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


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
    _add_data_args(p)
    p.add_argument("--body-part", default="all", help="all, one MURA part (wrist) or several (wrist,hand)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--img-size", type=int, default=None, help="crop side (default 224; 128 on synthetic)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (default: yes)")
    p.add_argument("--freeze", action="store_true", default=None, help="train the head alone (frozen backbone)")
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
    g.add_argument("--recipe", default=None, choices=tuple(RECIPES), help=f"a named recipe (default: {PRETRAINED_RECIPE} with ImageNet weights, "
                   f"{DEFAULT_RECIPE} from scratch; v1: the old one)")
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
    g.add_argument("--freeze-epochs", type=int, default=None,
                   help="the backbone frozen for the first N epochs (the head warms up alone), then trained")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay: each earlier backbone stage's lr is this times the next's (1: off)")
    g.add_argument("--keep", default=None, choices=KEEPS, help="hand on the best validated or the last epoch")
    g.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without gain (0: off)")


# ---- one parser per command ------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic set (CPU, ~2 min)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="mobilenet_v2")


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch a dataset with kagglehub (or find it attached in Kaggle)")
    p.add_argument("name", choices=("mura", "fracatlas", "multiregion", "bonefracture"))
    p.add_argument("--force", action="store_true", help="download again even if cached")


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help=f"write {MANIFEST_CSV} and {AUDIT_CSV} (duplicates across splits and labels)")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--seed", type=int, default=0)
    _add_split_args(p)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a classifier (resumable)")
    _add_train_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>_<model>[_<part>])")
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from {CHECKPOINTS_DIR}/last.pt")
    # several processes (torchrun) and runs described by files
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nproc", default=None, metavar="N|auto",
                   help="train on N processes (auto: one per visible GPU) by starting torchrun")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="with several processes, BatchNorm statistics over the global batch (default: yes)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"settings from a JSON file (a run's {CONFIG_JSON}); flags set away from their defaults "
                        "override it")
    p.add_argument("--manifest", default=None, metavar="DIR",
                   help=f"train on DIR/{MANIFEST_CSV} (another run folder's split) instead of loading --data; "
                        f"a run folder's own {MANIFEST_CSV} still wins")


def _add_cv(sub) -> None:
    p = sub.add_parser("cv", help="grouped k-fold cross-validation: a run per fold, out-of-fold report, the "
                                  "folds' ensemble (resumable)")
    _add_train_args(p)
    p.add_argument("--folds", type=int, default=5, help="k (default: %(default)s)")
    p.add_argument("--final", action="store_true",
                   help="then train one model on all train+valid images for the CV's number of epochs")
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>_<model>[_<part>]_cv)")
    p.add_argument("--resume", action="store_true", help="continue the CV in --out")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run: report_<split>.json, predictions and figures")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--split", default=None, choices=("valid", "test"),
                   help="one split (default: valid, then test)")
    p.add_argument("--data", default=None, choices=SOURCES, help="score an external dataset instead")
    p.add_argument("--root", default=None)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the horizontally flipped image (default: as the run's recipe says)")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="write a Grad-CAM overlay PNG per image")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++", "eigencam"))


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="print one JSON line per image: path, probability, label, threshold")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+")


def _add_bench(sub) -> None:
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


def _add_wheelhouse(sub) -> None:
    p = sub.add_parser("wheelhouse", help="xrai's wheel + the wheels Kaggle lacks, for Internet-off notebooks")
    p.add_argument("--out", default="wheelhouse", help="folder to fill (default: %(default)s)")
    p.add_argument("--python-version", default=KAGGLE_PYTHON, help="the target's Python (default: %(default)s)")
    p.add_argument("--platform", default=KAGGLE_PLATFORM, help="the target's pip platform tag (default: %(default)s)")
    p.add_argument("--xrai-only", action="store_true", help="only xrai's own wheel (works offline)")
    p.add_argument("--weights", nargs="?", const=",".join(DEFAULT_WEIGHTS), default=None, metavar="MODEL,...",
                   help="also the models' ImageNet weights files, under weights/ with a SHA256SUMS, for PRETRAINED = "
                        "True offline (without a list: %(const)s)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="the run's model (or CV ensemble) as ONNX or TorchScript, with a sidecar JSON")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"), dest="fmt")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default: %(default)s)")
    p.add_argument("--out", default=None, help="model file (default: RUN_DIR/model.onnx or model.torchscript.pt)")


def _add_serve(sub) -> None:
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


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="list the decoded-image caches; --prune removes unused ones")
    p.add_argument("--dir", default=None, help="cache folder (default: $XRAI_HOME/cache)")
    p.add_argument("--prune", action="store_true", help="remove caches unused for --older-than days or over --max-gb")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="with --prune: remove caches not used for DAYS days (default: 30)")
    p.add_argument("--max-gb", type=float, default=None, help="with --prune: then keep at most this many GB")
    p.add_argument("--dry-run", action="store_true", help="with --prune: only list what would be removed")


# The subcommands in --help's order.
_PARSERS: tuple[Callable, ...] = (_add_demo, _add_download, _add_audit, _add_train, _add_cv, _add_evaluate,
                                  _add_explain, _add_predict, _add_bench, _add_wheelhouse, _add_export, _add_serve,
                                  _add_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xrai",
        description="Train, evaluate and explain musculoskeletal X-ray classifiers (MURA, FracAtlas).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


# ---- from flags to a TrainConfig (train and cv) ---------------------------------------------------------


def _train_config(args) -> TrainConfig:
    recipe = dict(RECIPES[args.recipe or default_recipe(args.pretrained)])
    recipe.update({name: getattr(args, name) for name in RECIPE_FIELDS if getattr(args, name) is not None})
    return TrainConfig(
        data=args.data, root=args.root, body_part=args.body_part, model=args.model, epochs=args.epochs,
        img_size=args.img_size, pretrained=args.pretrained, head=args.head,
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


# ---- dispatch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command's handler, ``xrai.cli.<module>.<function>(args) -> exit code``, imported when it runs."""

    module: str
    function: str

    def resolve(self) -> Callable:
        return getattr(importlib.import_module(f"xrai.cli.{self.module}"), self.function)

    def __call__(self, args) -> int:
        return self.resolve()(args)


COMMANDS = {
    "demo": Command("demo_cmds", "cmd_demo"), "download": Command("data_cmds", "cmd_download"),
    "audit": Command("data_cmds", "cmd_audit"), "train": Command("train_cmds", "cmd_train"),
    "cv": Command("train_cmds", "cmd_cv"), "evaluate": Command("evaluate_cmds", "cmd_evaluate"),
    "explain": Command("explain_cmds", "cmd_explain"), "predict": Command("explain_cmds", "cmd_predict"),
    "bench": Command("bench_cmds", "cmd_bench"), "export": Command("export_cmds", "cmd_export"),
    "serve": Command("deploy_cmds", "cmd_serve"), "cache": Command("data_cmds", "cmd_cache"),
    "wheelhouse": Command("deploy_cmds", "cmd_wheelhouse"),
}


def __getattr__(name: str):
    """The handlers by their old names (``xrai.cli.commands.cmd_train``), imported on first use."""
    for command in COMMANDS.values():
        if command.function == name:
            return command.resolve()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rank_tag() -> str:
    """" [rank R]" under torchrun with several processes (their errors share one console), else ""."""
    return f" [rank {os.environ.get('RANK', '?')}]" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # xrai's own progress at INFO; other libraries only from WARNING up (onnx's exporter alone logs
    # ~70 INFO lines per export), everything with -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("xrai").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    shown = warnings.formatwarning
    if not args.verbose:  # a warning is one line, without the package's source line under it (-v: Python's own)
        warnings.formatwarning = functools.partial(_one_line_warning, args.command)
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
    finally:
        warnings.formatwarning = shown


def _one_line_warning(command: str, message, category, filename, lineno, line=None) -> str:
    return f"xrai {command}: warning: {' '.join(str(message).split())}\n"


if __name__ == "__main__":
    sys.exit(main())
