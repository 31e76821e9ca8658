"""The module paths of the flat layout (before 0.2), kept for one release as lazy aliases that warn once.

``import xrai.inference`` (or ``from xrai.explain_metrics import explanation_table``) still works: the
finder below answers for the old name with the module that now holds the code, and says where it went
in one FutureWarning. Nothing is imported until an old name is asked for. docs/design.md, "Layout",
has the table of what moved where.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old module -> new module (the old flat modules of xrai/ and xrai/data/)
MOVED = {
    "xrai.app": "xrai.deploy.app",
    "xrai.bench_report": "xrai.bench.report",
    "xrai.calibration": "xrai.evaluate.calibration",
    "xrai.checkpoint": "xrai.models.checkpoint",
    "xrai.cv": "xrai.train.cv",
    "xrai.data.dicom": "xrai.data.decode.dicom",
    "xrai.data.images": "xrai.data.decode.images",
    "xrai.distributed": "xrai.train.distributed",
    "xrai.ensemble": "xrai.models.ensemble",
    "xrai.explain_metrics": "xrai.evaluate.scores",
    "xrai.export": "xrai.deploy.export",
    "xrai.exported": "xrai.deploy.onnx_runtime",
    "xrai.inference": "xrai.runs.load",
    "xrai.latency": "xrai.bench.latency",
    "xrai.launch": "xrai.train.launcher",
    "xrai.memcheck": "xrai.bench.memcheck",
    "xrai.metrics": "xrai.evaluate.metrics",
    "xrai.model_card": "xrai.evaluate.card",
    "xrai.pruning": "xrai.models.pruning",
    "xrai.regularise": "xrai.train.regularise",
    "xrai.report": "xrai.evaluate.report",
    "xrai.scaling": "xrai.bench.scaling",
    "xrai.server": "xrai.deploy.server",
    "xrai.tracking": "xrai.train.tracking",
    "xrai.wheelhouse": "xrai.deploy.wheelhouse",
}

_warned: set[str] = set()


def moved(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Say once per old name that it moved (a FutureWarning: shown in notebooks and scripts alike)."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} moved to {new} in xrai 0.2; the old name goes in the next release",
                  FutureWarning, stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        moved(self.old, self.new, stacklevel=6)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        sys.modules[self.old] = module  # the new module itself: one set of globals, old name and new


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 (the finder protocol)
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


def install() -> None:
    """Put the alias finder on sys.meta_path (after the real finders: a real module always wins)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
