"""An exported model (``python -m xrai export``) run with onnxruntime and numpy: no torch needed.

``load_export("RUN_DIR/model.onnx")`` reads the sidecar JSON next to the file (the preprocessing
contract, temperature, thresholds) and opens an onnxruntime session; ``probabilities(images)`` takes
decoded uint8 grey images (``xrai.data.decode.images.decode_image``, DICOM included) through
``xrai.data.contract.prepare`` to the calibrated probabilities the run itself would give. This module
and everything it imports stay free of torch, pandas and scikit-learn, so the app can serve an
export from a small image (the Dockerfile's ``onnx`` target).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrai.data.contract import InputContract, prepare
from xrai.errors import UserError, first_lines

__all__ = ["ONNX_RUNTIME_EXTRA", "SIDECAR_VERSION", "SIDECAR_VERSIONS", "ExportFileError", "ExportedModel",
           "cpu_session", "load_export", "read_sidecar", "sidecar_path"]

ONNX_RUNTIME_EXTRA = 'pip install onnxruntime (or "xrai[onnx]")'
SIDECAR_VERSION = 1  # the sidecar format ``python -m xrai export`` writes ("xrai_export")
SIDECAR_VERSIONS = (SIDECAR_VERSION,)  # the ones this xrai reads


class ExportFileError(UserError, ValueError):
    """A missing or unreadable export or sidecar; the message names the file and what makes it."""


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The sidecar JSON of an exported model: ``model.onnx`` -> ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar JSON of an exported model (``model.onnx`` -> ``model.onnx.json``), checked."""
    model_path = Path(model_path)
    sidecar = sidecar_path(model_path)
    if not model_path.is_file():
        raise ExportFileError(f"no exported model {model_path}; make it with `python -m xrai export --run RUN_DIR "
                              "--format onnx`")
    if not sidecar.is_file():
        raise ExportFileError(f"no sidecar {sidecar} beside {model_path.name} (it holds the preprocessing, threshold "
                              "and temperature); export the run again with `python -m xrai export`")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFileError(f"{sidecar} is not valid JSON ({error}); export the run again") from error
    missing = [k for k in ("xrai_export", "format", "input", "threshold", "temperature") if k not in data]
    if missing:
        raise ExportFileError(f"{sidecar} lacks {', '.join(missing)}: not an xrai export sidecar")
    if data["xrai_export"] not in SIDECAR_VERSIONS:
        raise ExportFileError(f"{sidecar} is sidecar version {data['xrai_export']}; this xrai reads "
                              f"{SIDECAR_VERSIONS}: update xrai or export again")
    return data


@dataclass(eq=False)
class ExportedModel:
    """An ONNX export with its sidecar; ``probabilities`` is thread-safe (onnxruntime sessions are)."""

    path: Path
    sidecar: dict[str, Any]
    session: Any = field(repr=False)
    contract: InputContract = field(init=False)

    def __post_init__(self) -> None:
        self.contract = InputContract.from_dict(self.sidecar["input"])

    @property
    def threshold(self) -> float:
        return float(self.sidecar["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.sidecar["temperature"])

    @property
    def calibration(self) -> dict[str, Any]:
        """method, slope, intercept: the graph's probability is sigmoid(slope * logit + intercept) (an older
        sidecar's temperature T: slope 1/T, intercept 0)."""
        return self.sidecar.get("calibration") or {"method": "temperature", "slope": 1.0 / self.temperature,
                                                   "intercept": 0.0}

    @property
    def model_name(self) -> str:
        return str(self.sidecar.get("model") or self.sidecar.get("architecture") or self.path.stem)

    @property
    def run(self) -> str:
        return str(self.sidecar.get("run") or self.path.parent.name)

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logit, calibrated probability), float64 (B,), for a prepared float32 batch (B, 3, S, S)."""
        name = self.sidecar["input"].get("name", "input")
        logit, probability = self.session.run(["logit", "probability"], {name: np.ascontiguousarray(x, np.float32)})
        return logit.astype(np.float64).reshape(-1), probability.astype(np.float64).reshape(-1)

    def probabilities(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Calibrated P(abnormal) per decoded uint8 (H, W) image, float64 (B,)."""
        return self.outputs(prepare(images, self.contract))[1]


def load_export(path: str | os.PathLike, *, threads: int | None = None) -> ExportedModel:
    """Open an ONNX export for inference on the CPU.

    Args:
        path: the ``.onnx`` file (its ``.onnx.json`` sidecar beside it).
        threads: onnxruntime's intra-op threads (default: onnxruntime's own choice).
    Raises:
        ExportFileError: no such file, no or a bad sidecar, not an ONNX export. UserError: no onnxruntime.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    if sidecar["format"] != "onnx":
        raise ExportFileError(f"{path} is a {sidecar['format']} export; serving without torch needs the ONNX one "
                              "(`python -m xrai export --run RUN_DIR --format onnx`)")
    try:
        session = cpu_session(path, threads=threads)
    except ImportError as error:
        raise UserError(f"serving {path.name} needs onnxruntime: {ONNX_RUNTIME_EXTRA}") from error
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise ExportFileError(f"{path} cannot be loaded by onnxruntime ({first_lines(error)}); export the run "
                              "again") from error
    return ExportedModel(path=path, sidecar=sidecar, session=session)


def cpu_session(model: str | os.PathLike | bytes, *, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU for an ONNX file or its bytes.

    Args:
        threads: intra-op threads (and one inter-op thread); default: onnxruntime's own choice.
    Raises:
        ImportError: no onnxruntime. onnxruntime's own errors for a bad model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
