"""Every figure of the project: training curves, evaluation figures, EDA.

Each function returns a matplotlib ``Figure`` and saves it when given a path. Figures are built with
``matplotlib.figure.Figure`` rather than pyplot, so nothing depends on a GUI backend (Agg-safe, no
``plt.show``) and no figure lingers in pyplot's global registry; Jupyter still displays a returned
Figure. Called by the notebooks and the CLI only: nothing in the core imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy.special import expit
from sklearn import metrics as skm

from xrai.config import TrainConfig
from xrai.data import ImageError, read_image
from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD, GpuAugment, augment_options
from xrai.data.batches import AUGMENT_STREAM, EpochPlan, epoch_generator, ready_batch
from xrai.data.dataset import XrayDataset
from xrai.data.split import filter_body_parts
from xrai.evaluate.calibration import (
    ECE_BINS,
    expected_calibration_error,
    reliability_bins,
)
from xrai.evaluate.run import MURA_BASELINE
from xrai.labels import CLASS_NAMES, class_names
from xrai.runs.layout import RunFolder

__all__ = [
    "augmented_batch", "plot_audit_groups", "plot_class_balance", "plot_confusion_matrix", "plot_history", "plot_image_sizes",
    "plot_patients_per_part", "plot_per_body_part", "plot_pr", "plot_reliability", "plot_roc", "plot_sample_grid",
    "save_run_figures",
]

CLASS_COLOURS = ("#4C72B0", "#DD8452")


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


# ---- training and evaluation --------------------------------------------------------------------


def plot_history(history: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Train and validation loss, and the validation metrics, per epoch (history.csv)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = history["epoch"]
    for col, style in (("train_loss", "o-"), ("val_loss", "s-")):
        if col in history:
            loss_ax.plot(epochs, history[col], style, label=col.replace("_", " "))
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    for col in ("val_auroc", "val_accuracy"):
        if col in history and history[col].notna().any():
            metric_ax.plot(epochs, history[col], "o-", label=col.replace("val_", "validation "))
    metric_ax.set(xlabel="epoch", ylabel="metric", title="validation metrics", ylim=(0, 1.02))
    metric_ax.legend(loc="lower right")
    return _finish(fig, path)


def plot_confusion_matrix(
    cm: Any, path: str | Path | None = None, *, title: str = "confusion matrix", labels: tuple[str, str] = CLASS_NAMES
) -> Figure:
    """Seaborn heatmap of [[tn, fp], [fn, tp]] with counts and row percentages (rows: actual)."""
    cm = np.asarray(cm, dtype=int)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    annot = np.array([[f"{c}\n{s:.1%}" for c, s in zip(rc, rs)] for rc, rs in zip(cm, share)])
    fig = Figure(figsize=(4.6, 4), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(share, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, cbar=True, ax=ax,
                xticklabels=labels, yticklabels=labels, annot_kws={"fontsize": 12})
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    return _finish(fig, path)


def plot_roc(
    y_true: Any, prob: Any, path: str | Path | None = None, *, threshold: float | None = None,
    auroc_ci: list[float] | None = None, title: str = "ROC",
) -> Figure:
    """ROC curve with AUROC (and its 95% CI) in the legend, and the operating point at the threshold."""
    y, p = np.asarray(y_true, int), np.asarray(prob, float)
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = skm.roc_curve(y, p)
        ci = f" (95% CI {auroc_ci[0]:.3f}-{auroc_ci[1]:.3f})" if auroc_ci else ""
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {skm.roc_auc_score(y, p):.3f}{ci}")
        if threshold is not None:
            pred = p >= threshold
            sens, fpr_t = pred[y == 1].mean(), pred[y == 0].mean()
            ax.plot([fpr_t], [sens], "o", color="crimson", ms=8,
                    label=f"threshold {threshold:.3f}: sens {sens:.2f}, spec {1 - fpr_t:.2f}")
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity", title=title,
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, path)


def plot_pr(
    y_true: Any, prob: Any, path: str | Path | None = None, *, threshold: float | None = None,
    title: str = "precision-recall",
) -> Figure:
    """Precision-recall curve with average precision, prevalence as the chance line, and the threshold."""
    y, p = np.asarray(y_true, int), np.asarray(prob, float)
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.2f}")
    if len(np.unique(y)) == 2:
        precision, recall, _ = skm.precision_recall_curve(y, p)
        ax.plot(recall, precision, lw=2, label=f"AP {skm.average_precision_score(y, p):.3f}")
        if threshold is not None and (p >= threshold).any():
            pred = p >= threshold
            ax.plot([pred[y == 1].mean()], [y[pred].mean()], "o", color="crimson", ms=8,
                    label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=title, xlim=(-0.01, 1.01), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _finish(fig, path)


def plot_reliability(
    y_true: Any, prob: Any, path: str | Path | None = None, *, raw_prob: Any = None, n_bins: int = ECE_BINS,
    title: str = "reliability", positive: str = CLASS_NAMES[1],
) -> Figure:
    """Reliability diagram: fraction positive against mean p(positive) per equal-width bin, calibrated
    (and uncalibrated, when ``raw_prob`` is given) with the ECE in the legend; images per bin below.
    ``positive``: the positive class's name in the axis labels ("abnormal"; FracAtlas "fractured")."""
    y = np.asarray(y_true, int)
    fig = Figure(figsize=(4.8, 5.6), layout="constrained")
    ax, hist_ax = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    curves = [("calibrated", prob, CLASS_COLOURS[0])]
    if raw_prob is not None:
        curves.insert(0, ("uncalibrated", raw_prob, "grey"))
    for name, p, colour in curves:
        bins = reliability_bins(y, p, n_bins=n_bins)
        full = bins[bins["n"] > 0]
        ece = expected_calibration_error(y, p, n_bins=n_bins)
        ax.plot(full["mean_probability"], full["fraction_abnormal"], "o-", color=colour,
                label=f"{name}: ECE {ece:.3f}")
        centres = (bins["lower"] + bins["upper"]) / 2
        hist_ax.bar(centres, bins["n"], width=1 / n_bins, alpha=0.5, color=colour, label=name)
    ax.set(ylabel=f"fraction {positive}", title=f"{title} ({n_bins} equal-width bins)", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    hist_ax.set(xlabel=f"mean p({positive}) in the bin", ylabel="images")
    return _finish(fig, path)


def plot_per_body_part(report: dict[str, Any], path: str | Path | None = None) -> Figure:
    """Study kappa per body part (image kappa where the source has no studies), with the overall value
    as a line; on MURA runs beside the DenseNet-169 baseline, which is on MURA's hidden test set."""
    parts = report["per_body_part"]
    names = sorted(parts)
    key = "study_kappa" if any(parts[n].get("study_kappa") is not None for n in names) else "kappa"
    ours = [parts[n].get(key) for n in names]
    base = [MURA_BASELINE.get(n) if report.get("baseline") else None for n in names]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6, 1.1 * len(names) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, [np.nan if v is None else v for v in ours], 0.4, color=CLASS_COLOURS[0],
           label=f"this run ({key.replace('_', ' ')})")
    if any(b is not None for b in base):
        ax.bar(x + 0.2, [np.nan if b is None else b for b in base], 0.4, color="lightgrey", hatch="//",
               edgecolor="grey", label="MURA DenseNet-169 study kappa, on MURA's hidden test set")
        ax.axhline(MURA_BASELINE["overall"], ls="--", color="grey",
                   label=f"MURA overall {MURA_BASELINE['overall']:.3f} (hidden test set)")
    block = report.get("study") if key == "study_kappa" else report.get("image")
    if block and block.get("kappa") is not None:
        ax.axhline(block["kappa"], color=CLASS_COLOURS[0], label=f"this run overall {block['kappa']:.3f}")
    for xi, v in zip(x, ours):
        ax.text(xi - 0.2, 0.01 if v is None else v + 0.01, "n/a" if v is None else f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{n}\n(n={parts[n]['n']})" for n in names])
    ax.set(ylabel="Cohen's kappa", ylim=(min(0, *[v for v in ours if v is not None]) - 0.05, 1.1),
           title=f"{key.replace('_', ' ')} per body part ({report.get('split', '')})")
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path)


