"""DICOM through every consumer: the app's upload, predict, explain, evaluate --data folder.

The acceptance test: a MONOCHROME1 16-bit DICOM with a window (and one with a VOI LUT Sequence)
uploaded to the app and passed to ``predict`` gives the very probability of the same pixels, windowed
as the file says, saved as a PNG. Every test file carries patient tags; none may reach any output.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("pydicom")

from dicom_files import (  # noqa: E402
    assert_no_secrets,
    j2k_header,
    window_8bit,
    write_damaged,
    write_deflated_bomb,
    write_dicom,
    write_j2k_liar,
    write_report,
)
from test_app import upload  # noqa: E402

from xrai.cli.commands import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRE, WIDTH = 32768.5, 61441  # the window of the MONOCHROME1 files below


def _as_monochrome1(image: np.ndarray) -> np.ndarray:
    """A uint8 radiograph as a detector storing 16 bits, white low (MONOCHROME1), with sensor noise."""
    rng = np.random.default_rng(0)
    stored = 62000 - image.astype(np.float64) * 230 + rng.normal(0, 40, image.shape)
    return np.clip(np.rint(stored), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def test_images(synthetic_manifest) -> list[Path]:
    test = synthetic_manifest[synthetic_manifest["split"] == "test"].sort_values("label")
    return [Path(p) for p in test["path"].iloc[[0, -1]]]  # a normal and an abnormal one


@pytest.fixture(scope="module")
def pairs(test_images, tmp_path_factory) -> list[tuple[Path, Path]]:
    """(DICOM, PNG of its pixels windowed by hand) pairs: a window, and a VOI LUT Sequence."""
    from xrai.data.decode.images import read_image

    folder = tmp_path_factory.mktemp("dicom_pairs")
    out = []
    for i, source in enumerate(test_images):
        stored = _as_monochrome1(read_image(source))
        windowed = 255 - window_8bit(stored, CENTRE, WIDTH)  # MONOCHROME1: inverted after the window
        dcm = write_dicom(folder / f"window{i}.dcm", stored, photometric="MONOCHROME1", window=(CENTRE, WIDTH))
        png = folder / f"window{i}.png"
        Image.fromarray(windowed).save(png)
        out.append((dcm, png))
    lut = (257 * np.clip((np.arange(65536) - 5000) // 220, 0, 255)).astype(np.uint16)  # a 16-bit VOI LUT
    stored = _as_monochrome1(read_image(test_images[-1]))
    dcm = write_dicom(folder / "lut.dcm", stored, photometric="MONOCHROME1", voi_lut=lut)
    png = folder / "lut.png"
    Image.fromarray(255 - (lut[stored] // 257).astype(np.uint8)).save(png)
    out.append((dcm, png))
    return out


def test_dicom_uploaded_and_predicted_matches_the_windowed_png(evaluated_run, pairs, capsys, caplog):
    from xrai.data.decode.images import read_image
    from xrai.deploy.app import create_app

    client = create_app(evaluated_run).test_client()
    caplog.set_level(logging.DEBUG)
    seen = set()
    for dcm, png in pairs:
        np.testing.assert_array_equal(read_image(dcm), read_image(png))
        answers = {}
        for path in (dcm, png):
            response = upload(client, path.read_bytes(), filename=path.name)
            assert response.status_code == 200, response.get_data(as_text=True)
            answers[path.suffix] = response.get_json()["probability"]
            assert_no_secrets(response.get_data(as_text=True), "the API's answer")
        assert answers[".dcm"] == answers[".png"]
        seen.add(answers[".dcm"])
        page = upload(client, dcm.read_bytes(), url="/", filename=dcm.name).get_data(as_text=True)
        assert "PNG, JPEG or DICOM" in page and 'id="overlay"' in page
        assert_no_secrets(page, "the result page")

        assert main(["predict", "--run", str(evaluated_run), str(dcm), str(png)]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [line["path"] for line in lines] == [str(dcm), str(png)]
        assert lines[0]["probability"] == lines[1]["probability"]  # DICOM and PNG: the very same answer
        assert abs(lines[0]["probability"] - answers[".dcm"]) <= 1e-5  # the app batches and hooks differently
    assert len(seen) == len(pairs)  # the model's answer depends on the image: equal answers mean equal pixels
    assert_no_secrets("\n".join(r.getMessage() for r in caplog.records), "the logs")


def test_predict_explain_and_evaluate_a_dicom_folder_never_write_patient_data(evaluated_run, test_images, tmp_path,
                                                                              capsys, caplog, recwarn):
    from xrai.data.decode.images import read_image

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)  # evaluate writes into the run folder: not into the shared one
    dataset = tmp_path / "ward"
    for label, source in zip(("normal", "abnormal"), test_images):
        folder = dataset / label
        folder.mkdir(parents=True)
        stored = _as_monochrome1(read_image(source))
        write_dicom(folder / "a.dcm", stored, photometric="MONOCHROME1", window=(CENTRE, WIDTH))
        write_dicom(folder / "IM000002", stored, photometric="MONOCHROME1", window=(CENTRE, WIDTH), preamble=False)
    write_report(dataset / "normal" / "report.dcm")  # a DICOM without pixels: dropped with a reason
    whole = (dataset / "normal" / "a.dcm").read_bytes()
    (dataset / "abnormal" / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    caplog.set_level(logging.DEBUG)

    files = sorted(str(p) for p in dataset.rglob("*") if p.is_file())
    assert main(["predict", "--run", str(run), *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    errors = {Path(line["path"]).name: line["error"] for line in lines if "error" in line}
    assert set(errors) == {"report.dcm", "cut.dcm"} and len(lines) == 6
    assert "not an image" in errors["report.dcm"] and "less than expected" in errors["cut.dcm"]

    assert main(["explain", "--run", str(run), *files, "--out", str(tmp_path / "cams")]) == 0
    assert len(list((tmp_path / "cams").rglob("*.png"))) == 4

    assert main(["evaluate", "--run", str(run), "--data", "folder", "--root", str(dataset)]) == 0
    report = json.loads((run / "report_external.json").read_text())
    assert report["image"]["n"] == 4  # the two unreadable files dropped, named in a warning
    predictions = pd.read_csv(run / "predictions_external.csv", keep_default_na=False)
    assert sorted(Path(p).name for p in predictions["path"]) == ["IM000002", "IM000002", "a.dcm", "a.dcm"]

    captured = capsys.readouterr()
    assert_no_secrets(captured.out + captured.err, "the CLI's output")
    assert_no_secrets("\n".join(r.getMessage() for r in caplog.records), "the logs")
    assert_no_secrets("\n".join(str(w.message) for w in recwarn), "the warnings")
    assert any("cut.dcm" in str(w.message) for w in recwarn)  # the dropped files are named
    for path in [*run.rglob("*"), *(tmp_path / "cams").rglob("*")]:
        if path.is_file() and path.suffix in (".csv", ".json", ".txt", ".md", ".png"):
            assert_no_secrets(path.read_bytes().decode("latin-1"), str(path))
        assert_no_secrets(path.name, "a file name")


def test_bad_dicom_uploads_are_one_line_400s_without_patient_data(evaluated_run, tmp_path, caplog):
    from xrai.deploy.app import create_app

    client = create_app(evaluated_run).test_client()
    caplog.set_level(logging.DEBUG)
    whole = write_dicom(tmp_path / "a.dcm", np.full((64, 64), 3000, dtype=np.uint16)).read_bytes()
    cases = {"cut.dcm": whole[:-1000], "sr.dcm": write_report(tmp_path / "sr.dcm").read_bytes(),
             "cine.dcm": write_dicom(tmp_path / "cine.dcm", np.zeros((2, 8, 8), np.uint8)).read_bytes()}
    for name, data in cases.items():
        response = upload(client, data, filename=name)
        assert response.status_code == 400, (name, response.get_data(as_text=True))
        message = response.get_json()["error"]
        assert message.startswith(name) and "\n" not in message
        assert_no_secrets(message, "an error message")
    assert_no_secrets("\n".join(r.getMessage() for r in caplog.records), "the logs")


def _faulty_dicoms(folder: Path) -> dict[str, Path]:
    """The DICOM faults of issue 25, one file each (all small on disk)."""
    return {"frames.dcm": write_damaged(folder / "frames.dcm", "frames"),
            "vr.dcm": write_damaged(folder / "vr.dcm", "vr"),
            "photometric.dcm": write_damaged(folder / "photometric.dcm", "photometric"),
            "bomb.dcm": write_deflated_bomb(folder / "bomb.dcm", filler=300 * 2**20),  # over 256 MiB: the CLI too
            "j2k.dcm": write_j2k_liar(folder / "j2k.dcm", rows=256, columns=256, codestream=j2k_header(16000, 16000))}


def test_one_bad_dicom_does_not_lose_the_batch(evaluated_run, test_images, tmp_path, capsys):
    good = tmp_path / "good.dcm"
    write_dicom(good, _as_monochrome1(np.asarray(Image.open(test_images[0]).convert("L"))), photometric="MONOCHROME1",
                window=(CENTRE, WIDTH))
    bad = _faulty_dicoms(tmp_path)
    assert main(["predict", "--run", str(evaluated_run), str(good), *map(str, bad.values())]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert len(lines) == 1 + len(bad)
    assert "probability" in lines[0] and Path(lines[0]["path"]) == good
    errors = {Path(line["path"]).name: line["error"] for line in lines[1:]}
    assert set(errors) == set(bad)
    assert "NumberOfFrames is not a number" in errors["frames.dcm"]
    assert "Unknown Value Representation" in errors["vr.dcm"]
    assert "inflates to more than" in errors["bomb.dcm"] and "16000x16000" in errors["j2k.dcm"]
    assert "\x1b" not in errors["photometric.dcm"] and len(errors["photometric.dcm"]) < 300
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) <= len(bad)
    assert_no_secrets(captured.out + captured.err, "the CLI's output")


def test_faulty_dicom_uploads_are_one_line_4xx_not_500(evaluated_run, tmp_path, caplog):
    from xrai.deploy.app import create_app

    client = create_app(evaluated_run).test_client()
    caplog.set_level(logging.DEBUG)
    for name, path in _faulty_dicoms(tmp_path).items():
        response = upload(client, path.read_bytes(), filename=name)
        expected = 413 if name in ("bomb.dcm", "j2k.dcm") else 400  # over the decode budget: 413, as a PNG bomb
        assert response.status_code == expected, (name, response.get_data(as_text=True))
        message = response.get_json()["error"]
        assert message.startswith(name) and "\n" not in message and "\x1b" not in message
        assert_no_secrets(message, "an error message")
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("pydicom", "xrai.data")))


def test_evaluate_says_one_line_about_truncated_and_unreadable_images(evaluated_run, test_images, tmp_path, capsys,
                                                                        caplog, recwarn):
    from xrai.data.decode.images import TruncatedImageWarning
    from xrai.runs.layout import RunFolder

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    dataset = tmp_path / "ward"
    cut = []
    for label, source in zip(("normal", "abnormal"), test_images):
        (dataset / label).mkdir(parents=True)
        image = Image.open(source).convert("L")
        for i in range(3):
            whole = dataset / label / f"whole{i}.jpg"
            image.save(whole, quality=90)
            if i:  # two of three cut short: decoded as far as they go
                data = whole.read_bytes()
                (dataset / label / f"cut{i}.jpg").write_bytes(data[: len(data) * 2 // 3])
                cut.append(f"cut{i}.jpg")
    (dataset / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))  # unreadable: dropped
    caplog.set_level(logging.DEBUG, logger="xrai")
    assert main(["-v", "evaluate", "--run", str(run), "--data", "folder", "--root", str(dataset)]) == 0

    assert not [w for w in recwarn if issubclass(w.category, TruncatedImageWarning)]
    said = [str(w.message) for w in recwarn if "truncated or unreadable" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("5 image(s) were truncated or unreadable (dropped 1 unreadable, 4 truncated")
    listing = RunFolder(run).damaged_csv
    assert f"listed in {listing}" in said[0]
    table = pd.read_csv(listing)
    assert sorted(Path(p).name for p in table["path"]) == sorted([*cut, "broken.png"])
    assert set(table["problem"]) == {"truncated", "unreadable"}
    each = [r.getMessage() for r in caplog.records if r.name == "xrai.data.decode" and r.levelno == logging.DEBUG]
    assert sum("truncated JPEG" in m for m in each) == 4  # -v shows each one
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("truncated") <= 1
