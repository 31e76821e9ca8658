"""Export (ONNX, TorchScript) and serving the ONNX export without torch.

Parity: onnxruntime with the numpy contract on the synthetic test split gives the probabilities the run
gives in PyTorch (xrai.runs.load.load_run, xrai.data.augment.preprocess) within 1e-4. Torch-freeness:
the ONNX app and its production server answer predictions in a subprocess where torch (and pandas,
scikit-learn, grad-cam...) cannot be imported, as in the Dockerfile's onnx target.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _checks import child_env

for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package)

from xrai.cli.commands import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# What the ONNX image does not install (Dockerfile, target onnx): none of it may be imported.
NOT_IN_THE_ONNX_IMAGE = ("torch", "torchvision", "pandas", "sklearn", "scipy", "matplotlib", "seaborn",
                         "pytorch_grad_cam", "cv2", "tqdm", "kagglehub", "ipywidgets", "onnx", "onnxscript")


@pytest.fixture(scope="module")
def run_dir(evaluated_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(evaluated_run, run)  # the export is written into the run folder: not the shared one
    return run


@pytest.fixture(scope="module")
def exported(run_dir):
    from xrai.deploy.export import export_run

    return export_run(run_dir, fmt="onnx")


@pytest.fixture(scope="module")
def test_split(run_dir):
    from xrai.data import read_manifest
    from xrai.data.decode.images import read_image

    manifest = read_manifest(run_dir)
    paths = manifest.loc[manifest["split"] == "test", "path"].tolist()
    return paths, [read_image(p) for p in paths]


def test_onnx_export_matches_pytorch_on_the_synthetic_test_split(run_dir, exported, test_split):
    import onnx

    from xrai.data.augment import preprocess
    from xrai.data.contract import InputContract, prepare
    from xrai.deploy.onnx_runtime import load_export
    from xrai.runs.load import load_run

    assert exported.path == run_dir / "model.onnx" and exported.sidecar == run_dir / "model.onnx.json"
    onnx.checker.check_model(onnx.load(exported.path), full_check=True)
    run = load_run(run_dir)
    sidecar = json.loads(exported.sidecar.read_text())
    assert InputContract.from_dict(sidecar["input"]) == InputContract.from_config(run.config)
    assert sidecar["temperature"] == run.temperature and sidecar["threshold"] == run.threshold
    assert sidecar["study_threshold"] == run.study_threshold and sidecar["threshold_from"] == run.threshold_from
    assert sidecar["checkpoint"]["sha256"] == run.checkpoint_sha256 and sidecar["format"] == "onnx"

    paths, images = test_split
    assert len(images) >= 6
    torch_p, torch_raw = run.probabilities(preprocess(images, image_size=run.config.image_size,
                                                      resize_size=run.config.resize_size))
    model = load_export(exported.path)
    assert isinstance(model.session.get_inputs()[0].shape[0], str)  # the dynamic batch axis
    onnx_logit, onnx_p = model.outputs(prepare(images, model.contract))  # the whole split in one batch
    singles = np.array([model.probabilities([image])[0] for image in images[:4]])  # then one by one
    print(f"\nONNX vs PyTorch on {len(images)} test images: max |diff| {np.abs(onnx_p - torch_p).max():.2e} "
          f"(calibrated, T={run.temperature:.3f}), {np.abs(1 / (1 + np.exp(-onnx_logit)) - torch_raw).max():.2e} "
          f"(raw); raw probabilities {torch_raw.min():.4f}..{torch_raw.max():.4f}")
    assert np.ptp(torch_raw) > 100 * 1e-4  # the answers depend on the image, so 1e-4 is a real test
    assert np.abs(1 / (1 + np.exp(-onnx_logit)) - torch_raw).max() <= 1e-4
    assert np.abs(onnx_p - torch_p).max() <= 1e-4 and np.abs(singles - torch_p[:4]).max() <= 1e-4
    logit, probability = model.outputs(prepare(images[:3], model.contract))
    cal = sidecar["calibration"]
    assert np.allclose(probability, 1 / (1 + np.exp(-(cal["slope"] * logit + cal["intercept"]))), atol=1e-6)


def test_the_export_computes_the_calibrator_in_the_graph_and_the_sidecar_states_it(run_dir, exported):
    import torch

    from xrai.deploy.export import CalibratedModel
    from xrai.deploy.onnx_runtime import load_export
    from xrai.runs.load import load_run
    from xrai.runs.operating import Calibration

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        logit, p = CalibratedModel(net, Calibration("platt", 0.7, -1.4)).eval()(x)
        assert torch.allclose(p, torch.sigmoid(0.7 * logit - 1.4))  # the shift Platt fits is in the graph
        logit, p = CalibratedModel(net, 2.0).eval()(x)  # a temperature, as before
        assert torch.allclose(p, torch.sigmoid(logit / 2.0))
    run = load_run(run_dir)
    sidecar = json.loads(exported.sidecar.read_text())
    assert sidecar["calibration"] == run.calibration.to_dict() and sidecar["calibrated"] == run.calibrated
    model = load_export(exported.path)
    assert model.calibration == sidecar["calibration"]
    model.sidecar = {k: v for k, v in sidecar.items() if k != "calibration"}  # an older sidecar: T only
    assert model.calibration == {"method": "temperature", "slope": 1.0 / model.temperature, "intercept": 0.0}


def test_torchscript_export_matches_and_is_refused_by_the_onnx_server(run_dir, test_split):
    import torch

    from xrai.data.contract import prepare
    from xrai.deploy.export import export_run
    from xrai.deploy.onnx_runtime import ExportFileError, load_export

    result = export_run(run_dir, fmt="torchscript")
    assert result.path.name == "model.torchscript.pt" and json.loads(result.sidecar.read_text())["format"] == \
        "torchscript"
    onnx_model = load_export(run_dir / "model.onnx")
    x = prepare(test_split[1][:5], onnx_model.contract)
    with torch.inference_mode():
        scripted = torch.jit.load(str(result.path))(torch.from_numpy(x))[1].numpy()
    assert np.abs(scripted - onnx_model.outputs(x)[1]).max() <= 1e-4
    with pytest.raises(ExportFileError, match="torchscript export; serving without torch needs the ONNX one"):
        load_export(result.path)


_SERVE_WITHOUT_TORCH = r"""
import io, json, sys, urllib.request, uuid
from xrai.deploy.app import create_app
from xrai.deploy.server import serve_in_thread

