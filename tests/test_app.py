"""The Flask app through its test client: pages, JSON API, every kind of bad upload, temp files."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MB = 1024 * 1024


# ---- builders shared with test_app_browser.py and test_app_load.py ----------------------------


def build_fake_run(root: Path, *, image_size: int = 64, name: str = "fake-run") -> Path:
    """A run folder as train.fit leaves it (config.json, checkpoints/best.pt), untrained weights."""
    import torch

    from xrai.config import TrainConfig
    from xrai.models.factory import create_model

    torch.manual_seed(0)
    config = TrainConfig(data="synthetic", model="mobilenet_v2", pretrained=False, img_size=image_size,
                         epochs=1)
    model = create_model("mobilenet_v2", pretrained=False)
    run = Path(root) / name
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    config.to_json(run / "config.json")
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "best_metric": 0.5,
                "bad_epochs": 0, "history": [], "model_name": "mobilenet_v2"}, run / "checkpoints" / "best.pt")
    return run


def xray_array(height: int = 120, width: int = 96, *, seed: int = 0) -> np.ndarray:
    """A phantom radiograph: a bright bone on a black background with a dark fracture line."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bone = ((xx - width / 2) / (width * 0.18)) ** 2 + ((yy - height / 2) / (height * 0.42)) ** 2 <= 1
    image = np.where(bone, 200, 15).astype(np.float64) + rng.normal(0, 6, (height, width))
    line = np.abs((yy - height / 2) - 0.3 * (xx - width / 2)) < 1.5
    image[bone & line] = 60
    return np.clip(image, 0, 255).astype(np.uint8)


