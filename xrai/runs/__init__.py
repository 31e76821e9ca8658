"""The run folder and what reads it.

- ``xrai.runs.layout``: the one owner of a run folder's file names, readers and writers (no torch).
- ``xrai.runs.operating``: the operating point (temperature, thresholds) bound to a checkpoint's sha256.
- ``xrai.runs.load``: ``load_run``, a run's model with its operating point; it only reads.
- ``xrai.runs.table``: ``run_dir_for`` (the folder a setting trains into) and ``runs_table`` (the runs under a
  folder side by side); pandas, no torch.

``from xrai.runs import load_run`` works too; the torch- and pandas-bound names load on first use, so
importing ``xrai.runs.layout`` from the torch-free paths (the ONNX server) imports neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from xrai.runs.layout import RunFolder, read_json, read_predictions, write_json

__all__ = ["RunFolder", "RunModel", "load_run", "read_json", "read_predictions", "run_dir_for", "runs_table",
           "write_json"]

_LAZY = {"load_run": "xrai.runs.load", "RunModel": "xrai.runs.load", "run_dir_for": "xrai.runs.table",
         "runs_table": "xrai.runs.table"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xrai.runs' has no attribute {name!r}")