def save_run_figures(run_dir: str | Path, split: str) -> dict[str, Path]:
    """confusion_matrix_<split>.png, roc_<split>.png, pr_<split>.png, per_body_part_<split>.png,
    reliability_<split>.png (and curves.png from history.csv when present) from the split's report and
    predictions."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    report = folder.read_report(split)
    if report is None:
        raise FileNotFoundError(f"no {folder.report_json(split).name} in {run_dir}: run `python -m xrai evaluate "
                                f"--run {run_dir} --split {split}` (or notebooks/04_evaluate.ipynb) first")
    pred = folder.read_predictions(split)
    y, p, thr = pred["label"], pred["probability"], report["threshold"]
    names = class_names(report.get("source") or folder.source)
    out = {
        "confusion_matrix": run_dir / f"confusion_matrix_{split}.png",
        "roc": run_dir / f"roc_{split}.png",
        "pr": run_dir / f"pr_{split}.png",
        "per_body_part": run_dir / f"per_body_part_{split}.png",
        "reliability": run_dir / f"reliability_{split}.png",
    }
    raw = expit(pred["logit"].to_numpy(float)) if "logit" in pred else None
    plot_reliability(y, p, out["reliability"], raw_prob=raw, title=f"reliability ({split})", positive=names[1])
    where = f"{split}, threshold {thr:.3f} from {report['threshold_from']}"
    plot_confusion_matrix(report["image"]["confusion_matrix"], out["confusion_matrix"],
                          title=f"confusion matrix ({where})", labels=names)
    plot_roc(y, p, out["roc"], threshold=thr, auroc_ci=report["image"].get("auroc_ci"), title=f"ROC ({split})")
    plot_pr(y, p, out["pr"], threshold=thr, title=f"precision-recall ({split})")
    plot_per_body_part(report, out["per_body_part"])
    history = folder.read_history()
    if history is not None:
        out["curves"] = run_dir / "curves.png"
        plot_history(history, out["curves"])
    return out


# ---- EDA ----------------------------------------------------------------------------------------


def _manifest_names(manifest: pd.DataFrame) -> tuple[str, str]:
    """The words for label 0 and 1 of the manifest's source (its attrs, else its "source" column)."""
    source = manifest.attrs.get("source")
    if not source and "source" in manifest.columns and len(manifest):
        source = manifest["source"].iloc[0]
    return class_names(source)


