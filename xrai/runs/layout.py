"""The run folder, named in one place: every file a run holds, and one reader and writer for each.

A run folder (docs/design.md, "The run folder")::

    RUN_DIR/
      manifest.csv, manifest.json   the images and where they came from (xrai.data.manifest)
      split_images.zip              the valid and test images, byte for byte (Colab: 04/05 need no download)
      audit.csv                     duplicate groups across splits and labels (leakage audit)
      config.json                   the TrainConfig the run was trained with
      history.csv                   one row per epoch
      checkpoints/best.pt, last.pt  the monitored best, and the newest (for resuming)
      predictions_<split>.csv       one row per image: ids, label, logit, probability
      report_<split>.json           the report (docs/design.md, "Report format")
      threshold.json                a final fit's operating point, given by its CV
      model_card.md                 written by evaluate
      gradcam/                      galleries
      cv.json, folds/<k>/, report_oof.json, predictions_oof.csv   a cross-validation run
      .train.lock                   held (and holding its pid) while a `train` writes the folder

Reading this module needs neither torch nor pandas (pandas is imported by the table readers only), so
the torch-free paths (``xrai.data``, the ONNX server) can use the names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrai.fileio import atomic_write_csv, atomic_write_json, atomic_write_text
from xrai.labels import class_names

__all__ = [
    "AUDIT_CSV",
    "CHECKPOINTS_DIR",
    "CONFIG_JSON",
    "CV_JSON",
    "DAMAGED_CSV",
    "FOLDS_DIR",
    "GRADCAM_DIR",
    "HISTORY_CSV",
    "ID_COLUMNS",
    "MANIFEST_CSV",
    "MANIFEST_JSON",
    "MODEL_CARD_MD",
    "THRESHOLD_JSON",
    "TRAIN_LOCK",
    "SPLIT_IMAGES_ZIP",
    "RunFolder",
    "read_json",
    "read_predictions",
    "write_json",
]

MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
AUDIT_CSV = "audit.csv"
CONFIG_JSON = "config.json"
HISTORY_CSV = "history.csv"
CHECKPOINTS_DIR = "checkpoints"
MODEL_CARD_MD = "model_card.md"
GRADCAM_DIR = "gradcam"
CV_JSON = "cv.json"  # marks a cross-validation run folder
FOLDS_DIR = "folds"
# Where a run without a validation split of its own (a final fit on all of a CV's pool) keeps the
# operating point it was given: the CV's out-of-fold one, {"threshold_from": "oof", ...}.
THRESHOLD_JSON = "threshold.json"
# The original files of the images 04 and 05 score (valid and test), one uncompressed zip with their
# manifest-relative paths (xrai.data.archive): a fresh Colab runtime reads them from Drive, no download.
SPLIT_IMAGES_ZIP = "split_images.zip"
DAMAGED_CSV = "damaged_images.csv"  # images training, evaluate or a gallery found truncated or unreadable (DamagedImages)
# Held by the training process (rank 0) for the whole run, so a second `train` into the same folder
# fails at once instead of replacing the first's checkpoints; removed when training ends.
TRAIN_LOCK = ".train.lock"
# Columns of a predictions or manifest table read as strings ("" for none), never as numbers.
ID_COLUMNS = ("path", "body_part", "patient_id", "study_id", "group")


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON file's object, or None when the file is not there."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Strict JSON (NaN is refused: undefined metrics are null), written atomically."""
    return atomic_write_json(path, obj, allow_nan=False)


def read_predictions(path: str | os.PathLike):
    """A predictions_<split>.csv back as a DataFrame, ids as strings ("" for none)."""
    import pandas as pd  # deliberate: this module stays pandas-free at import (see the docstring)

    return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS}, keep_default_na=False)


