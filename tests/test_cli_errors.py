"""Every user-facing failure through the real CLI: one line on stderr, exit code 2, the folder left as it was."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from xrai.cli.commands import main
from xrai.errors import is_user_error, one_line

NO_NETWORK = {  # every proxy variable urllib reads, pointed at a closed port: no request gets out
    "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "(-v shows the traceback)" in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]] | None:
    """Every file under folder with its mode, mtime and bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory) -> Path:
    from test_app import build_fake_run

    return build_fake_run(tmp_path_factory.mktemp("cli_errors"))


@pytest.fixture()
def image(tmp_path) -> Path:
    from test_app import xray_bytes

    path = tmp_path / "x.png"
    path.write_bytes(xray_bytes())
    return path


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, dest))


# ---- no network, pretrained weights: the real command in a fresh process ------------------------------


def test_train_without_network_says_no_pretrained_or_where_the_weights_go(synthetic_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, **NO_NETWORK, "TORCH_HOME": str(tmp_path / "torch_home")}
    proc = subprocess.run([sys.executable, "-m", "xrai", "train", "--data", "synthetic", "--root", str(synthetic_root),
                           "--epochs", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("xrai train: cannot get the pretrained weights")
    assert "--no-pretrained" in line and "TORCH_HOME" in line
    assert "mobilenet_v2-7ebf99e0.pth" in line and str(tmp_path / "torch_home" / "hub" / "checkpoints") in line
    assert not out.exists()  # nothing was written before the model was checked


def test_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "no_input"))  # nothing attached either
    assert main(["download", "mura"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("xrai download: cannot download Kaggle dataset") and "root=" in line


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "empty", "malicious"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(run_with_checkpoint, tmp_path, image, capsys, damage):
    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    data = best.read_bytes()
    if damage == "torn":
        best.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        best.write_bytes(b"")
    else:
        import torch

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

        torch.save({"model": Payload(), "config": {}}, best)
    assert main(["predict", "--run", str(run), str(image)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(best) in line
    assert ("refused to load" in line and "GLOBAL" in line) if damage == "malicious" else "torn" in line
    assert not (tmp_path / "pwned").exists()  # nothing in the file ran


def test_serve_with_a_torn_checkpoint_fails_at_start_in_one_line(run_with_checkpoint, tmp_path, capsys):
    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    assert main(["serve", "--run", str(run), "--port", "0"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("xrai serve: cannot read the checkpoint") and str(best) in line


@pytest.mark.parametrize("command", ["serve", "export", "predict", "explain"])
def test_a_stale_operating_point_is_one_line_naming_evaluate(run_with_checkpoint, tmp_path, image, capsys, command):
    # Loading a run only reads: an operating point chosen with another checkpoint is refused in one line that
    # names the command choosing it again, and the run folder is left as it was.
    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    (run / "report_valid.json").write_text(json.dumps({
        "split": "valid", "threshold": 0.73, "study_threshold": None, "threshold_from": "valid",
        "calibration": {"temperature": 1.0, "applied": True}, "checkpoint": {"sha256": "0" * 64}}))
    before = _snapshot(run)
    args = {"serve": ["serve", "--run", str(run), "--port", "0"],
            "export": ["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "model.pt")],
            "predict": ["predict", "--run", str(run), str(image)],
            "explain": ["explain", "--run", str(run), str(image), "--out", str(tmp_path / "cams")]}[command]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"xrai {command}: ") and "python -m xrai evaluate" in line, line
    assert _snapshot(run) == before
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "cams").exists()


def test_verbose_shows_the_traceback(run_with_checkpoint, tmp_path, image):
    from xrai.models.checkpoint import CheckpointError

    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    (run / "checkpoints" / "best.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError):
        main(["-v", "predict", "--run", str(run), str(image)])


# ---- manifests, settings, permissions -------------------------------------------------------------


def test_manifest_missing_a_column_names_the_column_and_the_file(synthetic_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    synthetic_manifest.drop(columns="label").to_csv(out / "manifest.csv", index=False)
    before = _snapshot(out)
    assert main(["train", "--data", "synthetic", "--no-pretrained", "--epochs", "1", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "'label'" in line and str(out / "manifest.csv") in line
    assert _snapshot(out) == before


@pytest.mark.parametrize("flags, field", [(["--lr", "-1"], "lr"), (["--img-size", "7"], "img_size"),
                                          (["--img-size", "3000"], "img_size"),  # issue 25, fault 11
                                          (["--batch-size", "0"], "batch_size"), (["--dropout", "1.5"], "dropout")])
def test_out_of_range_settings_are_one_line(tmp_path, capsys, flags, field):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--no-pretrained", "--out", str(out), *flags]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"xrai train: {field} must be")
    assert not out.exists()


@pytest.fixture()
def unwritable_dir(tmp_path) -> Path:
    """A folder in which creating anything raises PermissionError (root ignores modes: /sys refuses it)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
    try:
        (folder / "xrai-probe").mkdir()
    except PermissionError:
        yield folder
    else:
        (folder / "xrai-probe").rmdir()
        pytest.skip(f"cannot make an unwritable folder here ({folder} accepted a mkdir)")
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o700)


def test_permission_error_is_one_line_naming_the_path(synthetic_root, unwritable_dir, capsys):
    out = unwritable_dir / "xrai-run"
    assert main(["audit", "--data", "synthetic", "--root", str(synthetic_root), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out) in line and "permission" in line.lower()


# ---- a failed run leaves --out as it was -------------------------------------------------------------


def test_failed_runs_leave_the_run_folder_as_it_was(synthetic_root, synthetic_manifest, tmp_path, capsys, monkeypatch):
    common = ["train", "--data", "synthetic", "--root", str(synthetic_root), "--epochs", "1"]
    # An unknown model: the folder is never made.
    absent = tmp_path / "bad_model"
    assert main([*common, "--no-pretrained", "--model", "resnet19", "--out", str(absent)]) == 2
    assert "unknown model 'resnet19'" in _one_line(capsys.readouterr().err)
    assert not absent.exists()

    # A manifest (the run's own, already there) whose train split has one label: nothing changes.
    one_label = tmp_path / "one_label"
    one_label.mkdir()
    synthetic_manifest.assign(label=0).to_csv(one_label / "manifest.csv", index=False)
    before = _snapshot(one_label)
    assert main([*common, "--no-pretrained", "--out", str(one_label)]) == 2
    assert "needs both labels" in _one_line(capsys.readouterr().err)
    assert _snapshot(one_label) == before

    # Pretrained weights out of reach (no network, nothing cached).
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    offline = tmp_path / "offline"
    assert main([*common, "--out", str(offline)]) == 2
    assert "--no-pretrained" in _one_line(capsys.readouterr().err)
    assert not offline.exists()


# ---- no Python objects in messages ----------------------------------------------------------------


def test_messages_never_show_python_object_reprs(tmp_path, capsys):
    from xrai.data.decode.images import ImageError, decode_image, read_image

    junk = b"GIF89a but not really" + bytes(range(50))
    for attempt in (lambda: decode_image(junk, name="upload.gif"), lambda: decode_image(b"\x00" * 64, name="z.bin")):
        with pytest.raises(ImageError) as error:
            attempt()
        assert " at 0x" not in str(error.value) and "<_io" not in str(error.value)
    path = tmp_path / "notes.txt"
    path.write_bytes(junk)
    with pytest.raises(ImageError, match="notes.txt: not an image") as error:
        read_image(path)
    assert "object at" not in str(error.value)
    # The last line of defence: the CLI's formatter drops any repr that still slips through.
    text = one_line(ValueError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b5e90>\nsecond line"))
    assert text == "cannot identify image file the data; second line"


def test_predict_reports_a_non_image_without_reprs(run_with_checkpoint, tmp_path, capsys):
    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    from xrai.runs.operating import checkpoint_sha256

    sha = checkpoint_sha256(run / "checkpoints" / "best.pt")
    (run / "report_valid.json").write_text(json.dumps({"split": "valid", "threshold": 0.5, "checkpoint": {"sha256": sha}}))
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x00\x01 definitely not an image" * 10)
    assert main(["predict", "--run", str(run), str(bad)]) == 1  # every image failed
    out = capsys.readouterr().out
    assert "scan.png: not an image" in out and " at 0x" not in out


def test_user_error_classification():
    from xrai.data import DownloadError, ManifestError
    from xrai.data.cache import CacheSpaceError
    from xrai.models.checkpoint import CheckpointError
    from xrai.models.weights import PretrainedWeightsError
    from xrai.train.trainer import TrainingDivergedError

    for error in (CheckpointError("x"), ManifestError("x"), PretrainedWeightsError("x"), TrainingDivergedError("x"),
                  DownloadError("x"), CacheSpaceError("x"),
                  PermissionError(13, "Permission denied", "/x"), FileNotFoundError("x"), ValueError("x"),
                  OSError(28, "No space left on device", "/x")):
        assert is_user_error(error), error
    for error in (KeyError("label"), TypeError("x"), RuntimeError("x"), AttributeError("x"), pickle.PickleError()):
        assert not is_user_error(error), error
    assert one_line(PermissionError(13, "Permission denied", "/runs/a")) == (
        "permission denied: /runs/a (check the file's owner and permissions, or choose another path)")


def test_manifest_columns_are_checked_where_a_manifest_is_read(synthetic_manifest, tmp_path):
    from xrai.data import ManifestError, read_manifest, save_manifest

    save_manifest(synthetic_manifest, tmp_path)
    pd.read_csv(tmp_path / "manifest.csv").drop(columns=["split", "path"]).to_csv(tmp_path / "manifest.csv",
                                                                                  index=False)
    with pytest.raises(ManifestError, match=r"manifest.csv has no 'path', 'split' columns"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("")
    with pytest.raises(ManifestError, match=r"manifest.csv is not a readable CSV"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("command", ["predict", "serve"])
@pytest.mark.parametrize("field, value, says", [
    # issue 25, fault 4: a NaN or out-of-range threshold, a temperature or slope of 0 or NaN
    ("threshold", float("nan"), "threshold is nan, outside [0.0, 1.0]"),
    ("threshold", -5, "threshold is -5.0, outside [0.0, 1.0]"),
    ("threshold", 2.0, "threshold is 2.0, outside [0.0, 1.0]"),
    ("temperature", 0, "temperature is 0.0, outside (0.0, inf]"),
    ("temperature", float("nan"), "temperature is nan"),
    ("slope", 0.0, "slope is 0.0, outside (0.0, inf]"),
    ("slope", float("nan"), "slope is nan"),
])
def test_a_damaged_operating_point_is_refused_in_one_line_naming_the_file_and_field(
        run_with_checkpoint, tmp_path, image, capsys, command, field, value, says):
    from xrai.runs.operating import run_checkpoint_sha256

    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    calibration = {"temperature": 1.5, "applied": True}
    if field == "slope":
        calibration = {"method": "platt", "slope": value, "intercept": 0.1, "applied": True}
    elif field == "temperature":
        calibration["temperature"] = value
    report = {"split": "valid", "threshold": value if field == "threshold" else 0.5, "study_threshold": None,
              "threshold_from": "valid", "calibration": calibration,
              "checkpoint": {"sha256": run_checkpoint_sha256(run)}}
    (run / "report_valid.json").write_text(json.dumps(report))  # NaN written as Python's json does
    args = {"serve": ["serve", "--run", str(run), "--port", "0"],
            "predict": ["predict", "--run", str(run), str(image)]}[command]
    assert main(args) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert str(run / "report_valid.json") in line and says in line, line
    assert captured.out == ""  # nothing printed, above all no `"threshold": NaN`


def test_predict_never_prints_a_bare_nan(run_with_checkpoint, tmp_path, image, capsys):
    """stdout is JSON lines: a NaN anywhere in a line is refused rather than printed as `NaN`."""
    run = _copy_run(run_with_checkpoint, tmp_path / "run")
    from xrai.runs.operating import run_checkpoint_sha256

    (run / "report_valid.json").write_text(json.dumps({
        "split": "valid", "threshold": 0.5, "study_threshold": None, "threshold_from": "valid",
        "calibration": {"temperature": 1.0, "applied": True}, "checkpoint": {"sha256": run_checkpoint_sha256(run)}}))
    assert main(["predict", "--run", str(run), str(image)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["threshold"] == 0.5 and "NaN" not in out


def test_a_warning_is_one_line_without_source_lines(tmp_path):
    # Python prints a warning as two lines, the second a line of xrai's own source; the CLI says it in one
    code = ("import sys, warnings\nimport xrai.cli.commands as c\n"
            "c.COMMANDS['audit'] = lambda args: (warnings.warn('4 images were truncated\\nlisted in x.csv'), 0)[1]\n"
            f"sys.exit(c.main(['audit', '--data', 'synthetic', '--out', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "xrai audit: warning: 4 images were truncated listed in x.csv\n"