def xray_bytes(fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(xray_array(**kwargs)).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(width: int = 10_000, height: int = 10_000, *, rgba: bool = False) -> bytes:
    """A valid all-black PNG of width*height pixels (100 M by default), greyscale or RGBA.

    Tiny on disk: ~100 kB for the default, ~249 kB for 8000 x 8000 RGBA (which decodes to 244 MiB).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width * (4 if rgba else 1) + 1)  # filter byte 0, then black (transparent) pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6 if rgba else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_uploads() -> dict[str, bytes]:
    """Uploads the app must refuse with a 400 (oversize, a 413, is separate)."""
    png = xray_bytes("PNG")
    jpeg = xray_bytes("JPEG")
    return {
        "text": b"this is not an image, it is a text file\n" * 20,
        "empty": b"",
        "truncated_png": png[: len(png) // 2],
        "png_header_only": png[:40],
        "truncated_jpeg_header_only": jpeg[:120],
        "bomb": bomb_png(),
    }


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return build_fake_run(tmp_path_factory.mktemp("app_run"))


@pytest.fixture(scope="module")
def app(fake_run):
    from xrai.deploy.app import create_app

    app = create_app(fake_run)
    app.testing = True
    return app


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def bad() -> dict[str, bytes]:
    return bad_uploads()


def upload(client, data: bytes, *, url: str = "/api/predict", filename: str = "xray.png", **form):
    return client.post(url, data={"file": (io.BytesIO(data), filename), **form},
                       content_type="multipart/form-data")


# ---- happy paths ----------------------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "model": "mobilenet_v2", "run": "fake-run", "threshold": 0.5,
                                   "threshold_note": "default: the run has not been evaluated", "backend": "pytorch"}


def test_api_predict(client):
    response = upload(client, xray_bytes())
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["label"] == int(body["probability"] >= body["threshold"])
    assert body["label_name"] == ("abnormal" if body["label"] else "normal")
    assert body["threshold"] == 0.5  # the fake run was never evaluated
    assert body["model"] == "mobilenet_v2" and body["run"] == "fake-run"
    assert "overlay_png_base64" not in body


def test_label_names_are_the_runs_sources(tmp_path):
    # A FracAtlas run (manifest.json "source") says fractured / not fractured, MURA's abnormal / normal.
    from xrai.deploy.app import create_app

    run = build_fake_run(tmp_path)
    (run / "manifest.json").write_text(json.dumps({"source": "fracatlas"}))
    body = upload(create_app(run).test_client(), xray_bytes()).get_json()
    assert body["label_name"] == ("fractured" if body["label"] else "not fractured")


@pytest.mark.parametrize("how", ["query", "form"])
def test_api_predict_overlay(client, how):
    url, form = ("/api/predict?overlay=1", {}) if how == "query" else ("/api/predict", {"overlay": "true"})
    response = upload(client, xray_bytes(height=150, width=90), url=url, **form)
    assert response.status_code == 200
    png = base64.b64decode(response.get_json()["overlay_png_base64"])
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert min(overlay.size) >= 64


def test_same_image_same_answer(client):
    first = upload(client, xray_bytes(), url="/api/predict?overlay=1").get_json()
    second = upload(client, xray_bytes()).get_json()
    assert first["probability"] == pytest.approx(second["probability"], abs=1e-6)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("PNG", "RGB"), ("PNG", "I;16")])
def test_api_other_formats(client, fmt, mode):
    array = xray_array()
    image = Image.fromarray(array.astype(np.uint16) * 64) if mode == "I;16" else \
        Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    response = upload(client, buffer.getvalue(), filename=f"x.{fmt.lower()}")
    assert response.status_code == 200, response.get_json()


def test_truncated_jpeg_that_still_decodes_is_answered_with_a_note(client):
    jpeg = xray_bytes("JPEG", height=400, width=300)
    response = upload(client, jpeg[: int(len(jpeg) * 0.8)], filename="cut.jpg")
    assert response.status_code == 200
    notes = response.get_json()["notes"]
    assert any("truncated" in note for note in notes)
    assert all("xrai-upload-" not in note for note in notes)  # the temp path is never shown


def test_index_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in html and 'name="file"' in html
    assert "not for diagnosis" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "img-src data:" in response.headers["Content-Security-Policy"]


def test_form_upload_shows_result(client):
    response = upload(client, xray_bytes(), url="/", filename="wrist.png")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'id="overlay"' in html and "data:image/png;base64," in html
    assert 'id="probability"' in html and "%" in html
    assert 'id="label"' in html and ("abnormal" in html or "normal" in html)
    assert "mobilenet_v2" in html and "fake-run" in html and "wrist.png" in html
    assert "not for diagnosis" in html


def test_threshold_comes_from_the_evaluated_run(tmp_path):
    from xrai.deploy.app import create_app
    from xrai.runs.operating import checkpoint_sha256

    run = build_fake_run(tmp_path)
    sha = checkpoint_sha256(run / "checkpoints" / "best.pt")  # a threshold holds for the checkpoint it was chosen on
    (run / "report_valid.json").write_text(json.dumps({"split": "valid", "threshold": 0.73,
                                                       "checkpoint": {"sha256": sha}}))
    client = create_app(run).test_client()
    assert client.get("/healthz").get_json()["threshold"] == 0.73
    body = upload(client, xray_bytes()).get_json()
    assert body["threshold"] == 0.73 and body["label"] == int(body["probability"] >= 0.73)
    assert body["threshold_note"] == ""
    assert "not been evaluated" not in client.get("/").get_data(as_text=True)


def test_model_is_loaded_once(fake_run, monkeypatch):
    import xrai.runs.load
    from xrai.deploy.app import create_app

    calls = []
    real = xrai.runs.load.load_model
    monkeypatch.setattr(xrai.runs.load, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    client = create_app(fake_run).test_client()
    for _ in range(3):
        assert upload(client, xray_bytes()).status_code == 200
    assert len(calls) == 1


def test_concurrent_requests_agree(client):
    """Grad-CAM hooks are stateful: parallel requests must neither fail nor mix their answers."""
    images = {seed: xray_bytes(seed=seed, height=100 + 10 * seed) for seed in range(4)}
    expected = {seed: upload(client, data).get_json()["probability"] for seed, data in images.items()}

    def one(seed: int) -> tuple[int, int, float]:
        response = upload(client, images[seed], url="/api/predict?overlay=1")
        return seed, response.status_code, response.get_json().get("probability")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, [s for _ in range(4) for s in images]))
    for seed, status, probability in results:
        assert status == 200
        assert probability == pytest.approx(expected[seed], abs=1e-5)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "empty", "truncated_png", "png_header_only",
                                  "truncated_jpeg_header_only", "bomb"])
def test_bad_upload_is_a_4xx_with_a_message(client, bad, kind):
    response = upload(client, bad[kind], filename=f"{kind}.png")
    status = 413 if kind == "bomb" else 400  # over a size limit: 413; not a usable image: 400
    assert response.status_code == status
    body = response.get_json()
    assert body["status"] == status and f"{kind}.png" in body["error"]
    assert "xrai-upload-" not in body["error"]
    assert " at 0x" not in body["error"] and "<_io" not in body["error"]  # no repr of an internal object
    if kind == "bomb":
        assert "pixels" in body["error"] and "67,108,864" in body["error"]


def test_upload_over_the_decode_budget_is_a_413_naming_the_limit(client):
    # 8000 x 8000 RGBA: 64 Mpx passes the pixel limit, but decodes to 244 MiB (> the 64 MiB upload budget).
    response = upload(client, bomb_png(8000, 8000, rgba=True), filename="screenshot.png")
    assert response.status_code == 413
    message = response.get_json()["error"]
    assert "screenshot.png" in message and "8000x8000" in message and "limit of 64 MiB" in message
    assert "smaller or greyscale" in message


def test_decode_runs_outside_the_inference_lock(app):
    """A slow decode must not hold the model: inference for another upload goes on meanwhile."""
    predictor = app.extensions["xrai_predictor"]
    assert predictor._lock.acquire(timeout=5)  # the model busy: decoding must still work
    pool = ThreadPoolExecutor(1)  # in a worker, so a decode that waits for the lock fails here, not hangs
    try:
        image, notes = pool.submit(predictor.decode, xray_bytes(), filename="x.png").result(timeout=30)
    finally:
        pool.shutdown(wait=False)
        predictor._lock.release()
    assert image.shape == (120, 96) and notes == []


@pytest.mark.parametrize("kind", ["text", "truncated_png", "bomb"])
def test_bad_upload_through_the_form_is_a_friendly_page(client, bad, kind):
    response = upload(client, bad[kind], url="/", filename="broken.png")
    assert response.status_code == (413 if kind == "bomb" else 400)
    html = response.get_data(as_text=True)
    assert 'id="error"' in html and "broken.png" in html and 'name="file"' in html


def test_oversize_upload_is_a_413(client):
    big = b"\x00" * (10 * MB + 1)
    response = upload(client, big)
    assert response.status_code == 413
    assert "10 MB" in response.get_json()["error"]
    page = upload(client, big, url="/")
    assert page.status_code == 413
    assert "10 MB" in page.get_data(as_text=True) and 'name="file"' in page.get_data(as_text=True)


def test_a_form_of_2000_parts_is_too_many_parts_not_too_large(client):
    """Issue 25, fault 11: 2,000 small parts (well under 10 MB) were answered "larger than 10 MB"."""
    from xrai.deploy.app import MAX_FORM_PARTS

    boundary = "xraiboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(2000)]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    assert len(body) < MB
    response = client.post("/api/predict", data=body, content_type=f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert f"too many parts (more than {MAX_FORM_PARTS})" in error and "10 MB" not in error
    assert "\n" not in error


def test_missing_file_field_is_a_400(client):
    response = client.post("/api/predict", data={"image": (io.BytesIO(xray_bytes()), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert "'file'" in response.get_json()["error"]
    assert client.post("/api/predict").status_code == 400
    assert client.post("/api/predict", json={"file": "x"}).status_code == 400
    assert client.post("/", data={}).status_code == 400


def test_unknown_routes_answer_json_on_the_api(client):
    assert client.get("/api/predict").status_code == 405
    response = client.get("/api/nothing")
    assert response.status_code == 404 and response.get_json()["status"] == 404


def test_no_files_left_behind(client, bad, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert upload(client, xray_bytes(), url="/api/predict?overlay=1").status_code == 200
    assert upload(client, xray_bytes(), url="/").status_code == 200
    for data in bad.values():
        assert upload(client, data).status_code in (400, 413)
    assert upload(client, b"\x00" * (10 * MB + 1)).status_code == 413
    assert list(scratch.iterdir()) == []


def test_missing_run_fails_at_start(tmp_path):
    from xrai.deploy.app import create_app

    with pytest.raises(FileNotFoundError):
        create_app(tmp_path / "no-such-run")


def test_server_stays_up_after_bad_input(client, bad):
    for data in bad.values():
        upload(client, data)
    assert client.get("/healthz").status_code == 200
    assert upload(client, xray_bytes()).status_code == 200



def test_large_upload_gives_a_display_sized_overlay(client):
    buffer = io.BytesIO()
    Image.fromarray(xray_array(height=3000, width=2000)).save(buffer, format="JPEG", quality=80)
    response = upload(client, buffer.getvalue(), url="/api/predict?overlay=1", filename="big.jpg")
    assert response.status_code == 200
    overlay = Image.open(io.BytesIO(base64.b64decode(response.get_json()["overlay_png_base64"])))
    assert max(overlay.size) <= 1024 and overlay.size[0] >= 600


def test_upload_names_never_reach_paths_or_logs_raw(client):
    response = upload(client, xray_bytes(), filename="../..\\windows\\evil\tname.png")
    assert response.status_code == 200
    assert response.get_json()["filename"] == "evilname.png"
    # a newline breaks the multipart header itself: refused as a request without a file, not a 500
    assert upload(client, xray_bytes(), filename="evil\nname.png").status_code in (200, 400)
