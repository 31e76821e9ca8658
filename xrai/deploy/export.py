"""``python -m xrai export``: a run's model as ONNX or TorchScript, with its preprocessing contract.

The exported graph takes the normalised input batch (B, 3, S, S), float32, B free (a dynamic batch
axis), and returns ``logit`` (B,) and ``probability`` (B,) = sigmoid(a * logit + b), the run's
calibrated P(abnormal). What it exports is what ``xrai.runs.load.load_run`` loads: the run's
checkpoint (``best`` by default), or, for a cross-validation run, its fold ensemble (probabilities
averaged), at the operating point chosen on validation for that very checkpoint.

Beside the model, ``<model file>.json`` (the sidecar) holds everything needed to use it without
xrai's training code: the preprocessing contract (``xrai.data.contract``: input size, resize size
and mode, normalisation), the calibration (method, slope a, intercept b; ``temperature`` = 1/a for
older readers), the image and study thresholds and where they came
from, the checkpoint's sha256, and the output names. ``xrai.deploy.onnx_runtime`` reads it back (without torch)
and the app serves it (``serve --onnx``). Every export is checked before it is written: onnx's
checker, then onnxruntime (or the TorchScript module) on a batch of another size than the one traced,
against PyTorch, within ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import importlib.util
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrai import __version__
from xrai.data.contract import InputContract, prepare
from xrai.deploy.app import RESEARCH_NOTICE
from xrai.deploy.onnx_runtime import SIDECAR_VERSION, cpu_session, sidecar_path
from xrai.errors import UserError, first_lines
from xrai.fileio import atomic_write_bytes, atomic_write_json
from xrai.models.logits import flip_tta_logits
from xrai.runs.layout import RunFolder
from xrai.runs.load import load_run
from xrai.runs.operating import Calibration

__all__ = ["FORMATS", "ONNX_EXTRA", "OPSET", "PARITY_TOLERANCE", "CalibratedModel", "ExportError", "ExportResult",
           "example_batch", "export_run", "onnx_bytes", "onnx_available"]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
ONNX_EXTRA = 'pip install "xrai[onnx]"'
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAMES = ("logit", "probability")
PARITY_TOLERANCE = 1e-4  # largest |probability| difference an export may show against PyTorch


class ExportError(UserError, RuntimeError):
    """An export that cannot be made here (a missing package) or that failed its own check."""


class CalibratedModel(nn.Module):
    """A one-logit model with its calibration: (B, 3, S, S) -> (logit (B,), sigmoid(a * logit + b) (B,)).

    With ``tta`` (the run's recipe scores each image with its mirror) the logit is the run's flip-TTA
    logit (``xrai.runs.load.flip_tta_logits``), so the export decides as the run does.
    """

    def __init__(self, model: nn.Module, temperature: float | Calibration = 1.0, *, tta: bool = False) -> None:
        super().__init__()
        calibration = temperature if isinstance(temperature, Calibration) else Calibration.from_temperature(temperature)
        self.model = model
        self.slope, self.intercept = float(calibration.slope), float(calibration.intercept)
        self.temperature = calibration.temperature
        self.tta = bool(tta)

    def _logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().reshape(x.shape[0], -1)[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = flip_tta_logits(self._logit, x) if self.tta else self._logit(x)
        return logit, torch.sigmoid(logit * self.slope + self.intercept)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the model file, its sidecar and the largest difference from PyTorch."""

    path: Path
    sidecar: Path
    max_difference: float


def export_run(run_dir: str | Path, *, fmt: str = "onnx", which: str = "best", out: str | Path | None = None) -> ExportResult:
    """Export a run's model (or CV ensemble) with its sidecar JSON; check it before writing.

    Args:
        run_dir: the run folder.
        fmt: "onnx" or "torchscript".
        which: the checkpoint, "best" or "last".
        out: the model file (default ``RUN_DIR/model.onnx`` or ``RUN_DIR/model.torchscript.pt``).
    Returns:
        ExportResult.
    Raises:
        ValueError: unknown format. FileNotFoundError: no checkpoint. ExportError: a missing package
        (the message names the extra) or an export that fails its check. StaleOperatingPointError:
        the run's operating point was chosen with another checkpoint (export reads only; the message
        names the command that chooses it again).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    run_dir = Path(run_dir)
    run = load_run(run_dir, which=which, device="cpu")
    contract = InputContract.from_config(run.config)
    wrapped = CalibratedModel(run.model, run.calibration, tta=bool(getattr(run.config, "tta", False))).eval()
    path = Path(out) if out is not None else run_dir / FORMATS[fmt]
    example = example_batch(contract, batch=2)
    data = onnx_bytes(wrapped, example) if fmt == "onnx" else _torchscript_bytes(wrapped, example)
    difference = _check(fmt, data, wrapped, example_batch(contract, batch=3, seed=1))
    atomic_write_bytes(path, data)
    sidecar = atomic_write_json(sidecar_path(path), _sidecar(run, contract, fmt=fmt, path=path, difference=difference))
    return ExportResult(path=path, sidecar=sidecar, max_difference=difference)


def onnx_available() -> bool:
    """Whether this environment can export and run ONNX (torch >= 2.5, onnx, onnxscript, onnxruntime)."""
    try:
        _require_onnx()
    except ExportError:
        return False
    return True


def _require_onnx() -> None:
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
        raise ExportError(f"ONNX export needs torch >= 2.5 (torch.export with dynamic shapes); this is "
                          f"{torch.__version__}: upgrade torch")
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: {ONNX_EXTRA}")


def example_batch(contract: InputContract, *, batch: int, seed: int = 0) -> torch.Tensor:
    """A normalised input batch with the contract's shape (random pixels: the trace needs no real image)."""
    rng = np.random.default_rng(seed)
    side = contract.resize_size
    images = [rng.integers(0, 256, (side, max(1, side - 7 * i)), dtype=np.uint8) for i in range(batch)]
    return torch.from_numpy(prepare(images, contract))


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX bytes of ``model`` (a CalibratedModel), exported by torch.export (dynamo) with a dynamic
    batch axis and checked by onnx's checker; ``example`` is a normalised input batch."""
    import onnx  # deliberate: an optional extra (xrai[onnx]); _require_onnx says so before this runs

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},),
                                opset_version=OPSET, external_data=False, verbose=False)
    proto = program.model_proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported ONNX graph fails onnx's checker: {first_lines(error)}") from error
    return proto.SerializeToString()


