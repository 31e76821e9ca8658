"""Flask upload page and JSON API: one X-ray in; probability, label and Grad-CAM overlay out.

The model and the run's threshold are loaded once, when the app is made. Uploads are decoded by
xrai's one safe decoder (``read_image``), so a non-image, an image truncated beyond repair or a
decompression bomb is a 400 with the decoder's message, and an upload over 10 MB is a 413; bad
input never reaches a 500. Grad-CAM hooks are stateful, so one lock lets one request at a time
through decoding, the model and the CAM.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flask import Flask, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from xrai.data.augment import preprocess
from xrai.data.images import ImageError, read_image
from xrai.env import get_device
from xrai.evaluate import flipped_probability, run_threshold
from xrai.explain import CamExplainer, overlay
from xrai.models import load_model

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
RESEARCH_NOTICE = "For research and teaching only: not a medical device, not for diagnosis."
DISPLAY_SIDE = 1024  # longest side of the overlay sent back: a 3000 px one would be megabytes
LABEL_NAMES = {0: "normal", 1: "abnormal"}
_TRUE = {"1", "true", "yes", "on"}
# Everything the page needs is inline, so it works offline; the policy makes sure of it.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'")

logger = logging.getLogger(__name__)


class UploadError(ValueError):
    """An upload the app refuses (missing, empty, not a usable image): the message is for the user."""


@dataclass(kw_only=True)
class Prediction:
    """One image's result, with the images to show as PNG bytes."""

    probability: float
    label: int
    threshold: float
    overlay_png: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label_name(self) -> str:
        return LABEL_NAMES[self.label]


class Predictor:
    """A run's model and threshold, loaded once; ``predict`` is safe to call from many threads.

    Args:
        run_dir: the run folder (config.json, checkpoints/<which>.pt, report_valid.json if evaluated).
        which: the checkpoint to load, "best" or "last".
        device: "cpu", "cuda", "auto", ... (resolved by ``xrai.env.get_device``).
    """

    def __init__(self, run_dir: str | Path, *, which: str = "best", device: str = "cpu") -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run = self.run_dir.name
        self.which = which
        self.device = get_device(device)
        self.model, self.config = load_model(self.run_dir, which=which, device=self.device)
        self.model.eval()
        self.model_name = str(getattr(self.model, "xrai_name", self.config.model))
        self.threshold, self.threshold_note = _load_threshold(self.run_dir)
        self._lock = threading.Lock()

    def predict(self, data: bytes, *, filename: str = "upload", with_overlay: bool = True) -> Prediction:
        """Decode ``data``, run the model and (if asked) Grad-CAM; raise UploadError for bad input."""
        if not data:
            raise UploadError(f"the uploaded file {filename!r} is empty")
        with self._lock:
            image, notes = _decode(data, filename=filename)
            probability, cam = self._infer(image, with_cam=with_overlay)
            label = int(probability >= self.threshold)
            overlay_png = None
            if with_overlay:
                # Drawn on a display-sized copy: a 60 Mpx upload would need gigabytes at full size.
                rgb = overlay(_shrink(image, DISPLAY_SIDE), cam, predicted=label, probability=probability,
                              threshold=self.threshold, resize_size=self.config.resize_size,
                              resize=self.config.resize)
                overlay_png = _png_bytes(rgb)
        return Prediction(probability=probability, label=label, threshold=self.threshold,
                          overlay_png=overlay_png, notes=notes)

    def _infer(self, image: np.ndarray, *, with_cam: bool) -> tuple[float, np.ndarray | None]:
        """Probability of "abnormal" and, if asked, the Grad-CAM in the model's input frame."""
        x = preprocess([image], image_size=self.config.image_size, resize_size=self.config.resize_size,
                       device=self.device, resize=self.config.resize)
        # The run's flip TTA, as its threshold was chosen with (the map stays the unflipped image's).
        flipped = float(flipped_probability(self.model, x)[0]) if self.config.tta else None
        if not with_cam:
            with torch.inference_mode():
                probability = float(torch.sigmoid(self.model(x).float().reshape(-1)[0]))
            return (probability if flipped is None else (probability + flipped) / 2), None
        # A fresh explainer per request: its context manager always removes the hooks it adds, and
        # the probability comes from the same forward pass as the map.
        with CamExplainer(self.model) as explainer:
            cam = explainer(x, target_class=1)[0]
            probability = float(explainer.probabilities[0])
        return (probability if flipped is None else (probability + flipped) / 2), cam


