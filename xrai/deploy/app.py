"""Flask upload page and JSON API: one X-ray in; probability, label and Grad-CAM overlay out.

The model and the run's threshold are loaded once, when the app is made. Uploads are decoded by
xrai's one safe decoder (``decode_image``) under the upload budget (``UPLOAD_MAX_DECODED_BYTES``,
checked from the header before decoding), so a non-image or an image truncated beyond repair is a
400, and an upload over 10 MB, or one whose pixels would decode to more than the budget (a
decompression bomb), is a 413 naming the limit; bad input never reaches a 500. Decoding runs
outside the model's lock (at most ``PARALLEL_DECODES`` at a time, which bounds its memory); Grad-CAM
hooks are stateful, so one lock lets one inference at a time through the model and the CAM. The
production server around the app is ``xrai.deploy.server``.

Uploads may be PNG, JPEG or DICOM (recognised by content; windowed as the file says, patient tags
never read). The app serves either a run folder (``Predictor``: PyTorch, with Grad-CAM) or an
exported ONNX model (``OnnxPredictor``: onnxruntime and numpy, no Grad-CAM, since a CAM needs the
model's gradients). This module imports neither torch nor pandas at import time: the ONNX mode runs
where torch is not installed (the Dockerfile's ``onnx`` target).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, current_app, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from xrai.data.contract import model_normalisation
from xrai.data.decode.images import (
    UPLOAD_MAX_DECODED_BYTES,
    UPLOAD_REMEDY,
    ImageError,
    ImageTooLargeError,
    decode_image,
)
from xrai.deploy.onnx_runtime import load_export
from xrai.labels import CLASS_NAMES
from xrai.runs.layout import RunFolder

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Multipart parts in one request: the form has two (file, overlay); werkzeug would parse up to 1,000,
# each with its own headers and buffers, before the app saw any. Over it: 413, "too many parts".
MAX_FORM_PARTS = 16
PARALLEL_DECODES = 2  # uploads decoded at once: peak decode memory is about this x 1.5 x the budget
RESEARCH_NOTICE = "For research and teaching only: not a medical device, not for diagnosis."
DISPLAY_SIDE = 1024  # longest side of the overlay sent back: a 3000 px one would be megabytes
UPLOAD_FORMATS = "PNG, JPEG or DICOM"
UPLOAD_ACCEPT = "image/png,image/jpeg,application/dicom,.dcm,.dicom"  # DICOM without an extension: "All files"
NO_CAM_NOTE = ("No Grad-CAM overlay: this server runs an ONNX export, which carries no gradients, and Grad-CAM "
               "needs them. Serve the run folder (python -m xrai serve --run RUN_DIR) to see where the model looked.")
_TRUE = {"1", "true", "yes", "on"}
# Everything the page needs is inline, so it works offline; the policy makes sure of it.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'")

logger = logging.getLogger(__name__)


class UploadError(ValueError):
    """An upload the app refuses (missing, empty, not a usable image): the message is for the user."""


class UploadTooLargeError(UploadError):
    """An upload whose decoded pixels would exceed the upload budget: answered with 413."""


@dataclass(kw_only=True)
class Prediction:
    """One image's result, with the images to show as PNG bytes."""

    probability: float
    label: int
    threshold: float
    overlay_png: bytes | None = None
    notes: list[str] = field(default_factory=list)
    names: tuple[str, str] = CLASS_NAMES  # the words for label 0 and 1 (xrai.labels.class_names of the source)

    @property
    def label_name(self) -> str:
        return self.names[self.label]


