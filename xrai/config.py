"""TrainConfig: every knob of a run, with a JSON round trip; saved in config.json and every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xrai.fileio import atomic_write_text
from xrai.labels import MURA_BODY_PARTS as MURA_BODY_PARTS  # re-exported: xrai.config.MURA_BODY_PARTS

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "onecycle", "step", "exponential", "plateau", "none")
MONITORS = ("auroc", "accuracy", "loss")
INPUT_PATHS = ("auto", "cached", "classic")
HEADS = ("linear", "mlp")
RESIZES = ("letterbox", "stretch")
KEEPS = ("best", "last")
# What the recipe fields added with grouped CV (docs/recipe.md) meant before they existed: a config saved
# without them (an older run folder or checkpoint) reads back with these, so its model is preprocessed
# and evaluated as it was trained, not with today's defaults.
PRE_RECIPE_VALUES = {"resize": "letterbox", "crop_scale": 0.7, "aug_strength": 1.0, "label_smoothing": 0.0,
                     "ema_decay": 0.0, "pos_weighting": True, "tta": False, "keep": "best"}
MIN_IMG_SIZE = 32  # the total stride of every registered backbone (see TrainConfig.validate)
# The largest input side: one 1024 px image is 12 MB as float32 (x3 channels), a batch of 32 with its
# activations already tens of GB; larger sides only fail later, in a MemoryError far from the setting.
MAX_IMG_SIZE = 1024

# (field, low, low excluded, high, high excluded); high None: unbounded.
_FLOAT_RANGES = (
    ("lr", 0.0, True, None, False),
    ("weight_decay", 0.0, False, None, False),
    ("momentum", 0.0, False, 1.0, True),
    ("dropout", 0.0, False, 1.0, True),
    ("prune_sparsity", 0.0, False, 1.0, True),
    ("val_fraction", 0.0, True, 1.0, True),
    ("test_fraction", 0.0, True, 1.0, True),
    ("step_gamma", 0.0, True, 1.0, False),
    ("exp_gamma", 0.0, True, 1.0, False),
    ("layer_decay", 0.0, True, 1.0, False),
)
# (field, smallest value) for the integer settings.
_INT_MINIMUMS = (
    ("epochs", 1), ("batch_size", 1), ("prune_iterations", 1), ("step_size", 1), ("warmup_epochs", 0), ("freeze_epochs", 0),
    ("patience", 0), ("seed", 0), ("num_workers", 0), ("max_batches", 0), ("world_size", 1),
)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a training run. The CLI flags, the notebooks' parameters and the
    checkpoint all use these names.

    ``body_part`` is ``"all"``, one part (``"wrist"``) or several joined by commas (``"wrist,hand"``).
    ``val_fraction`` / ``test_fraction`` are the shares of images ``xrai.data.load`` puts in valid / test
    where the source has no such split (MURA has an official valid split, FracAtlas none); a run folder
    that already holds manifest.csv keeps its split.
    ``img_size`` of ``None`` means 224, or 128 on the synthetic set (its phantoms carry a line that is
    plainly visible at 128 px, which keeps the CPU demo within minutes).

    The recipe defaults are ``xrai.recipe.RECIPES["v2"]``: the old recipe ("v1": letterbox, peak lr
    1e-3, no TTA) with the three changes grouped 5-fold CV on fracatlas-dev chose (docs/recipe.md):
    ``lr`` 2e-3, ``resize`` "stretch" and flip ``tta``. They were chosen FROM SCRATCH
    (pretrained=False, 128 px, CPU), without ImageNet weights; all three apply to pretrained runs as
    well (a peak learning rate, how images become squares, and scoring with the mirror image are
    independent of the starting weights), but their gain there was not measured. The other recipe
    fields keep v1's values, which the same CV did not beat by more than the fold spread.
    """

    # data
    data: str = "synthetic"
    root: str | None = None
    body_part: str = "all"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # model
    model: str = "mobilenet_v2"
    pretrained: bool = True
    head: str = "linear"
    freeze: bool = False  # the backbone frozen throughout: only the head trains
    freeze_epochs: int = 0  # the backbone frozen for the first N epochs (head warm-up), then trained (cosine)
    dropout: float = 0.0
    prune_sparsity: float = 0.0
    prune_iterations: int = 100
    # optimisation
    epochs: int = 10
    img_size: int | None = None
    cache_size: int | None = None
    batch_size: int = 32
    lr: float = 2e-3  # recipe v2 (below)
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    step_size: int = 5
    step_gamma: float = 0.1
    exp_gamma: float = 0.99
    layer_decay: float = 1.0  # layer-wise lr decay: each backbone stage gets this times the next one's lr (1: off)
    patience: int = 5
    monitor: str = "auroc"
    seed: int = 0
    # recipe v2 (docs/recipe.md; xrai.recipe.RECIPES also holds v1, the old one): lr above, resize, tta
    resize: str = "stretch"
    crop_scale: float = 0.7
    aug_strength: float = 1.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    pos_weighting: bool = True
    tta: bool = True
    keep: str = "best"
    # machinery
    input_path: str = "auto"
    num_workers: int = 2
    amp: bool = True
    channels_last: bool = True
    device: str = "auto"
    deterministic: bool = False  # GPU: no cuDNN autotuning, deterministic kernels (slower); see README
    max_batches: int = 0
    loggers: list[str] = field(default_factory=list)
    experiment: str = "xrai"
    # several processes (torchrun): BatchNorm statistics over the global batch; world_size is recorded
    # by fit() (the number of processes that trained), whatever was set
    sync_bn: bool = True
    world_size: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, the allowed range and the value when a setting is off.

        The same check runs for the CLI (its flags build a TrainConfig), the notebooks and Python
        callers, when the config is made, replaced or read back from JSON. ``img_size``: an integer
        >= 32. Every registered backbone halves the resolution five times (total stride 32) and ends in
        adaptive average pooling, so any side from 32 up is accepted; below 32 the last stage has less
        than one cell. Multiples of 32 are not required: the EfficientNets' own sizes (240, 260, 300,
        380...) are not multiples of 32.
        """
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("monitor", self.monitor, MONITORS)
        _choice("input_path", self.input_path, INPUT_PATHS)
        _choice("head", self.head, HEADS)
        _choice("resize", self.resize, RESIZES)
        _choice("keep", self.keep, KEEPS)
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale (the smallest crop's share of the image) must be in (0, 1], got {self.crop_scale}")
        for name in ("label_smoothing", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (0: off), got {getattr(self, name)}")
        if self.aug_strength < 0:
            raise ValueError(f"aug_strength must be >= 0 (0: crop and flip only), got {self.aug_strength}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, low, low_open, high, high_open in _FLOAT_RANGES:
            _in_range(name, getattr(self, name), low, low_open, high, high_open)
        for name, low in _INT_MINIMUMS:
            _integer(name, getattr(self, name), low)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1 (some images must be left to train on), "
                             f"got {self.val_fraction} + {self.test_fraction}")
        if self.img_size is not None:
            _integer("img_size", self.img_size, MIN_IMG_SIZE, high=MAX_IMG_SIZE,
                     why=" (every model downsamples by 32; 224 is the usual size, 128 on the synthetic set)")
        if self.cache_size is not None:
            _integer("cache_size", self.cache_size, self.image_size,
                     why=f" (images are cached at this side and cropped to img_size {self.image_size})")
        if self.freeze_epochs and self.scheduler != "cosine":
            raise ValueError(f"freeze_epochs needs scheduler='cosine' (it warms the backbone up after unfreezing), "
                             f"got scheduler={self.scheduler!r}")
        for logger in self.loggers:
            _choice("loggers", logger, ("mlflow", "wandb"))

    # ---- derived values -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The square side fed to the model."""
        if self.img_size is not None:
            return int(self.img_size)
        return 128 if self.data == "synthetic" else 224

    @property
    def resize_size(self) -> int:
        """The side images are resized to before cropping (and the cache's size): 8/7 of the crop."""
        if self.cache_size is not None:
            return int(self.cache_size)
        return int(round(self.image_size * 8 / 7))

    def body_parts(self) -> list[str] | None:
        """The selected body parts, lower case, or None for all."""
        text = (self.body_part or "all").strip().lower()
        if text in ("", "all"):
            return None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return parts

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a saved config: absent recipe fields take PRE_RECIPE_VALUES); unknown keys
        raise, so a typo never passes silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{**PRE_RECIPE_VALUES, **values})

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; with ``path``, also written there (plus a newline) atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> TrainConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Every field declared ``bool`` (a string under ``from __future__ import annotations``); validate refuses
# anything but True or False for them.
_BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type in ("bool", bool))


def _in_range(name: str, value: Any, low: float, low_open: bool, high: float | None, high_open: bool) -> None:
    """Raise ValueError unless value is a finite real number in the interval."""
    if high is None:
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be a number {interval}, got {value!r}")


def _integer(name: str, value: Any, low: int, *, high: int | None = None, why: str = "") -> None:
    """Raise ValueError unless value is an int >= low (and <= high when given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{why}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{why}, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