def create_app(run_dir: str | Path, *, which: str = "best", device: str = "cpu") -> Flask:
    """Build the Flask app serving one run: GET/POST /, POST /api/predict, GET /healthz.

    Args:
        run_dir: the run folder made by ``python -m xrai demo`` or ``train``.
        which: the checkpoint, "best" or "last".
        device: where the model runs; "cpu" by default.

    Returns:
        A ``flask.Flask`` app; the model is already loaded.

    Raises:
        FileNotFoundError: the run folder or its checkpoint is missing (from ``load_model``).
    """
    predictor = Predictor(run_dir, which=which, device=device)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    app.extensions["xrai_predictor"] = predictor

    def wants_json() -> bool:
        return request.path.startswith("/api/") or request.path == "/healthz"

    def page(status: int = 200, **values: Any):
        html = render_template("index.html", run=predictor.run, model=predictor.model_name,
                               threshold=predictor.threshold, threshold_note=predictor.threshold_note,
                               notice=RESEARCH_NOTICE, max_mb=MAX_UPLOAD_BYTES // (1024 * 1024), **values)
        return html, status

    def error(status: int, message: str):
        logger.warning("%s %s -> %d: %s", request.method, request.path, status, message)
        if wants_json():
            return jsonify(error=message, status=status), status
        return page(status, error=message)

    def run_upload(*, with_overlay: bool) -> tuple[str, Prediction, float]:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise UploadError("no file uploaded: send the image in the multipart form field 'file'")
        filename = _clean_name(_raw_filename(upload))
        start = time.perf_counter()
        result = predictor.predict(upload.read(), filename=filename, with_overlay=with_overlay)
        ms = (time.perf_counter() - start) * 1000
        logger.info("%s: p=%.4f label=%s (%.0f ms)", filename, result.probability, result.label_name, ms)
        return filename, result, ms

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", model=predictor.model_name, run=predictor.run,
                       threshold=predictor.threshold, threshold_note=predictor.threshold_note)

    @app.get("/")
    def index():
        return page()

    @app.post("/")
    def upload_page():
        try:
            filename, result, ms = run_upload(with_overlay=True)
        except UploadError as exc:
            return error(400, str(exc))
        return page(filename=filename, result=result, ms=ms,
                    overlay_b64=_b64(result.overlay_png))

    @app.post("/api/predict")
    def api_predict():
        with_overlay = (request.args.get("overlay", "") or request.form.get("overlay", "")).lower() in _TRUE
        try:
            filename, result, ms = run_upload(with_overlay=with_overlay)
        except UploadError as exc:
            return error(400, str(exc))
        body: dict[str, Any] = {
            "probability": result.probability, "label": result.label, "label_name": result.label_name,
            "threshold": result.threshold, "threshold_note": predictor.threshold_note,
            "model": predictor.model_name, "run": predictor.run,
            "checkpoint": predictor.which, "filename": filename, "notes": result.notes,
            "research_only": RESEARCH_NOTICE,
        }
        if with_overlay:
            body["overlay_png_base64"] = _b64(result.overlay_png)
        return jsonify(body)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # 413 over MAX_CONTENT_LENGTH, 404, 405, a malformed multipart body (400): the user's message.
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"
        return error(exc.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # A bug, not bad input: log it with its traceback, answer 500, and keep serving.
        logger.exception("unexpected error on %s %s", request.method, request.path)
        message = "internal error while processing the image; the server log has the details"
        if wants_json():
            return jsonify(error=message, status=500), 500
        return page(500, error=message)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    return app


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 5000, which: str = "best",
          device: str = "cpu") -> None:
    """Serve the run on http://host:port until interrupted (threaded; inference is serialised).

    Args:
        run_dir: the run folder.
        host: the interface; 127.0.0.1 keeps it on this machine, 0.0.0.0 inside a container.
        port: the TCP port.
        which: the checkpoint, "best" or "last".
        device: where the model runs.
    """
    from werkzeug.serving import make_server

    _limit_malloc_arenas()
    app = create_app(run_dir, which=which, device=device)
    server = make_server(host, port, app, threaded=True)
    predictor: Predictor = app.extensions["xrai_predictor"]
    logger.info("serving %s (%s, threshold %.3f) on http://%s:%d  (Ctrl+C stops)", predictor.run,
                predictor.model_name, predictor.threshold, host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()


# ---- helpers ----------------------------------------------------------------------------------


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this server process (what MALLOC_ARENA_MAX=2 does).

    The threaded server runs each request on a new thread and glibc gives threads their own arenas
    (up to 8 per core), which hold freed memory: measured here, RSS grew ~380 MB over the first
    1,000 mixed requests from 8 clients, against ~80 MB and then flat with 2 arenas. Only serve(),
    which owns the process, calls this; elsewhere (musl, macOS, Windows) it does nothing.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # from glibc's malloc.h
    if mallopt(m_arena_max, arenas) != 1:
        logger.debug("mallopt(M_ARENA_MAX, %d) was refused; RSS may grow with the number of threads", arenas)


def _load_threshold(run_dir: Path) -> tuple[float, str]:
    """The run's threshold (chosen on validation), or 0.5 with a note when the run was never evaluated."""
    try:
        return float(run_threshold(run_dir)), ""
    except FileNotFoundError:
        logger.warning("run %s has no report_valid.json, so the threshold is 0.5; `python -m xrai evaluate "
                       "--run %s` sets the run's own", run_dir.name, run_dir)
        return 0.5, "default: the run has not been evaluated"


def _decode(data: bytes, *, filename: str) -> tuple[np.ndarray, list[str]]:
    """Decode uploaded bytes with xrai's decoder through a temporary file removed at once.

    Returns the grey uint8 image and the decoder's warnings (a truncated JPEG decoded as far as it
    goes) as notes for the user. Called under the predictor's lock, so recording warnings here does
    not race another request's.
    """
    # No suffix from the user's name: read_image goes by the content, and the name stays out of paths.
    handle = tempfile.NamedTemporaryFile(prefix="xrai-upload-", delete=False)
    tmp_path = handle.name
    try:
        with handle:
            handle.write(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = read_image(tmp_path)
            except ImageError as exc:
                raise UploadError(str(exc).replace(tmp_path, filename)) from exc
    finally:
        os.unlink(tmp_path)
    notes = [str(w.message).replace(tmp_path, filename) for w in caught]
    for note in notes:
        logger.warning("%s", note)
    return image, notes


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