class BasePredictor:
    """What both predictors share: upload decoding under the budget, the threshold, one inference at a time.

    Subclasses set run, run_dir, which, model_name, threshold, threshold_note, class_names and ``backend``,
    and implement ``_infer``; ``cam_note`` says why there is no overlay where a backend cannot draw one.
    """

    backend = ""
    cam_note = ""
    class_names: tuple[str, str] = CLASS_NAMES
    run: str
    run_dir: Path
    which: str
    model_name: str
    threshold: float
    threshold_note: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decodes = threading.BoundedSemaphore(PARALLEL_DECODES)

    @property
    def draws_cam(self) -> bool:
        return not self.cam_note

    def predict(self, data: bytes, *, filename: str = "upload", with_overlay: bool = True) -> Prediction:
        """Decode ``data``, run the model and (if asked and possible) Grad-CAM; raise UploadError for bad input."""
        if not data:
            raise UploadError(f"the uploaded file {filename!r} is empty")
        image, notes = self.decode(data, filename=filename)
        with_overlay = with_overlay and self.draws_cam
        with self._lock:  # the model and its Grad-CAM hooks: one inference at a time
            probability, cam = self._infer(image, with_cam=with_overlay)
        label = int(probability >= self.threshold)
        overlay_png = self._draw(image, cam, label=label, probability=probability) if with_overlay else None
        return Prediction(probability=probability, label=label, threshold=self.threshold,
                          overlay_png=overlay_png, notes=notes, names=self.class_names)

    def decode(self, data: bytes, *, filename: str) -> tuple[np.ndarray, list[str]]:
        """The upload as a grey uint8 image and notes for the user, within the upload budget.

        Runs outside the inference lock, ``PARALLEL_DECODES`` at a time. Raises UploadTooLargeError
        (over the budget, from the header) or UploadError (not a usable image).
        """
        with self._decodes:
            try:
                image, notes = decode_image(data, name=filename, max_bytes=UPLOAD_MAX_DECODED_BYTES,
                                            remedy=UPLOAD_REMEDY)
            except ImageTooLargeError as exc:
                raise UploadTooLargeError(str(exc)) from exc
            except ImageError as exc:
                raise UploadError(str(exc)) from exc
        for note in notes:
            logger.warning("%s", note)
        return image, notes

    def _infer(self, image: np.ndarray, *, with_cam: bool) -> tuple[float, np.ndarray | None]:
        """Probability of "abnormal" and, if asked and possible, the CAM in the model's input frame."""
        raise NotImplementedError

    def _draw(self, image: np.ndarray, cam: np.ndarray, *, label: int, probability: float) -> bytes:
        """The overlay as PNG bytes (backends that draw CAMs only)."""
        raise NotImplementedError(f"the {self.backend} backend draws no overlay: {self.cam_note}")


class Predictor(BasePredictor):
    """A run's model and threshold, loaded once; ``predict`` is safe to call from many threads.

    Args:
        run_dir: the run folder (config.json, checkpoints/<which>.pt, report_valid.json if evaluated).
        which: the checkpoint to load, "best" or "last".
        device: "cpu", "cuda", "auto", ... (resolved by ``xrai.env.get_device``).
    """

    backend = "pytorch"

    def __init__(self, run_dir: str | Path, *, which: str = "best", device: str = "cpu") -> None:
        from xrai.runs.load import load_run  # deliberate: torch, which the ONNX mode must not import

        super().__init__()
        self.run_dir = Path(run_dir).resolve()
        self.run = self.run_dir.name
        self.which = which
        self.class_names = RunFolder(self.run_dir).class_names()
        # The threshold and temperature chosen on valid for this checkpoint (re-chosen if it changed); the
        # device resolved by load_run, the model in eval mode (load_model's).
        self.loaded = load_run(self.run_dir, which=which, device=device)
        self.device = self.loaded.device
        self.model, self.config = self.loaded.model, self.loaded.config
        self.model_name = str(getattr(self.model, "xrai_name", self.config.model))
        self.threshold = self.loaded.threshold
        self.threshold_note = "" if self.loaded.point.source != "default" else f"default: {self.loaded.point.note}"
        if self.threshold_note:
            logger.warning("run %s: threshold 0.5 (%s); `python -m xrai evaluate --run %s` sets the run's own",
                           self.run, self.loaded.point.note, self.run_dir)

    def _infer(self, image: np.ndarray, *, with_cam: bool) -> tuple[float, np.ndarray | None]:
        """Probability of "abnormal" and, if asked, the Grad-CAM in the model's input frame."""
        # deliberate: torch (and grad-cam), which the ONNX mode must not import
        from xrai.data.augment import preprocess
        from xrai.explain.cam import CamExplainer

        x = preprocess([image], image_size=self.config.image_size, resize_size=self.config.resize_size,
                       device=self.device, resize=self.config.resize,
                       **model_normalisation(self.config.model))
        if not with_cam:
            return float(self.loaded.probabilities(x)[0][0]), None
        # A fresh explainer per request: its context manager always removes the hooks it adds, and
        # the probability (calibrated) comes from the same forward pass as the map.
        with CamExplainer(self.model) as explainer:
            cam = explainer(x, target_class=1)[0]
            probability = float(self.loaded.calibrate(self.loaded.tta_logits(x, explainer.logits).cpu())[0])
        return probability, cam

    def _draw(self, image: np.ndarray, cam: np.ndarray, *, label: int, probability: float) -> bytes:
        from xrai.explain.overlays import overlay  # deliberate: cv2 and grad-cam (torch), not in the ONNX image

        # Drawn on a display-sized copy: a 60 Mpx upload would need gigabytes at full size.
        rgb = overlay(_shrink(image, DISPLAY_SIDE), cam, predicted=label, probability=probability,
                      threshold=self.threshold, resize_size=self.config.resize_size, resize=self.config.resize,
                      names=self.class_names)
        return _png_bytes(rgb)