app = create_app(onnx=sys.argv[1], threads=1)
out = {"healthz": app.test_client().get("/healthz").get_json(), "answers": {}}
page = app.test_client().post("/", data={"file": (io.BytesIO(open(sys.argv[2], "rb").read()), "x.dcm")},
                              content_type="multipart/form-data").get_data(as_text=True)
out["page_says_why"] = "needs them" in page and 'id="no-overlay"' in page and 'id="overlay"' not in page
with serve_in_thread(app) as url:  # the production server (waitress), over HTTP
    for path in sys.argv[2:]:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.rsplit('/', 1)[-1]}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + open(path, "rb").read() + \
               f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(url + "api/predict?overlay=1", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as response:
            out["answers"][path] = json.loads(response.read())
heavy = [m for m in ("torch", "pandas", "sklearn", "scipy", "matplotlib", "pytorch_grad_cam", "cv2") if m in sys.modules]
out["imported"] = heavy
print(json.dumps(out))
"""


def test_the_onnx_app_answers_in_a_process_where_torch_cannot_be_imported(run_dir, exported, test_split, tmp_path):
    from dicom_files import write_dicom
    from PIL import Image

    from xrai.data.decode.images import read_image
    from xrai.deploy.onnx_runtime import load_export

    png = tmp_path / "test.png"
    Image.fromarray(test_split[1][0]).save(png)
    # 16 bit, with the window that maps x * 257 back onto x exactly: the same pixels as the PNG.
    dcm = write_dicom(tmp_path / "test.dcm", test_split[1][0].astype(np.uint16) * 257, window=(32768, 65536))
    np.testing.assert_array_equal(read_image(dcm), test_split[1][0])
    env = child_env(block=NOT_IN_THE_ONNX_IMAGE)
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the blocker works
    proc = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_TORCH, str(exported.path), str(png), str(dcm)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == [] and out["page_says_why"]
    assert out["healthz"]["backend"] == "onnxruntime" and out["healthz"]["threshold"] == load_export(
        exported.path).threshold
    answers = out["answers"]
    expected = float(load_export(exported.path).probabilities([test_split[1][0]])[0])
    for path in (png, dcm):  # the DICOM holds the same pixels, 16 bit
        body = answers[str(path)]
        assert body["backend"] == "onnxruntime" and body["overlay_png_base64"] is None and "overlay_note" in body
        assert abs(body["probability"] - expected) <= 1e-6
        assert body["label"] == int(body["probability"] >= body["threshold"])

    proc = subprocess.run([sys.executable, "-m", "xrai", "serve", "--onnx", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "no exported model" in proc.stderr and "Traceback" not in proc.stderr


def _post_file(url: str, path: Path) -> dict:
    """POST one file to the JSON API as a browser's multipart form would, with the overlay asked for."""
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "api/predict?overlay=1", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    # No proxies: urlopen's global opener keeps the proxies of the environment it was first built in (a
    # test that pointed them at a closed port to cut the network), and a local server needs none.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_onnx_from_the_command_line_without_torch_says_once_why_there_is_no_gradcam(exported, test_split,
                                                                                            tmp_path):
    """`python -m xrai serve --onnx` itself (the Docker onnx target's command), torch unimportable."""
    import re
    import threading
    import time

    from PIL import Image

    from xrai.deploy.app import NO_CAM_NOTE
    from xrai.deploy.onnx_runtime import load_export

    png = tmp_path / "upload.png"
    Image.fromarray(test_split[1][1]).save(png)
    env = child_env(block=NOT_IN_THE_ONNX_IMAGE)
    proc = subprocess.Popen([sys.executable, "-m", "xrai", "serve", "--onnx", str(exported.path), "--port", "0",
                             "--threads", "1", "--torch-threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def read_log() -> None:
        for line in proc.stderr:  # as the server writes it
            lines.append(line)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = [re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line) for line in list(lines)]
            url = next((m.group(1) + "/" for m in found if m), None)
            time.sleep(0.1)
        assert url is not None, "".join(lines)[-3000:]
        try:
            answer = _post_file(url, png)
        except OSError as error:  # say what the server said, not only that it did not answer
            raise AssertionError(f"{error}; server exit code {proc.poll()}; its log:\n{''.join(lines)[-3000:]}") from error
    finally:
        proc.terminate()  # SIGTERM, as docker stop sends (SIGINT may be ignored where CI runs in the background)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    log = "".join(lines)
    assert "Traceback" not in log, log[-3000:]
    assert answer["backend"] == "onnxruntime" and answer["overlay_png_base64"] is None
    assert answer["overlay_note"] == NO_CAM_NOTE and "\n" not in NO_CAM_NOTE
    assert abs(answer["probability"] - float(load_export(exported.path).probabilities([test_split[1][1]])[0])) <= 1e-6
    # Grad-CAM's absence is said in the log exactly once, at start-up, as that same one line.
    assert [line.strip() for line in lines if "grad-cam" in line.lower()] == [NO_CAM_NOTE]
    assert any("onnxruntime threads" in line for line in lines)


def test_bench_times_onnxruntime_beside_pytorch_on_the_export(run_dir, exported, test_split):
    from xrai.bench.latency import cpu_predict_latency
    from xrai.deploy.onnx_runtime import load_export
    from xrai.runs.load import load_run

    run, model = load_run(run_dir), load_export(exported.path)
    result = cpu_predict_latency(run.model, image=test_split[1][0], image_size=run.config.image_size,
                                 resize_size=run.config.resize_size, runs=3, session=model.session)
    assert result["torch_cpu"]["median"] > 0 and result["onnxruntime_cpu"]["median"] > 0


def test_export_failures_are_one_line(run_dir, tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nothing-here")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    shutil.copy(run_dir / "model.onnx", tmp_path / "model.onnx")  # no sidecar beside it
    assert main(["serve", "--onnx", str(tmp_path / "model.onnx")]) == 2
    assert "no sidecar" in capsys.readouterr().err


def _tampered(exported, tmp_path, change) -> Path:
    """A copy of the export whose sidecar ``change(sidecar)`` edited (or replaced: it returns ("replace", new))."""
    shutil.copy(exported.path, tmp_path / "model.onnx")
    sidecar = json.loads(exported.sidecar.read_text())
    changed = change(sidecar)
    (tmp_path / "model.onnx.json").write_text(json.dumps(changed[1] if isinstance(changed, tuple) else sidecar))
    return tmp_path / "model.onnx"


@pytest.mark.parametrize("change, message", [
    # issue 25, fault 9: a tampered sidecar
    (lambda s: s["input"].pop("image_size"), r"input.image_size is None, not an integer in \[1, 1024\]"),
    (lambda s: ("replace", 1), "holds int 1, not a JSON object"),
    (lambda s: s["input"].update(image_size=100), r"input.image_size is 100, but the graph takes \[.*64, 64\]"),
    (lambda s: s["input"].update(image_size=3000), r"input.image_size is 3000, not an integer in \[1, 1024\]"),
    (lambda s: s["input"].update(name="pixels"), r"input.name is 'pixels', but the graph's inputs are \['input'\]"),
    (lambda s: s.update(input=[1]), r"input is \[1\], not an object"),
    # issue 25, fault 4: NaN or out-of-range threshold, temperature or slope 0 or NaN
    (lambda s: s.update(threshold=float("nan")), "threshold is nan, not a finite number"),
    (lambda s: s.update(threshold=-5), r"threshold is -5, outside \[0, 1\]"),
    (lambda s: s.update(threshold=2.0), r"threshold is 2.0, outside \[0, 1\]"),
    (lambda s: s.update(threshold="0.5"), "threshold is '0.5', not a finite number"),
    (lambda s: s.update(study_threshold=float("nan")), "study_threshold is nan"),
    (lambda s: s.update(temperature=0), "temperature is 0, not > 0"),
    (lambda s: s.update(temperature=float("nan")), "temperature is nan, not a finite number"),
    (lambda s: s["calibration"].update(slope=0.0), "calibration.slope is 0.0, not > 0"),
    (lambda s: s["calibration"].update(slope=float("nan")), "calibration.slope is nan"),
    (lambda s: s["calibration"].update(intercept=float("inf")), "calibration.intercept is inf"),
])
def test_a_tampered_sidecar_is_refused_at_load_in_one_line_naming_the_file(exported, tmp_path, capsys, change,
                                                                          message):
    import re

    from xrai.deploy.onnx_runtime import ExportFileError, load_export

    model = _tampered(exported, tmp_path, change)
    with pytest.raises(ExportFileError, match=re.escape(str(model) + ".json") + ".*" + message):
        load_export(model)
    assert main(["serve", "--onnx", str(model), "--port", "0"]) == 2  # refused before serving
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(model) + ".json" in err and "Traceback" not in err


def test_the_untampered_sidecar_still_loads(exported, tmp_path):
    from xrai.deploy.onnx_runtime import load_export

    model = load_export(_tampered(exported, tmp_path, lambda s: None))
    assert model.contract.image_size == json.loads(exported.sidecar.read_text())["input"]["image_size"]