def _torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The TorchScript bytes (torch.jit.trace; PyTorch deprecates TorchScript for torch.export)."""
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_inputs=[(example[:1],)])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _check(fmt: str, data: bytes, model: nn.Module, x: torch.Tensor) -> float:
    """Largest |probability| difference of the exported bytes against PyTorch, on a batch of another size."""
    with torch.inference_mode():
        expected = model(x)[1].numpy()
    if fmt == "onnx":
        got = cpu_session(data).run(["probability"], {INPUT_NAME: x.numpy()})[0]
    else:
        loaded = torch.jit.load(io.BytesIO(data))
        with torch.inference_mode():
            got = loaded(x)[1].numpy()
    difference = float(np.abs(got.reshape(-1) - expected.reshape(-1)).max())
    if got.shape != expected.shape or not difference <= PARITY_TOLERANCE:
        raise ExportError(f"the {fmt} export differs from PyTorch by {difference:.2e} (shape {got.shape} vs "
                          f"{expected.shape}); not written")
    return difference


def _sidecar(run: Any, contract: InputContract, *, fmt: str, path: Path, difference: float) -> dict[str, Any]:
    config = run.config
    names = RunFolder(run.run_dir).class_names()
    cv = _cv_summary(run.run_dir)
    return {
        "xrai_export": SIDECAR_VERSION,
        "format": fmt,
        "file": path.name,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "xrai_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "opset": OPSET if fmt == "onnx" else None,
        "run": run.run_dir.resolve().name,
        "model": str(getattr(run.model, "xrai_name", config.model)),
        "architecture": config.model,
        "checkpoint": {"which": run.which, "sha256": run.checkpoint_sha256},
        "ensemble": cv,
        "input": {"name": INPUT_NAME, **contract.to_dict()},
        "tta": bool(getattr(config, "tta", False)),
        "outputs": {"logit": "the model's logit for 'abnormal' (with flip TTA inside the graph when tta), shape (batch,)",
                    "probability": "sigmoid(slope * logit + intercept): calibrated P(abnormal), shape (batch,)"},
        "calibration": run.calibration.to_dict(),
        "temperature": run.temperature,
        "calibrated": bool(run.calibrated),
        "threshold": run.threshold,
        "study_threshold": run.study_threshold,
        "threshold_from": run.threshold_from,
        "labels": {str(label): name for label, name in enumerate(names)},
        "decision": f"{names[1]} when probability >= threshold",
        "parity_max_difference": difference,
        "research_only": RESEARCH_NOTICE,
    }


def _cv_summary(run_dir: Path) -> dict[str, Any] | None:
    """{"folds": k} for a cross-validation run (its fold ensemble is what is exported), else None."""
    folds = RunFolder(run_dir).cv_folds()
    if folds is None:
        return None
    return {"kind": "cross-validation fold ensemble (mean of the folds' probabilities)", "folds": folds}