class OnnxPredictor(BasePredictor):
    """An exported model (``python -m xrai export``) run by onnxruntime with the numpy contract; no torch.

    Args:
        model_path: the ``model.onnx`` file, its ``model.onnx.json`` sidecar beside it.
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    backend = "onnxruntime"
    cam_note = NO_CAM_NOTE

    def __init__(self, model_path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        self.export = load_export(model_path, threads=threads)
        self.run_dir = self.export.path.parent.resolve()
        self.run = self.export.run
        self.which = f"{self.export.path.name} ({self.export.sidecar.get('checkpoint', {}).get('which', 'export')})"
        self.model_name = self.export.model_name
        self.threshold = self.export.threshold
        point = str(self.export.sidecar.get("threshold_from", ""))
        self.threshold_note = "" if point.startswith("valid") or point.startswith("oof") else point
        labels = self.export.sidecar.get("labels") or {}
        self.class_names = (str(labels.get("0", CLASS_NAMES[0])), str(labels.get("1", CLASS_NAMES[1])))

    def _infer(self, image: np.ndarray, *, with_cam: bool) -> tuple[float, None]:
        return float(self.export.probabilities([image])[0]), None


def create_app(run_dir: str | Path | None = None, *, onnx: str | Path | None = None, which: str = "best",
               device: str = "cpu", threads: int | None = None) -> Flask:
    """Build the Flask app serving one run or one ONNX export: GET/POST /, POST /api/predict, GET /healthz,
    GET /model_card.

    Args:
        run_dir: the run folder made by ``python -m xrai demo`` or ``train`` (PyTorch, Grad-CAM).
        onnx: instead, an exported ``model.onnx`` (onnxruntime; no torch needed, no Grad-CAM).
        which: the checkpoint, "best" or "last" (run folders).
        device: where the model runs; "cpu" by default (run folders).
        threads: onnxruntime's intra-op threads (ONNX exports).

    Returns:
        A ``flask.Flask`` app; the model is already loaded.

    Raises:
        FileNotFoundError: the run folder or its checkpoint is missing (from ``load_run``).
        ExportFileError: the export or its sidecar is missing or unreadable.
        ValueError: both or neither of run_dir and onnx.
    """
    if (run_dir is None) == (onnx is None):
        raise ValueError("serve one run folder (--run RUN_DIR) or one ONNX export (--onnx RUN_DIR/model.onnx)")
    predictor: BasePredictor = (Predictor(run_dir, which=which, device=device) if onnx is None
                                else OnnxPredictor(onnx, threads=threads))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    app.extensions["xrai_predictor"] = predictor
    _add_pages(app)
    _add_api(app)
    _add_error_handlers(app)
    return app


# ---- routes -----------------------------------------------------------------------------------


def _predictor() -> BasePredictor:
    """The app's predictor (``create_app`` puts it in ``app.extensions``)."""
    return current_app.extensions["xrai_predictor"]


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def _page(status: int = 200, **values: Any):
    predictor = _predictor()
    html = render_template("index.html", run=predictor.run, model=predictor.model_name,
                           threshold=predictor.threshold, threshold_note=predictor.threshold_note,
                           notice=RESEARCH_NOTICE, max_mb=MAX_UPLOAD_BYTES // (1024 * 1024),
                           formats=UPLOAD_FORMATS, accept=UPLOAD_ACCEPT, backend=predictor.backend,
                           cam_note=predictor.cam_note, **values)
    return html, status


def _error(status: int, message: str):
    logger.warning("%s %s -> %d: %s", request.method, request.path, status, message)
    if _wants_json():
        return jsonify(error=message, status=status), status
    return _page(status, error=message)


