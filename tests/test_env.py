"""Runtime detection, faked: environment variables and CUDA properties, never a real GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xrai import env


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, ("local", False)),
        ({"COLAB_RELEASE_TAG": "release-colab_20261101"}, ("colab", False)),
        ({"COLAB_GPU": "1"}, ("colab", False)),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, ("kaggle", False)),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ("kaggle", True)),
        ({"KAGGLE_URL_BASE": "https://www.kaggle.com"}, ("kaggle", False)),
    ],
)
def test_detect_platform(environ, expected):
    assert env.detect_platform(environ) == expected


@pytest.mark.parametrize(
    "capability, dtype", [((7, 5), "float16"), ((7, 0), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16"),
                          ((6, 1), None)]
)
def test_amp_dtype_for(capability, dtype):
    assert env.amp_dtype_for(capability) == dtype


def _fake_cuda(monkeypatch, names):
    import torch

    props = [SimpleNamespace(name=n, total_memory=15 * 2**30, major=7, minor=5) for n in names]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(names))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])


def test_kaggle_t4x2(monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    _fake_cuda(monkeypatch, ["Tesla T4", "Tesla T4"])
    info = env.check_runtime()
    out = capsys.readouterr().out
    assert info.platform == "kaggle" and info.has_t4 and len(info.gpus) == 2
    assert info.device == "cuda" and info.amp_dtype == "float16"
    assert "Tesla T4" in out and "T4      : yes" in out
    env.check_runtime(strict=True, show=False)  # no raise


@pytest.mark.parametrize("platform_env, hint", [
    ({"COLAB_RELEASE_TAG": "x"}, "Runtime > Change runtime type"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "Accelerator > GPU T4 x2"),
])
def test_no_t4_says_how(monkeypatch, capsys, platform_env, hint):
    for key in ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE",
                "KAGGLE_DATA_PROXY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for k, v in platform_env.items():
        monkeypatch.setenv(k, v)
    _fake_cuda(monkeypatch, [])
    info = env.check_runtime()
    assert not info.has_t4 and info.device == "cpu" and info.amp_dtype is None
    assert hint in capsys.readouterr().out
    with pytest.raises(env.NoT4Error, match=hint.split(" >")[0]):
        env.check_runtime(strict=True, show=False)


def test_other_gpu_is_not_t4(monkeypatch):
    _fake_cuda(monkeypatch, ["NVIDIA A100-SXM4-40GB"])
    info = env.runtime_info()
    assert info.has_gpu and not info.has_t4


def test_get_device_cpu_and_missing_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env.get_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        env.get_device("cuda")
    assert env.autocast_dtype(torch.device("cpu")) is None


def test_seed_everything_repeats():
    import random

    import numpy as np
    import torch

    env.seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    env.seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_xrai_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAI_HOME", str(tmp_path))
    assert env.xrai_home() == tmp_path


# ---- the GPU stop and the run folder ---------------------------------------------------------------


def test_require_gpu_stops_without_one_unless_allowed(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    _fake_cuda(monkeypatch, [])
    with pytest.raises(env.NoGPUError, match=r"Settings > Accelerator > GPU T4 x2.*ALLOW_CPU = True"):
        env.require_gpu(dataset="mura")
    assert env.require_gpu(allow_cpu=True, dataset="mura").device == "cpu"
    assert env.require_gpu(dataset="synthetic").device == "cpu"
    _fake_cuda(monkeypatch, ["NVIDIA L4"])
    assert env.require_gpu(dataset="mura").has_gpu


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """A Kaggle-like machine: cwd is the working folder, XRAI_KAGGLE_INPUT the (read-only) input folder."""
    work, inputs = tmp_path / "working", tmp_path / "input"
    work.mkdir()
    inputs.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(inputs))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    return work, inputs


def _attach_run(inputs, mount: str, files: dict[str, str]):
    import os
    import stat

    run = inputs / mount
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    for folder, dirs, names in os.walk(inputs):
        for item in [folder, *(os.path.join(folder, n) for n in dirs + names)]:
            os.chmod(item, os.stat(item).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return run


def test_attached_run_folder_is_copied_into_the_working_folder(kaggle, capsys):
    work, inputs = kaggle
    _attach_run(inputs, "notebooks/me/xrai-01/runs/mura", {"manifest.csv": "a", "manifest.json": "{}"})
    _attach_run(inputs, "notebooks/me/xrai-02/runs/mura", {"manifest.csv": "a", "audit.csv": "b", "eda/x.png": "c"})
    got = env.prepare_run_dir("runs/mura")
    assert got == str(work / "runs" / "mura")
    assert sorted(p.relative_to(got).as_posix() for p in (work / "runs" / "mura").rglob("*") if p.is_file()) == [
        "audit.csv", "eda/x.png", "manifest.csv"], "the fullest attached copy (the later notebook's) is taken"
    (work / "runs" / "mura" / "eda" / "new.png").write_text("writable")  # folders and files copied writable
    (work / "runs" / "mura" / "audit.csv").write_text("rewritten")
    line = capsys.readouterr().out
    assert line.startswith(f"run folder: {work / 'runs' / 'mura'}; 3 files copied from {inputs}/notebooks/me/xrai-02")
    assert env.prepare_run_dir("runs/mura", show=False) == got  # run again: the working copy is used as it is
    assert (work / "runs" / "mura" / "audit.csv").read_text() == "rewritten"


def test_run_folder_under_the_input_folder_is_copied_out(kaggle):
    work, inputs = kaggle
    run = _attach_run(inputs, "xrai-03/runs/mura", {"manifest.csv": "a"})
    assert env.prepare_run_dir(str(run), show=False) == str(work / "runs" / "mura")
    assert (work / "runs" / "mura" / "manifest.csv").read_text() == "a"


def test_a_writable_run_folder_is_used_where_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    assert env.prepare_run_dir("runs/x", show=False) == str(tmp_path / "runs" / "x")
    assert env.prepare_run_dir(tmp_path / "abs", show=False) == str(tmp_path / "abs")


def test_colab_puts_a_relative_run_folder_on_drive(monkeypatch, tmp_path):
    import sys
    import types

    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda where: mounted.append(where))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "none"))
    assert env.prepare_run_dir("runs/mura", show=False) == "/content/drive/MyDrive/xrai/runs/mura"
    assert mounted == ["/content/drive"]
    assert env.prepare_run_dir("runs/mura", use_drive=False, show=False).endswith("runs/mura") and len(mounted) == 1
    assert env.prepare_run_dir("/content/drive/MyDrive/mine", show=False) == "/content/drive/MyDrive/mine"
    assert len(mounted) == 2
