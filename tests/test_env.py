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