def _run_upload(*, with_overlay: bool) -> tuple[str, Prediction, float]:
    """The request's uploaded file through the predictor: (clean file name, prediction, ms)."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise UploadError("no file uploaded: send the image in the multipart form field 'file'")
    filename = _clean_name(_raw_filename(upload))
    start = time.perf_counter()
    result = _predictor().predict(upload.read(), filename=filename, with_overlay=with_overlay)
    ms = (time.perf_counter() - start) * 1000
    logger.info("%s: p=%.4f label=%s (%.0f ms)", filename, result.probability, result.label_name, ms)
    return filename, result, ms


def _add_pages(app: Flask) -> None:
    """GET / (the upload page), POST / (its form), GET /model_card."""

    @app.get("/")
    def index():
        return _page()

    @app.get("/model_card")
    def model_card():
        predictor = _predictor()
        path = RunFolder(predictor.run_dir).model_card
        if not path.is_file():
            return _error(404, f"run {predictor.run} has no {path.name}: `python -m xrai evaluate --run "
                               f"{predictor.run_dir}` writes it")
        return Response(path.read_text(encoding="utf-8"), mimetype="text/markdown")

    @app.post("/")
    def upload_page():
        try:
            filename, result, ms = _run_upload(with_overlay=True)
        except UploadError as exc:
            return _error(_status(exc), str(exc))
        return _page(filename=filename, result=result, ms=ms, overlay_b64=_b64(result.overlay_png))


def _add_api(app: Flask) -> None:
    """GET /healthz and POST /api/predict (JSON)."""

    @app.get("/healthz")
    def healthz():
        predictor = _predictor()
        return jsonify(status="ok", model=predictor.model_name, run=predictor.run, backend=predictor.backend,
                       threshold=predictor.threshold, threshold_note=predictor.threshold_note)

    @app.post("/api/predict")
    def api_predict():
        predictor = _predictor()
        with_overlay = (request.args.get("overlay", "") or request.form.get("overlay", "")).lower() in _TRUE
        try:
            filename, result, ms = _run_upload(with_overlay=with_overlay)
        except UploadError as exc:
            return _error(_status(exc), str(exc))
        body: dict[str, Any] = {
            "probability": result.probability, "label": result.label, "label_name": result.label_name,
            "threshold": result.threshold, "threshold_note": predictor.threshold_note,
            "model": predictor.model_name, "run": predictor.run,
            "checkpoint": predictor.which, "backend": predictor.backend, "filename": filename,
            "notes": result.notes, "research_only": RESEARCH_NOTICE,
        }
        if with_overlay:
            body["overlay_png_base64"] = _b64(result.overlay_png)
            if predictor.cam_note:
                body["overlay_note"] = predictor.cam_note
        return jsonify(body)


def _add_error_handlers(app: Flask) -> None:
    """HTTP errors as the user's message (JSON or the page), anything else a logged 500; security headers."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # 413 over MAX_CONTENT_LENGTH, 404, 405, a malformed multipart body (400): the user's message.
        message = exc.description or exc.name
        if exc.code == 413:
            message = _too_large_message()
        return _error(exc.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # A bug, not bad input: log it with its traceback, answer 500, and keep serving.
        logger.exception("unexpected error on %s %s", request.method, request.path)
        message = "internal error while processing the image; the server log has the details"
        if _wants_json():
            return jsonify(error=message, status=500), 500
        return _page(500, error=message)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", _CSP)
        return response


# ---- helpers ----------------------------------------------------------------------------------


def _too_large_message() -> str:
    """Why a 413 from werkzeug: the body over MAX_UPLOAD_BYTES, or (a body within it) the form's parts.

    werkzeug raises the same RequestEntityTooLarge for a body over MAX_CONTENT_LENGTH, a form with more
    than MAX_FORM_PARTS parts and a text field over Flask's MAX_FORM_MEMORY_SIZE (500 KB); the body's
    declared length tells the first from the other two.
    """
    length = request.content_length
    if length is not None and length <= MAX_UPLOAD_BYTES:
        field_kb = int(current_app.config.get("MAX_FORM_MEMORY_SIZE") or 0) // 1000
        return (f"the form has too many parts (more than {MAX_FORM_PARTS}) or a text field over {field_kb} KB: "
                "send one image in the field 'file'")
    return f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"


def _status(exc: UploadError) -> int:
    return 413 if isinstance(exc, UploadTooLargeError) else 400


_FILENAME_PARAM = re.compile(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', re.IGNORECASE)


def _raw_filename(upload) -> str:
    """The upload's file name as the client sent it.

    Werkzeug (>= 3.1) reads the Content-Disposition filename as an RFC quoted-string and drops every
    backslash ("C:\\x\\a.png" becomes "C:xa.png"), but browsers send backslashes literally (only " and
    newlines are percent-encoded, per the HTML standard), so a Windows-style name would keep its folder
    parts glued onto the base name. The raw header still has them; fall back to Werkzeug's reading.
    """
    match = _FILENAME_PARAM.search(upload.headers.get("Content-Disposition", ""))
    if match is None:
        return upload.filename or ""
    return match.group(1).replace('\\"', '"')


def _clean_name(name: str) -> str:
    """The upload's base name for messages and logs: no folders, no control characters, 100 chars at most."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return (base[:97] + "...") if len(base) > 100 else (base or "upload")


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    """The grey image with its longer side at most ``side`` (aspect kept, area averaging)."""
    h, w = image.shape
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample=Image.Resampling.BOX), dtype=np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if max(image.size) > DISPLAY_SIDE:
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(png: bytes | None) -> str | None:
    return None if png is None else base64.b64encode(png).decode("ascii")
