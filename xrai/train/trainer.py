"""fit(): train a classifier on a manifest: AMP, schedulers, early stopping, atomic checkpoints, exact resume.

The shape follows torchvision's references/classification/train.py: `train_one_epoch`, `validate`
(its `evaluate`; renamed so it never shadows the `xrai.evaluate.run` module) and `fit` on top, whose
body reads like the reference's `main`: set up (`_set_up`: model, data, optimiser, scheduler), restore
(`_restore`: a resume), then the epoch loop (`_train`: `_train_and_validate`, `_record`, `_save`).
Learning-rate schedules: "cosine" steps per optimizer step (a linear warm-up over `warmup_epochs`,
then a half cosine down towards 0 at the last step: smooth even for 3-epoch runs); "onecycle" too
(torch's OneCycleLR, peak `lr`; its length is fixed, so a resume may not raise `epochs`);
"step" (x step_gamma every step_size epochs), "exponential" (x exp_gamma per epoch) and "plateau"
(ReduceLROnPlateau on the monitored metric, factor 0.1, patience max(1, patience // 2)) step once per
epoch; raising `epochs` on resume stretches the cosine from there on. Early stopping: `patience`
epochs without improvement of the monitor (0 turns it off). `max_batches` caps training and
validation batches per epoch (smoke runs). best.pt holds the weights the run hands on (the best
epoch's, or with keep="last" the last epoch's; the EMA's when ema_decay > 0), config and history, not
the optimizer state (last.pt is the one to resume from). With no valid rows (a final fit: keep="last",
patience 0) nothing is validated and the val_* columns are NaN.

Exact resume: every random draw is either restored from the checkpoint (python, numpy, torch, CUDA
RNGs, which dropout uses) or derived from (seed, epoch) by the batch sources, so a run killed during
epoch k and resumed from checkpoints/last.pt (end of epoch k-1) replays epoch k bit for bit on a CPU;
on a GPU only with config.deterministic (cuDNN autotuning picks kernels by timing otherwise).

Several processes: under torchrun (`torchrun --nproc_per_node N -m xrai train ...`, or `launch`) fit()
trains one model with DistributedDataParallel, each rank on its shard of every global batch of
batch_size; rank 0 alone writes. xrai.train.distributed holds the machinery; with one process it is inert.
Checkpoints hold every rank's RNG state, so the same world size resumes bit for bit too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from xrai.config import TrainConfig
from xrai.data import filter_body_parts, require_columns, save_manifest
from xrai.data.augment import augment_options
from xrai.data.batches import BadImageWarning, per_rank_batch
from xrai.data.cache import build_cache, cache_fits, find_cache
from xrai.data.dataset import ClassicBatches
from xrai.data.decode.images import DamagedImages
from xrai.data.loader import CachedBatches
from xrai.env import autocast_dtype, backend_settings, get_device, seed_everything
from xrai.errors import UserError, disk_full_cause, outside_package_stacklevel
from xrai.fileio import (
    TMP_PREFIX,
    TMP_SUFFIX,
    LockHeldError,
    atomic_write_csv,
    held_lock,
    require_free_space,
    tensor_bytes,
)
from xrai.labels import DEFAULT_THRESHOLD
from xrai.models.checkpoint import (
    atomic_save,
    load_checkpoint,
    resume_state,
    rng_state,
    set_rng_state,
    to_cpu,
)
from xrai.models.factory import create_model
from xrai.models.logits import flip_tta_logits
from xrai.models.pruning import prune_synflow, restore_pruning
from xrai.models.registry import model_spec
from xrai.models.weights import weights_record
from xrai.runs.layout import RunFolder
from xrai.train import distributed
from xrai.train.regularise import build_criterion, make_ema
from xrai.train.tracking import open_trackers

__all__ = [
    "HISTORY_COLUMNS", "FitResult", "TrainingDivergedError", "build_optimizer", "build_scheduler",
    "fit", "load_result", "make_sources", "param_groups", "pos_weight_from_labels", "train_one_epoch", "validate",
]

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auroc", "val_accuracy", "lr", "seconds", "images_per_s",
                   "world_size"]
FIT_COLUMNS = ("path", "label", "body_part", "split")  # the manifest columns fit() reads
BEST_KEYS = ("model", "epoch", "best_metric", "best_epoch", "monitor", "history", "config", "model_name",
             "pretrained_weights")
STEPWISE_SCHEDULERS = ("cosine", "onecycle")  # stepped after every optimizer step, the others once per epoch
NO_VALIDATION = {"val_loss": math.nan, "val_auroc": math.nan, "val_accuracy": math.nan}


class TrainingDivergedError(UserError, RuntimeError):
    """The loss (or a weight) became NaN or infinite; the last good checkpoint was left as it was."""


class RunFolderBusyError(UserError, RuntimeError):
    """Another process is training into the run folder (it holds the folder's lock)."""


CHECKPOINT_SLACK_BYTES = 1_000_000  # pickle framing, history and config on top of the tensors


@dataclass(kw_only=True)
class FitResult:
    """What fit() returns; everything is also in the run folder."""

    run_dir: Path
    best_epoch: int
    best_metric: float
    history: pd.DataFrame
    stopped_early: bool


# ---- building blocks ----------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default), Adam or SGD (momentum, Nesterov when momentum > 0) over the trainable parameters,
    in the groups of ``param_groups`` (the head's first)."""
    groups = param_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0, weight_decay=config.weight_decay
    )


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the head (and anything outside the backbone) at ``config.lr``, then
    the backbone's stages from the last to the first, stage k from the top at ``lr * layer_decay**k``
    (layer-wise rate decay: the early, generic features move least). One group per stage, each marked
    ``"backbone": True``, so the schedule can hold the backbone still (``freeze_epochs``). With
    ``freeze`` the frozen backbone's parameters are left out."""
    net = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
    backbone = getattr(net, "backbone", None)
    if backbone is None or (config.layer_decay >= 1 and not config.freeze_epochs):  # one group, as before both
        return [{"params": [p for p in net.parameters() if p.requires_grad], "backbone": False}]
    in_backbone = {id(p) for p in backbone.parameters()}
    groups = [{"params": [p for p in net.parameters() if p.requires_grad and id(p) not in in_backbone],
               "backbone": False}]
    stages = _backbone_stages(backbone)
    for depth, stage in enumerate(reversed(stages), start=1):
        params = [p for p in stage.parameters() if p.requires_grad]
        if params:
            scale = config.layer_decay ** depth if config.layer_decay < 1 else 1.0
            groups.append({"params": params, "lr": config.lr * scale, "backbone": True})
    return groups


def _backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages from input to output: the children of its ``features`` (torchvision's
    MobileNets, EfficientNets, DenseNet; xrai's Lite0) and then its other children that hold parameters
    (MobileNetV3's kept projection), or its own children in order (ResNet: conv1, bn1, layer1-4)."""
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential):
        rest = [m for name, m in backbone.named_children() if name != "features" and any(True for _ in m.parameters())]
        return [*features.children(), *rest]
    return [m for m in backbone.children() if any(True for _ in m.parameters())]


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int,
                    monitor: str | None = None) -> Any:
    """The learning-rate scheduler for config.scheduler, or None for "none" (see the module docstring)."""
    sched = torch.optim.lr_scheduler
    if config.scheduler == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(max(0, config.warmup_epochs * steps_per_epoch), total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        frozen = min(config.freeze_epochs * steps_per_epoch, total)

        def backbone_factor(step: int) -> float:
            # held at 0 while frozen (the head warms up alone), then its own warm-up into the same cosine
            if step < frozen:
                return 0.0
            return min(1.0, (step - frozen + 1) / max(1, warmup)) * factor(max(step, warmup))

        if not frozen:
            return sched.LambdaLR(optimizer, factor)
        return sched.LambdaLR(optimizer, [backbone_factor if g.get("backbone") else factor
                                          for g in optimizer.param_groups])
    if config.scheduler == "onecycle":  # torch's defaults: 30% warm-up from lr/25, cosine down to lr/25e4
        return sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                total_steps=max(1, config.epochs * steps_per_epoch))
    if config.scheduler == "step":
        return sched.StepLR(optimizer, step_size=config.step_size, gamma=config.step_gamma)
    if config.scheduler == "exponential":
        return sched.ExponentialLR(optimizer, gamma=config.exp_gamma)
    if config.scheduler == "plateau":
        mode = "min" if (monitor or config.monitor) == "loss" else "max"
        return sched.ReduceLROnPlateau(optimizer, mode=mode, factor=0.1, patience=max(1, config.patience // 2))
    return None


def pos_weight_from_labels(labels) -> float:
    """n_negative / n_positive: BCEWithLogitsLoss's pos_weight, so both classes weigh the same in the loss."""
    labels = np.asarray(labels)
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"pos_weight needs both labels in the training set, got {n_neg} normal and {n_pos} abnormal")
    return n_neg / n_pos


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_one_epoch(model, source, criterion, optimizer, scaler, *, epoch: int, device: torch.device,
                    amp_dtype: torch.dtype | None, step_scheduler=None, ema=None,
                    progress: bool = True) -> dict[str, float]:
    """One pass over `source.epoch(epoch)`. Returns train_loss, lr (of the last step), images, seconds.

    Raises:
        TrainingDivergedError: the loss became NaN or infinite.
    """
    model.train()
    # Reading the loss back syncs the GPU; on CUDA do it every 10 steps so the host can run ahead.
    check_every = 1 if device.type == "cpu" else 10
    loss_sum, seen, lr = torch.zeros((), device=device), 0, optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(total=len(source), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    try:
        for step, (x, y) in enumerate(source.epoch(epoch), 1):
            with _autocast(device, amp_dtype):
                logits = model(x).reshape(-1)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            if step_scheduler is not None:
                step_scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            bar.update(1)
            if step % check_every == 0 or step == len(source):
                total = loss_sum.item()
                if not math.isfinite(total):
                    raise TrainingDivergedError(f"the training loss became {total} at epoch {epoch}, step {step} "
                                                f"(lr {lr:.3g})")
                bar.set_postfix(loss=f"{total / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    finally:
        bar.close()
    total = loss_sum.item()
    if not math.isfinite(total):
        raise TrainingDivergedError(f"the training loss became {total} at epoch {epoch} (lr {lr:.3g})")
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(1, seen), "lr": lr, "images": seen, "seconds": seconds}


def validate(model, source, criterion, *, device: torch.device, amp_dtype: torch.dtype | None,
             tta: bool = False, progress: bool = True, gather=None) -> dict[str, float]:
    """Loss, AUROC (NaN with one class) and accuracy at DEFAULT_THRESHOLD (0.5) over every batch of an eval source.

    With ``tta`` each image is also scored flipped left-right and the two probabilities are averaged
    (``xrai.runs.load.flip_tta_logits``, as predict does); the loss is taken on the logit of that mean.
    gather: with several processes, a function (logits, labels) -> (logits, labels) of the whole split
    (`xrai.train.distributed.Distributed.gather_rows`), so the figures are those of one process.
    """
    model.eval()
    logits, labels = [torch.zeros(0, device=device)], [torch.zeros(0, device=device)]
    with torch.inference_mode():
        for x, y in tqdm(source.epoch(0), total=len(source), desc="validating", unit="batch", leave=False,
                         disable=not progress):
            with _autocast(device, amp_dtype):
                logit = flip_tta_logits(lambda v: model(v).reshape(-1), x) if tta else model(x).reshape(-1)
            logits.append(logit.float())
            labels.append(y)
    logit, label = torch.cat(logits), torch.cat(labels)
    if gather is not None:
        logit, label = gather(logit, label)
    loss = criterion(logit, label).item()
    prob, label = torch.sigmoid(logit).cpu().numpy(), label.cpu().numpy()
    auroc = float(roc_auc_score(label, prob)) if len(np.unique(label)) == 2 else float("nan")
    accuracy = float(np.mean((prob >= DEFAULT_THRESHOLD) == (label >= 0.5)))
    return {"val_loss": loss, "val_auroc": auroc, "val_accuracy": accuracy}


def make_sources(config: TrainConfig, train_rows: pd.DataFrame, valid_rows: pd.DataFrame, *,
                 device: torch.device, progress: bool = True, manifest: pd.DataFrame | None = None,
                 rank: int = 0, world_size: int = 1, damaged: DamagedImages | None = None) -> tuple[Any, Any, str]:
    """(train source, valid source, "cached" | "classic") for config.input_path ("auto": cached when it fits).

    The valid source is None when there are no valid rows (a final fit on all the training data).

    The cache is built over the whole `manifest` when given (every split and body part), so the next run
    on another body part, or the evaluation, reuses it instead of decoding again; over train and valid
    alone when only that fits the disk. A cache that already exists needs no space and is always used.
    With world_size > 1 the sources serve rank `rank`'s shard of every global batch (xrai.data.batches).
    With `damaged`, the truncated and unreadable train and valid images are counted into it for the run's
    one line, and neither the cache build nor the sources say their own.
    """
    path = config.input_path
    cache = None
    if path in ("auto", "cached"):
        size = config.resize_size
        train_and_valid = pd.concat([train_rows, valid_rows])
        cache = find_cache(train_and_valid, size=size, resize=config.resize)  # its own, or a superset's
        if cache is None:
            choices = [train_and_valid]
            if manifest is not None and len(manifest) > len(train_and_valid):
                choices.insert(0, manifest)
            rows = next((rows for rows in choices if cache_fits(len(rows), size)), None)
            if rows is not None or path == "cached":  # asked for explicitly: build_cache says why it does not fit
                cache = build_cache(choices[-1] if rows is None else rows, size=size, progress=progress,
                                    resize=config.resize,
                                    damaged=None if damaged is None else DamagedImages())  # the run counts its own
        if cache is not None and damaged is not None:
            cache.count_damaged(train_and_valid["path"].astype(str), damaged)
        path = "classic" if cache is None else "cached"
    with warnings.catch_warnings():
        if damaged is not None:  # the unreadable images are in the run's one line (and its damaged_images.csv)
            warnings.simplefilter("ignore", BadImageWarning)
        sources = _sources(path, cache, config, train_rows, valid_rows, device=device, progress=progress, rank=rank,
                           world_size=world_size, damaged=damaged)
    if damaged is not None:
        for source in sources[:2]:
            _count_dropped(source, damaged)
    return sources


def _sources(path: str, cache: Any, config: TrainConfig, train_rows: pd.DataFrame, valid_rows: pd.DataFrame, *,
             device: torch.device, progress: bool, rank: int, world_size: int,
             damaged: DamagedImages | None) -> tuple[Any, Any, str]:
    """make_sources's sources once the input path is chosen (and the cache found or built)."""
    common = dict(image_size=config.image_size, batch_size=config.batch_size, seed=config.seed, device=device,
                  channels_last=config.channels_last, max_batches=config.max_batches, rank=rank,
                  world_size=world_size,
                  augment=augment_options(crop_scale=config.crop_scale, aug_strength=config.aug_strength,
                                         model=config.model))
    if path == "cached":
        return (CachedBatches(cache, train_rows, train=True, **common),
                CachedBatches(cache, valid_rows, train=False, **common) if len(valid_rows) else None, path)
    classic = dict(resize_size=config.resize_size, num_workers=config.num_workers, progress=progress,
                   resize=config.resize, damaged=damaged, **common)
    return (ClassicBatches(train_rows, train=True, **classic),
            ClassicBatches(valid_rows, train=False, **classic) if len(valid_rows) else None, path)


def _count_dropped(source: Any, damaged: DamagedImages) -> None:
    """Count the files a source left out that are not counted yet (a cache row missing, say) as unreadable."""
    if source is None:
        return
    counted = {path for path, _, _ in damaged.entries()}
    for path, reason in zip(source.bad["path"], source.bad["reason"]):
        if path not in counted:
            damaged.add(path, "unreadable", reason)


def _say_damaged(damaged: DamagedImages, folder: RunFolder) -> list[Path]:
    """The run's ONE line about its truncated and unreadable images, listed in its damaged_images.csv,
    said at the first line outside the package that led here (a notebook cell, a script): no source line
    of the package under it. Returns the list's path when this made it (for ``_undo_start``), else []."""
    new = not folder.damaged_csv.exists()
    if line := damaged.summary(folder.damaged_csv):
        warnings.warn(line, UserWarning, stacklevel=outside_package_stacklevel())
    return [folder.damaged_csv] if new and folder.damaged_csv.exists() else []


# ---- fit -----------------------------------------------------------------------------------------


def fit(config: TrainConfig, manifest: pd.DataFrame, run_dir: str | os.PathLike, *, resume: bool = False,
        progress: bool = True) -> FitResult:
    """Train `config.model` on the manifest's train split, validating on "valid" each epoch.

    Writes RUN_DIR/config.json (with input_path resolved to the path used), manifest.csv (when absent),
    history.csv, checkpoints/last.pt (every epoch) and checkpoints/best.pt (when the monitor improves),
    all atomically, and nothing at all until the config, the data (columns, both labels in train, a valid
    split) and the model have been checked.
    Runs under `env.backend_settings` (config.deterministic), which puts the global settings back after.

    Args:
        config: the run's settings.
        manifest: the manifest (all splits; filtered here by config.body_parts()).
        run_dir: the run folder (may be on a mounted Google Drive).
        resume: continue from checkpoints/last.pt (a finished run just returns; none there: start anew).
        progress: show tqdm bars and a line per epoch (logging at INFO otherwise).
    Raises:
        FileExistsError: run_dir already holds a run and resume is False.
        ValueError: resuming with a different config (the differing fields are named; input_path "auto"
            resumes on the path the run recorded, another explicit path is refused), or a split
            without both labels; ManifestError (a ValueError): a column fit() reads is missing.
        TrainingDivergedError: NaN or infinite loss; checkpoints/last.pt keeps the last good epoch.

    Under torchrun every process calls fit() alike (see the module docstring); config.batch_size is the
    global batch and must be a multiple of the number of processes (ValueError otherwise).
    """
    with backend_settings(get_device(config.device), deterministic=config.deterministic):
        return _fit(config, manifest, run_dir, resume=resume, progress=progress)


@dataclass(kw_only=True)
class _Run:
    """What fit() set up, handed to every step of its epoch loop."""

    config: TrainConfig
    ctx: distributed.Distributed
    folder: RunFolder
    model: nn.Module  # what trains: DistributedDataParallel with several processes
    net: nn.Module  # the model itself: checkpoints and validation
    train_src: Any
    valid_src: Any  # None in a final fit (no valid rows)
    gather: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    criterion: nn.Module
    val_criterion: nn.Module
    ema: Any
    monitor: str
    say: Any
    progress: bool
    written: list[Path] = field(default_factory=list)  # files a fresh run created before its first epoch
    # the ImageNet weights file the run started from ({weights, file, sha256}; None from scratch): in every checkpoint
    pretrained_weights: dict[str, str] | None = None


@dataclass(kw_only=True)
class _Book:
    """Where the run stands after each epoch: what a checkpoint records and a resume restores."""

    done: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    bad: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False


def _fit(config: TrainConfig, manifest: pd.DataFrame, run_dir: str | os.PathLike, *, resume: bool,
         progress: bool) -> FitResult:
    """fit()'s body, under the backend settings of config.deterministic: set up, restore, train, save."""
    folder = RunFolder(run_dir)
    ctx = distributed.init(config.device)  # torchrun's ranks, or this process alone (world size 1)
    with contextlib.ExitStack() as held:
        # Rank 0 holds the folder's lock for the whole run (a second `train` into it fails at once); a
        # refusal reaches the other ranks through main_first, so none of them waits for rank 0 forever.
        ctx.main_first(lambda _: held.enter_context(_run_folder_lock(folder)) if ctx.is_main else None)
        return _fit_locked(config, folder, ctx, manifest, resume=resume, progress=progress)


@contextlib.contextmanager
def _run_folder_lock(folder: RunFolder):
    """Hold ``folder``'s TRAIN_LOCK; a folder this made and the run left empty is removed again."""
    existed = folder.path.exists()
    try:
        with held_lock(folder.train_lock):
            yield
    except LockHeldError as error:
        busy = error.path.parent
        who = "another process" if error.holder == "?" else f"process {error.holder}"
        raise RunFolderBusyError(f"{busy} is being trained into by {who} (it holds {error.path.name}); wait for it "
                                 "to finish or choose another --out") from None
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                folder.path.rmdir()  # only when empty: a failed start leaves no folder behind


def _fit_locked(config: TrainConfig, folder: RunFolder, ctx: distributed.Distributed, manifest: pd.DataFrame, *,
                resume: bool, progress: bool) -> FitResult:
    """_fit's body, the run folder locked."""
    config = config.replace(world_size=ctx.world_size)
    per_rank_batch(config.batch_size, ctx.world_size)  # the global batch must split evenly
    state = resume_state(config.to_dict(), folder.checkpoint("last"), resume=resume)
    if state is not None and (state["epoch"] >= config.epochs or state["stopped_early"]):
        return _result(folder.path, state)
    config = _resumed_config(config, state, ctx, folder.path)
    progress = progress and ctx.is_main  # rank 0 alone shows progress
    say = (tqdm.write if progress else logger.info) if ctx.is_main else logger.debug
    run = _set_up(config, manifest, folder, ctx, state, say, progress)
    trackers = open_trackers(run.config.loggers, run.config.to_dict(), folder.path, experiment=run.config.experiment,
                             resume=state is not None) if ctx.is_main else []
    book = _restore(run, state)
    try:
        _train(run, book, trackers)
    except BaseException as error:
        if state is None and disk_full_cause(error) is not None and not folder.checkpoint("last").is_file():
            _undo_start(folder, run.written)  # no epoch was saved: leave --out as it was before this run
        raise
    return FitResult(run_dir=folder.path, best_epoch=book.best_epoch, best_metric=float(book.best),
                     history=pd.DataFrame(book.history, columns=HISTORY_COLUMNS), stopped_early=book.stop)


def _resumed_config(config: TrainConfig, state: dict[str, Any] | None, ctx: distributed.Distributed,
                    run_dir: Path) -> TrainConfig:
    """A resume keeps the input path it trained with ("auto"); warn when the world size changed."""
    if state is None:
        return config
    if config.input_path == "auto":
        config = config.replace(input_path=state["config"].get("input_path", "auto"))
    if ctx.is_main and state["config"].get("world_size", 1) != ctx.world_size:
        warnings.warn(f"resuming {run_dir} (trained by {state['config'].get('world_size', 1)} processes) with "
                      f"{ctx.world_size}: the data order changes from epoch {state['epoch'] + 1} on, so the run will "
                      "not repeat an uninterrupted one bit for bit", stacklevel=4)
    return config


def _set_up(config: TrainConfig, manifest: pd.DataFrame, folder: RunFolder, ctx: distributed.Distributed,
            state: dict[str, Any] | None, say, progress: bool) -> _Run:
    """Model, data, optimiser, scheduler, loss and EMA (torchvision's set-up), the run folder prepared."""
    # Config, data and model are checked before anything is written to run_dir: a failed start
    # (a bad model name, a split with one label, no network for pretrained weights) leaves it as it was.
    require_columns(manifest.columns, where="the manifest passed to fit()", needed=FIT_COLUMNS)
    if state is None:
        seed_everything(config.seed)
    train_rows, valid_rows = _split_rows(manifest, config)
    monitor = state["monitor"] if state is not None else _monitor(config, valid_rows)
    # Rank 0 first (pretrained weights fetched once, the image cache built once); the others reuse them
    # and take the input path rank 0 resolved.
    damaged = DamagedImages()  # the run's truncated and unreadable images: one line, in its damaged_images.csv
    model, (train_src, valid_src, input_path) = ctx.main_first(
        lambda shared: _model_and_sources(config if shared is None else config.replace(input_path=shared), ctx,
                                          state, train_rows, valid_rows, manifest, say, progress, damaged),
        share=lambda built: built[1][2])
    config = config.replace(input_path=input_path)  # "auto" resolved: config.json and checkpoints record the path
    written: list[Path] = []
    if ctx.is_main:  # rank 0 alone writes
        if state is None:  # nothing written yet: a disk too small for the checkpoints leaves the folder as it was
            require_free_space(folder.path, _checkpoint_bytes_estimate(model, config),
                               f"{config.model}'s checkpoints (best.pt and last.pt)")
        written = _prepare_folder(folder, config, manifest) + _say_damaged(damaged, folder)
    model = ctx.wrap(model, sync_bn=config.sync_bn)  # DistributedDataParallel (and SyncBatchNorm) with several
    net = ctx.unwrap(model)
    # each rank validates its shard; the logits are gathered (no valid source in a final fit)
    gather = ctx.gatherer(valid_src.batch_positions(0)) if valid_src is not None else None
    optimizer = build_optimizer(net, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(train_src), monitor=monitor)
    amp_dtype = autocast_dtype(ctx.device) if config.amp else None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)  # bf16 needs no scaling
    pos_weight = pos_weight_from_labels(train_rows["label"]) if config.pos_weighting else None
    criterion, val_criterion = build_criterion(config, pos_weight, ctx.device)
    run = _Run(config=config, ctx=ctx, folder=folder, model=model, net=net, train_src=train_src,
               valid_src=valid_src, gather=gather, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               amp_dtype=amp_dtype, criterion=criterion, val_criterion=val_criterion, ema=make_ema(net, config),
               monitor=monitor, say=say, progress=progress, written=written,
               pretrained_weights=_pretrained_record(config, state))
    _announce(run, len(train_rows), len(valid_rows), pos_weight)
    return run


def _checkpoint_bytes_estimate(model: nn.Module, config: TrainConfig) -> int:
    """About what best.pt and last.pt take together: the weights in best.pt; in last.pt the weights, the
    optimizer's per-parameter state (AdamW/Adam two tensors, SGD with momentum one) and the EMA's copy."""
    weights = tensor_bytes(model.state_dict())
    slots = 2 if config.optimizer in ("adamw", "adam") else int(config.momentum > 0)
    ema = int(config.ema_decay > 0)
    return weights * (1 + 1 + slots + ema) + 2 * CHECKPOINT_SLACK_BYTES


def _prepare_folder(folder: RunFolder, config: TrainConfig, manifest: pd.DataFrame) -> list[Path]:
    """config.json (input path resolved), no torn checkpoint, manifest.csv when absent (rank 0 only).

    Returns the files it created (not those it replaced), for ``_undo_start``.
    """
    created = [p for p in (folder.config_json, folder.manifest_csv, folder.manifest_json) if not p.exists()]
    config.to_json(folder.config_json)
    # Left by a process killed while saving.
    for torn in folder.checkpoints.glob(f"{TMP_PREFIX}*.pt.*{TMP_SUFFIX}"):
        torn.unlink()
    if not folder.manifest_csv.is_file():  # no split_images.zip: 01's save_manifest keeps one (not K per CV)
        save_manifest(manifest, folder.path, keep_split_images=False)
    return created


def _undo_start(folder: RunFolder, created: list[Path]) -> None:
    """Remove what a fresh run wrote before its first checkpoint failed (a full disk): the folder as it was."""
    for path in [*created, folder.history_csv, folder.checkpoint("best")]:
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.checkpoints.rmdir()  # only when empty


def _announce(run: _Run, n_train: int, n_valid: int, pos_weight: float | None) -> None:
    config, ctx, amp_dtype = run.config, run.ctx, run.amp_dtype
    run.say(f"{config.model} on {ctx.device} (AMP {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, "
            f"channels_last {config.channels_last}), input path {config.input_path}: {n_train} train / "
            f"{n_valid} valid images at {config.image_size} px, pos_weight "
            f"{'off' if pos_weight is None else f'{pos_weight:.2f}'}, monitor {run.monitor}")
    if ctx.world_size > 1:
        run.say(f"{ctx.world_size} processes ({'NCCL' if ctx.device.type == 'cuda' else 'gloo'}), global batch "
                f"{config.batch_size} = {ctx.world_size} x {config.batch_size // ctx.world_size}, SyncBatchNorm "
                f"{'on' if config.sync_bn else 'off'}")


def _restore(run: _Run, state: dict[str, Any] | None) -> _Book:
    """A new run's book, or the resumed one with the optimiser, scheduler, scaler, EMA and RNGs restored."""
    if state is None:
        return _Book(best=math.inf if run.monitor == "loss" else -math.inf)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and run.scaler.is_enabled():  # {} when saved without scaling (CPU, bf16)
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    book = _Book(done=state["epoch"], best=state["best_metric"], best_epoch=state["best_epoch"],
                 bad=state["bad_epochs"], history=list(state["history"]))
    set_rng_state(run.ctx.own_rng_state(state))  # last: nothing may draw from the RNGs before epoch done+1 starts
    run.say(f"resumed {run.folder.path} after epoch {book.done}")
    return book


def _train(run: _Run, book: _Book, trackers: list) -> None:
    """The epoch loop: train, validate, record, save; early stopping; the trackers finished either way."""
    config, failed = run.config, True
    bar = tqdm(total=config.epochs, initial=book.done, desc="training", unit="epoch", disable=not run.progress)
    try:
        for epoch in range(book.done + 1, config.epochs + 1):
            start = time.perf_counter()
            stats, metrics = _train_and_validate(run, epoch, book.done)
            improved, row = _record(run, book, epoch, stats, metrics, time.perf_counter() - start)
            _save(run, book, epoch, improved)
            book.done = epoch
            for tracker in trackers:
                tracker.log_epoch(row, epoch=epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_auroc=f"{row['val_auroc']:.3f}",
                            img_s=f"{row['images_per_s']:.0f}")
            run.say(_summary(row, config.epochs, improved))
            if book.stop:
                run.say(f"early stop: {run.monitor} did not improve for {book.bad} epochs; best {book.best:.4f} at "
                        f"epoch {book.best_epoch}")
                break
        if run.folder.checkpoint("best").is_file():
            for tracker in trackers:
                tracker.log_artifact(run.folder.checkpoint("best"))
        failed = False
    finally:
        bar.close()
        for tracker in trackers:
            tracker.finish(failed=failed)


def _train_and_validate(run: _Run, epoch: int, done: int) -> tuple[dict[str, float], dict[str, float]]:
    """One epoch's training figures (over every rank) and validation metrics (rank 0's, on every rank).

    Raises:
        TrainingDivergedError: NaN or inf in the loss or a weight; the message says what was kept.
    """
    config = run.config
    if config.freeze_epochs:  # while its lr is held at 0 the backbone is a frozen feature extractor: BN in eval
        run.net.frozen_backbone = epoch <= config.freeze_epochs
    try:
        stats = train_one_epoch(run.model, run.train_src, run.criterion, run.optimizer, run.scaler, epoch=epoch,
                                device=run.ctx.device, amp_dtype=run.amp_dtype, progress=run.progress, ema=run.ema,
                                step_scheduler=run.scheduler if config.scheduler in STEPWISE_SCHEDULERS else None)
        stats = run.ctx.reduce_train_stats(stats)  # over every rank's images
        run.ctx.sync_buffers(run.net)  # rank 0's BatchNorm statistics: those the checkpoint holds
        scored = run.net if run.ema is None else run.ema.module  # the weights validated and handed on
        metrics = dict(NO_VALIDATION) if run.valid_src is None else validate(
            scored, run.valid_src, run.val_criterion, device=run.ctx.device, amp_dtype=run.amp_dtype,
            tta=config.tta, progress=run.progress, gather=run.gather)
        metrics = run.ctx.broadcast(metrics)  # every rank decides on rank 0's figures
        _check_finite(run.net, None if run.valid_src is None else metrics["val_loss"], epoch)
    except TrainingDivergedError as err:
        kept = f"{run.folder.checkpoint('last')} still holds epoch {done}" if done else "no checkpoint was written"
        raise TrainingDivergedError(f"{err}. {kept}. Start a new run with a lower lr (now {config.lr}) "
                                    f"or with amp=False.") from None
    return stats, metrics


def _record(run: _Run, book: _Book, epoch: int, stats: dict[str, float], metrics: dict[str, float],
            seconds: float) -> tuple[bool, dict[str, Any]]:
    """Best epoch, patience and the per-epoch schedulers from the monitor; the epoch's history row.
    Returns (whether the monitor improved, the row)."""
    value = metrics[{"auroc": "val_auroc", "accuracy": "val_accuracy", "loss": "val_loss"}[run.monitor]]
    improved = value < book.best if run.monitor == "loss" else value > book.best  # NaN never improves
    if improved:
        book.best, book.best_epoch, book.bad = value, epoch, 0
    else:
        book.bad += 1
    book.stop = run.config.patience > 0 and book.bad >= run.config.patience
    if run.config.scheduler in ("step", "exponential"):
        run.scheduler.step()
    elif run.config.scheduler == "plateau":
        run.scheduler.step(value)
    row = {"epoch": epoch, "train_loss": stats["train_loss"], **metrics, "lr": stats["lr"], "seconds": seconds,
           "images_per_s": stats["images"] / stats["seconds"], "world_size": run.ctx.world_size}
    book.history.append(row)
    return improved, row


def _save(run: _Run, book: _Book, epoch: int, improved: bool) -> None:
    """checkpoints/last.pt (everything a resume needs), best.pt (the weights handed on) and history.csv,
    atomically, by rank 0 alone; every rank builds the checkpoint (its RNG states are gathered)."""
    net, ema, scheduler = run.net, run.ema, run.scheduler
    ckpt = {"model": to_cpu(net.state_dict()), "optimizer": to_cpu(run.optimizer.state_dict()),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": to_cpu(run.scaler.state_dict()), "epoch": epoch, "best_metric": book.best,
            "best_epoch": book.best_epoch, "bad_epochs": book.bad, "stopped_early": book.stop, "monitor": run.monitor,
            "history": book.history, "rng": rng_state(), "config": run.config.to_dict(),
            "model_name": run.config.model, "ema": to_cpu(ema.state_dict()) if ema is not None else None,
            "pretrained_weights": run.pretrained_weights}
    if run.ctx.world_size > 1:  # each rank's own, so the same world size resumes bit for bit
        ckpt["rng_ranks"] = run.ctx.rng_states(ckpt["rng"])
    if not run.ctx.is_main:  # rank 0 alone writes
        return
    best = None
    if improved or run.config.keep == "last":  # best.pt holds the weights the run hands on
        handed_on = ckpt["model"] if ema is None else to_cpu(ema.module.state_dict())
        best = {**{k: ckpt[k] for k in BEST_KEYS}, "model": handed_on}
    _save_checkpoints(run.folder, best, ckpt, epoch)
    _write_history(book.history, run.folder.history_csv)


def _save_checkpoints(folder: RunFolder, best: dict[str, Any] | None, last: dict[str, Any], epoch: int) -> None:
    """best.pt (when given), then last.pt, each atomically; both or neither as far as a full disk goes.

    The free space is checked first (each new file is written beside the old one it replaces: best.pt
    needs its own size, last.pt its own plus what best.pt grew by); should last.pt still fail on a run
    that had none, the best.pt just written is removed, so the folder never holds one without the other.
    """
    best_path, last_path = folder.checkpoint("best"), folder.checkpoint("last")
    best_bytes = tensor_bytes(best) + CHECKPOINT_SLACK_BYTES if best is not None else 0
    grown = best_bytes - (best_path.stat().st_size if best is not None and best_path.is_file() else 0)
    needed = max(best_bytes, grown + tensor_bytes(last) + CHECKPOINT_SLACK_BYTES)
    require_free_space(folder.checkpoints, needed, f"epoch {epoch}'s checkpoints (the previous ones were kept)")
    had_last = last_path.is_file()
    if best is not None:
        atomic_save(best, best_path)
    try:
        atomic_save(last, last_path)
    except BaseException:
        if best is not None and not had_last:
            with contextlib.suppress(OSError):
                best_path.unlink()
        raise


# ---- helpers -------------------------------------------------------------------------------------


def load_result(run_dir: str | os.PathLike) -> FitResult:
    """The FitResult of a run folder, read from checkpoints/last.pt (what `fit` returned when it wrote it).

    Raises:
        FileNotFoundError: no checkpoints/last.pt there. CheckpointError: the file cannot be read.
    """
    run_dir = Path(run_dir)
    return _result(run_dir, load_checkpoint(RunFolder(run_dir).checkpoint("last")))


def _result(run_dir: Path, state: dict[str, Any]) -> FitResult:
    return FitResult(run_dir=run_dir, best_epoch=state["best_epoch"], best_metric=float(state["best_metric"]),
                     history=pd.DataFrame(state["history"], columns=HISTORY_COLUMNS),
                     stopped_early=bool(state["stopped_early"]))


def _split_rows(manifest: pd.DataFrame, config: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = filter_body_parts(manifest, config.body_parts())
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    valid_rows = rows[rows["split"] == "valid"].reset_index(drop=True)
    for name, part in (("train", train_rows), ("valid", valid_rows)):
        counts = part["label"].value_counts()
        if name == "train" and (counts.get(0, 0) == 0 or counts.get(1, 0) == 0):
            raise ValueError(f"the train split (body part {config.body_part!r}) needs both labels, has "
                             f"{counts.get(0, 0)} normal and {counts.get(1, 0)} abnormal images")
        if len(part) == 0 and (name == "train" or _needs_validation(config)):
            raise ValueError(f"no {name} images for body part {config.body_part!r}; check the manifest's split column"
                             + ("" if name == "train" else " (a run without validation needs keep='last', "
                                "patience=0 and a scheduler other than 'plateau')"))
    return train_rows, valid_rows


def _needs_validation(config: TrainConfig) -> bool:
    """Whether the run uses the valid split to choose anything (checkpoint, early stop, plateau lr)."""
    return config.keep != "last" or config.patience > 0 or config.scheduler == "plateau"


def _monitor(config: TrainConfig, valid_rows: pd.DataFrame) -> str:
    if config.monitor == "auroc" and len(valid_rows) and valid_rows["label"].nunique() < 2:
        warnings.warn("the valid split holds one label only, so AUROC is undefined; monitoring val loss instead",
                      stacklevel=4)
        return "loss"
    return config.monitor


def _model_and_sources(config: TrainConfig, ctx: distributed.Distributed, state: dict[str, Any] | None,
                       train_rows: pd.DataFrame, valid_rows: pd.DataFrame, manifest: pd.DataFrame, say,
                       progress: bool, damaged: DamagedImages) -> tuple[nn.Module, tuple[Any, Any, str]]:
    model = _build_model(config, ctx.device, state, say, progress)
    return model, make_sources(config, train_rows, valid_rows, manifest=manifest, device=ctx.device,
                               progress=progress, rank=ctx.rank, world_size=ctx.world_size, damaged=damaged)


def _pretrained_record(config: TrainConfig, state: dict[str, Any] | None) -> dict[str, str] | None:
    """Which ImageNet weights file a pretrained run started from (a resumed run: what its checkpoint says)."""
    if state is not None:
        return state.get("pretrained_weights")
    return weights_record(model_spec(config.model)) if config.pretrained else None


def _build_model(config: TrainConfig, device: torch.device, state: dict[str, Any] | None, say,
                 progress: bool) -> nn.Module:
    # Resuming overwrites every weight, so never fetch pretrained weights for it.
    model = create_model(config.model, pretrained=config.pretrained and state is None, head=config.head,
                         freeze=config.freeze, dropout=config.dropout).to(device)
    if state is not None:
        restore_pruning(model, state["model"])  # SynFlow's masks come from the checkpoint
        model.load_state_dict(state["model"])
    elif config.prune_sparsity > 0:
        report = prune_synflow(model, sparsity=config.prune_sparsity, iterations=config.prune_iterations,
                               input_shape=(1, 3, config.image_size, config.image_size), progress=progress)
        say(f"SynFlow pruning: {report}")
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_finite(model: nn.Module, val_loss: float | None, epoch: int) -> None:
    """Never checkpoint a model with a NaN weight or loss (val_loss None: no validation)."""
    if val_loss is not None and not math.isfinite(val_loss):
        raise TrainingDivergedError(f"the validation loss became {val_loss} at epoch {epoch}")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDivergedError(f"weight {name} holds NaN or inf after epoch {epoch}")


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    atomic_write_csv(path, pd.DataFrame(history, columns=HISTORY_COLUMNS))


def _summary(row: dict[str, Any], epochs: int, improved: bool) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auroc {row['val_auroc']:.4f}  val_acc {row['val_accuracy']:.3f}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s" + ("  *best" if improved else ""))
