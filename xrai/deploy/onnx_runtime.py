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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrai.config import MAX_IMG_SIZE
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
    if not isinstance(data, dict):
        raise ExportFileError(f"{sidecar} holds {type(data).__name__} {first_lines(json.dumps(data))[:40]}, not a "
                              f"JSON object: not an xrai export sidecar; {_EXPORT_AGAIN}")
    missing = [k for k in ("xrai_export", "format", "input", "threshold", "temperature") if k not in data]
    if missing:
        raise ExportFileError(f"{sidecar} lacks {', '.join(missing)}: not an xrai export sidecar")
    if data["xrai_export"] not in SIDECAR_VERSIONS:
        raise ExportFileError(f"{sidecar} is sidecar version {data['xrai_export']}; this xrai reads "
                              f"{SIDECAR_VERSIONS}: update xrai or export again")
    _check_sidecar(data, sidecar)
    return data


_EXPORT_AGAIN = "the file was edited or damaged: export the run again with `python -m xrai export`"


def _check_sidecar(data: dict[str, Any], sidecar: Path) -> None:
    """The sidecar's values that decide a prediction, checked before any is used (a tampered or damaged
    sidecar: one line naming the file and the field, never a server that starts and then answers 500)."""
    def bad(field_name: str, value: Any, want: str) -> ExportFileError:
        return ExportFileError(f"{sidecar}: {field_name} is {value!r}, {want}; {_EXPORT_AGAIN}")

    def number(section: dict[str, Any], key: str, prefix: str = "") -> float:
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(prefix + key, value, "not a finite number")
        return float(value)

    for key in ("threshold", "study_threshold"):
        if key == "study_threshold" and data.get(key) is None:
            continue
        if not 0.0 <= number(data, key) <= 1.0:
            raise bad(key, data[key], "outside [0, 1]")
    if number(data, "temperature") <= 0:
        raise bad("temperature", data["temperature"], "not > 0")
    calibration = data.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise bad("calibration", calibration, "not an object with slope and intercept")
        if number(calibration, "slope", "calibration.") <= 0:
            raise bad("calibration.slope", calibration["slope"], "not > 0")
        number(calibration, "intercept", "calibration.")
    _check_input(data.get("input"), bad)


def _check_input(section: Any, bad: Any) -> None:
    """The sidecar's ``input``: an object with an integer image_size and resize_size in [1, MAX_IMG_SIZE]
    (resize_size up to twice that) and a contract InputContract reads."""
    if not isinstance(section, dict):
        raise bad("input", section, "not an object (the preprocessing contract)")
    for key, high in (("image_size", MAX_IMG_SIZE), ("resize_size", 2 * MAX_IMG_SIZE)):
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise bad(f"input.{key}", value, f"not an integer in [1, {high}]")
    name = section.get("name", "input")
    if not isinstance(name, str) or not name:
        raise bad("input.name", name, "not the name of the graph's input")
    try:
        InputContract.from_dict(section)
    except (TypeError, ValueError) as error:
        raise bad("input", {k: section[k] for k in ("resize", "mean", "std") if k in section},
                  f"not a preprocessing contract ({first_lines(error)})") from None


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
    _check_graph_input(session, sidecar, sidecar_path(path))
    return ExportedModel(path=path, sidecar=sidecar, session=session)


def _check_graph_input(session: Any, sidecar: dict[str, Any], where: Path) -> None:
    """The sidecar's input name is the graph's, and its image_size the graph's static side (if fixed)."""
    name = sidecar["input"].get("name", "input")
    inputs = {i.name: i for i in session.get_inputs()}
    if name not in inputs:
        raise ExportFileError(f"{where}: input.name is {name!r}, but the graph's inputs are {sorted(inputs)}; "
                              f"{_EXPORT_AGAIN}")
    outputs = {o.name for o in session.get_outputs()}
    if not {"logit", "probability"} <= outputs:
        raise ExportFileError(f"{where.with_suffix('')} has outputs {sorted(outputs)}, not logit and probability: "
                              "not an xrai export; export the run again")
    side = sidecar["input"]["image_size"]
    shape = list(inputs[name].shape or [])
    fixed = [d for d in shape[2:] if isinstance(d, int)]
    if len(shape) != 4 or any(d != side for d in fixed):
        raise ExportFileError(f"{where}: input.image_size is {side}, but the graph takes {shape}; {_EXPORT_AGAIN}")


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