def _counts(manifest: pd.DataFrame) -> pd.DataFrame:
    table = manifest.groupby(["body_part", "label"]).size().unstack(fill_value=0)
    return table.reindex(columns=[0, 1], fill_value=0).rename(columns=dict(enumerate(_manifest_names(manifest))))


def plot_class_balance(manifest: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Images per body part and class: a grouped bar chart and one pie per body part."""
    counts = _counts(manifest)
    n = len(counts)
    fig = Figure(figsize=(max(8, 1.6 * n), 7), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.4, 1])
    ax = top.subplots()
    counts.plot.bar(ax=ax, color=CLASS_COLOURS, rot=0)
    ax.set(xlabel="", ylabel="images", title="class balance per body part")
    pies = np.atleast_1d(bottom.subplots(1, n))
    for pie_ax, (part, row) in zip(pies, counts.iterrows()):
        pie_ax.pie(row.values, colors=CLASS_COLOURS, autopct=lambda v: f"{v:.0f}%", textprops={"fontsize": 7})
        pie_ax.set_title(f"{part}\n(n={int(row.sum())})", fontsize=9)
    return _finish(fig, path)


def _thumb(ax: Any, path: str, caption: str) -> None:
    try:
        ax.imshow(read_image(path), cmap="gray")
    except (ImageError, OSError) as e:  # a thumbnail grid must not die on one bad file
        ax.text(0.5, 0.5, f"unreadable:\n{type(e).__name__}", ha="center", va="center", fontsize=7)
    ax.set_title(caption, fontsize=7)
    ax.axis("off")


def plot_sample_grid(manifest: pd.DataFrame, path: str | Path | None = None, *, n: int = 6, seed: int = 0) -> Figure:
    """A row of ``n`` random images per class (seeded), captioned with body part."""
    fig = Figure(figsize=(1.8 * n, 4.2), layout="constrained")
    names = _manifest_names(manifest)
    axes = np.atleast_2d(fig.subplots(2, n))
    for label, row_axes in enumerate(axes):
        rows = manifest[manifest["label"] == label]
        rows = rows.sample(min(n, len(rows)), random_state=seed) if len(rows) else rows
        for ax in row_axes:
            ax.axis("off")
        for ax, (_, r) in zip(row_axes, rows.iterrows()):
            _thumb(ax, r["path"], f"{names[label]} - {r['body_part']}")
    return _finish(fig, path)


def plot_image_sizes(
    manifest: pd.DataFrame, path: str | Path | None = None, *, sample: int = 1000, seed: int = 0
) -> Figure:
    """Width against height (read from file headers, no decoding) of up to ``sample`` images."""
    rows = manifest.sample(min(sample, len(manifest)), random_state=seed)
    sizes = []
    for _, r in rows.iterrows():
        try:
            with Image.open(r["path"]) as im:
                sizes.append((im.width, im.height, r["body_part"]))
        except OSError:  # unreadable header: the audit lists those files
            continue
    table = pd.DataFrame(sizes, columns=["width", "height", "body_part"])
    fig = Figure(figsize=(10, 4), layout="constrained")
    scatter_ax, hist_ax = fig.subplots(1, 2)
    sns.scatterplot(data=table, x="width", y="height", hue="body_part", s=12, ax=scatter_ax)
    scatter_ax.set_title(f"image sizes ({len(table)} images)")
    sns.histplot(table["width"] / table["height"], bins=30, ax=hist_ax)
    hist_ax.set(xlabel="aspect ratio (width / height)", title="aspect ratios")
    return _finish(fig, path)


def plot_patients_per_part(manifest: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Patients, studies and images per body part (ids the source lacks are left out)."""
    table = pd.DataFrame({"images": manifest.groupby("body_part").size()})
    for col, name in (("patient_id", "patients"), ("study_id", "studies")):
        ids = manifest[manifest[col].fillna("").astype(str) != ""]
        if len(ids):
            table[name] = ids.groupby("body_part")[col].nunique()
    fig = Figure(figsize=(max(6, 1.2 * len(table)), 4), layout="constrained")
    ax = fig.subplots()
    table.fillna(0).plot.bar(ax=ax, rot=0)
    ax.set(xlabel="", ylabel="count", title="patients, studies and images per body part")
    return _finish(fig, path)


_CROSS_RANK = {"split+label": 3, "label": 2, "split": 1, "": 0}


def plot_audit_groups(
    audit: pd.DataFrame, path: str | Path | None = None, *, groups: int = 5, per_group: int = 4,
    names: tuple[str, str] = CLASS_NAMES,
) -> Figure:
    """Thumbnails of the worst duplicate groups: crossing split and label first, then the largest.

    ``names``: the words for label 0 and 1 (``xrai.labels.class_names`` of the manifest's source).
    """
    fig = Figure(figsize=(2.2 * per_group, 2.4 * max(1, groups)), layout="constrained")
    if audit.empty:
        fig.subplots().text(0.5, 0.5, "no duplicate groups found", ha="center", va="center")
        return _finish(fig, path)
    crosses = audit["crosses"].fillna("").astype(str)
    rank = audit.assign(_rank=crosses.map(_CROSS_RANK).fillna(0)).groupby("group").agg(
        rank=("_rank", "max"), size=("path", "size")).sort_values(["rank", "size"], ascending=False)
    chosen = rank.index[:groups]
    axes = np.atleast_2d(fig.subplots(len(chosen), per_group, squeeze=False))
    for row_axes, group in zip(axes, chosen):
        members = audit[audit["group"] == group].head(per_group)
        for ax in row_axes:
            ax.axis("off")
        for ax, (_, m) in zip(row_axes, members.iterrows()):
            _thumb(ax, m["path"], f"group {group} [{m['crosses'] or 'ok'}, {m['kind']}]\n{m['split']}, "
                   f"{names[int(m['label'])]}")
    return _finish(fig, path)


# ---- what the model sees ------------------------------------------------------------------------


def _train_config(run_dir_or_config: str | Path | TrainConfig) -> TrainConfig:
    if isinstance(run_dir_or_config, TrainConfig):
        return run_dir_or_config
    folder = RunFolder(run_dir_or_config)
    if not folder.config_json.is_file():
        raise FileNotFoundError(f"no {folder.config_json.name} in {folder.path}: pass a TrainConfig, or a run folder "
                                "that has started training")
    return TrainConfig.from_json(folder.config_json)


def augmented_inputs(config: TrainConfig, manifest: pd.DataFrame, *, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` training inputs of epoch 0 exactly as the training loop makes them, un-normalised.

    The same pieces the trainer's batch sources use (``xrai.data.batches``): the train split of the config's
    body parts, epoch 0's shuffled batches of ``config.batch_size``, each file decoded and fitted to the
    ``resize_size`` square as the cache holds it (``XrayDataset``), then ``GpuAugment`` in training mode
    with the recipe's ranges and the epoch's augmentation stream. Undoing the ImageNet normalisation
    gives what the model's first channel sees, in [0, 1].

    Returns:
        (images float32 (n, image_size, image_size) in [0, 1], labels int (n,)).
    """
    rows = filter_body_parts(manifest, config.body_parts())
    rows = rows[rows["split"] == "train"].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no train images for body part {config.body_part!r} in the manifest")
    plan = EpochPlan(len(rows), config.batch_size, True, config.seed)
    dataset = XrayDataset(rows, resize_size=config.resize_size, resize=config.resize)
    augment = GpuAugment(config.image_size, train=True,
                         **augment_options(crop_scale=config.crop_scale, aug_strength=config.aug_strength))
    generator = epoch_generator(config.seed, 0, AUGMENT_STREAM)
    images, labels = [], []
    for positions in plan.positions(0):
        pairs = [dataset[int(i)] for i in positions]
        x = torch.stack([p[0] for p in pairs])
        with torch.no_grad():
            x = ready_batch(augment, x, generator=generator, channels_last=False)
        images.append(x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0])  # channel 0, un-normalised
        labels += [int(p[1]) for p in pairs]
        if len(labels) >= n:
            break
    return torch.cat(images)[:n].clamp(0, 1).numpy(), np.asarray(labels[:n], dtype=int)


def augmented_batch(run_dir_or_config: str | Path | TrainConfig, manifest: pd.DataFrame, *, n: int = 16,
                    seed: int = 0, path: str | Path | None = None) -> Figure:
    """A grid of ``n`` training inputs after augmentation, as the training loop makes them, with their labels.

    Args:
        run_dir_or_config: a run folder (its config.json) or a TrainConfig.
        manifest: the run's manifest (``xrai.data.read_manifest(RUN_DIR)``), with its split column.
        seed: the seed of the shuffle and the augmentation (the run's own when it equals the config's);
            another seed shows another draw of the same recipe.
    """
    config = _train_config(run_dir_or_config)
    config = config if seed == config.seed else config.replace(seed=int(seed))
    images, labels = augmented_inputs(config, manifest, n=n)
    names = _manifest_names(manifest)
    cols = min(len(images), 8)
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, label in zip(axes, images, labels):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(names[int(label)], fontsize=8, color=CLASS_COLOURS[int(label)])
    fig.suptitle(f"{len(images)} training inputs as the model sees them ({config.image_size} px, crop "
                 f"{config.crop_scale:g}-1, flips, rotation and contrast x{config.aug_strength:g}; seed {config.seed})",
                 fontsize=9)
    return _finish(fig, path)