@dataclass(frozen=True)
class RunFolder:
    """One run folder: the path of each of its files, and their readers and writers.

    Loading a run (``xrai.runs.load``) only reads; ``evaluate`` and the trainer write.
    """

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # ---- names ----
    @property
    def manifest_csv(self) -> Path:
        return self.path / MANIFEST_CSV

    @property
    def manifest_json(self) -> Path:
        return self.path / MANIFEST_JSON

    @property
    def split_images_zip(self) -> Path:
        return self.path / SPLIT_IMAGES_ZIP

    @property
    def audit_csv(self) -> Path:
        return self.path / AUDIT_CSV

    @property
    def config_json(self) -> Path:
        return self.path / CONFIG_JSON

    @property
    def history_csv(self) -> Path:
        return self.path / HISTORY_CSV

    @property
    def train_lock(self) -> Path:
        return self.path / TRAIN_LOCK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def model_card(self) -> Path:
        return self.path / MODEL_CARD_MD

    @property
    def gradcam(self) -> Path:
        return self.path / GRADCAM_DIR

    @property
    def cv_json(self) -> Path:
        return self.path / CV_JSON

    @property
    def threshold_json(self) -> Path:
        return self.path / THRESHOLD_JSON

    @property
    def damaged_csv(self) -> Path:
        return self.path / DAMAGED_CSV

    def checkpoint(self, which: str = "best") -> Path:
        """checkpoints/<which>.pt ("best" or "last")."""
        return self.checkpoints / f"{which}.pt"

    def predictions_csv(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def report_json(self, split: str) -> Path:
        return self.path / f"report_{split}.json"

    def fold(self, k: int) -> RunFolder:
        """folds/<k>/ of a cross-validation run: a run folder of its own."""
        return RunFolder(self.path / FOLDS_DIR / str(k))

    # ---- what kind of run ----
    @property
    def is_cv(self) -> bool:
        """Whether this is a cross-validation run (it holds cv.json)."""
        return self.cv_json.is_file()

    def cv_folds(self) -> int | None:
        """A cross-validation run's number of folds (cv.json "folds"); None when the folder is not one."""
        cv = read_json(self.cv_json)
        return None if cv is None else int(cv["folds"])

    @property
    def operating_point_file(self) -> Path:
        """The file holding the run's operating point: report_valid.json; a CV run's report_oof.json
        (chosen on its out-of-fold predictions); a final fit's threshold.json (the CV's, given to it)."""
        if self.is_cv:
            return self.report_json("oof")
        if self.threshold_json.is_file():
            return self.threshold_json
        return self.report_json("valid")

    # ---- readers ----
    @property
    def source(self) -> str | None:
        """The dataset the run's manifest came from (manifest.json "source"), or None."""
        return (read_json(self.manifest_json) or {}).get("source")

    def class_names(self) -> tuple[str, str]:
        """The words for label 0 and 1 of this run's dataset (``xrai.labels.class_names``)."""
        return class_names(self.source)

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict ({} when the run has none yet)."""
        return read_json(self.config_json) or {}

    def read_report(self, split: str) -> dict[str, Any] | None:
        return read_json(self.report_json(split))

    def read_predictions(self, split: str):
        return read_predictions(self.predictions_csv(split))

    def read_history(self):
        """history.csv as a DataFrame, or None before the first epoch ends."""
        import pandas as pd  # deliberate: pandas-free at import

        return pd.read_csv(self.history_csv) if self.history_csv.is_file() else None

    def read_audit(self):
        """audit.csv as a DataFrame, or None when the run was not audited."""
        import pandas as pd  # deliberate: pandas-free at import

        if not self.audit_csv.is_file():
            return None
        return pd.read_csv(self.audit_csv, dtype={"path": str, "crosses": str}, keep_default_na=False)

    # ---- writers (evaluate and the trainer; never a loader) ----
    def write_report(self, split: str, report: dict[str, Any]) -> Path:
        return write_json(report, self.report_json(split))

    def write_predictions(self, split: str, table: Any) -> Path:
        return atomic_write_csv(self.predictions_csv(split), table)

    def write_audit(self, table: Any) -> Path:
        return atomic_write_csv(self.audit_csv, table)

    def write_model_card(self, text: str) -> Path:
        return atomic_write_text(self.model_card, text)
