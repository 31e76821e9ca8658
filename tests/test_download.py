"""download(): attached Kaggle copies, kagglehub faked, offline failure in seconds. Never touches the network."""

from __future__ import annotations

import importlib
import socket
import sys
import time
import types
from pathlib import Path

import pytest

from xrai.data.download import DATASETS, DownloadError, download, find_attached

# The module, not the function xrai.data re-exports under the same name.
dl = importlib.import_module("xrai.data.download")


class FakeKagglehub(types.ModuleType):
    def __init__(self, result: Path | None = None, error: Exception | None = None):
        super().__init__("kagglehub")
        self.calls: list[tuple[str, bool]] = []
        self.result, self.error = result, error

    def dataset_download(self, handle: str, path: str | None = None, *, force_download: bool = False):
        self.calls.append((handle, force_download))
        if self.error is not None:
            raise self.error
        return str(self.result)


@pytest.fixture
def no_kaggle_input(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "no-input"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeKagglehub(result=tmp_path / "cache" / "datasets" / "x" / "versions" / "1")
    monkeypatch.setitem(sys.modules, "kagglehub", hub)
    return hub


def test_every_dataset_is_a_source_and_downloads_by_its_slug(monkeypatch, fake_hub, no_kaggle_input):
    from xrai.data import SOURCES

    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: True)
    for name in DATASETS:
        assert name in SOURCES  # what download() fetches, load() can read
        assert download(name) == fake_hub.result
    assert [handle for handle, _ in fake_hub.calls] == list(DATASETS.values())
    assert all(len(handle.split("/")) == 2 and all(handle.split("/")) for handle in DATASETS.values())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="mura, fracatlas, multiregion, bonefracture"):
        download("imagenet")


@pytest.mark.parametrize(
    ("name", "attached"),
    [
        ("mura", "mura-v11"),
        ("mura", "datasets/cjinny/mura-v11"),
        ("mura", "my-copy/MURA-v1.1"),
        ("fracatlas", "fracatlas-original-dataset"),
        ("fracatlas", "somebody/FracAtlas"),
        ("multiregion", "fracture-multi-region-x-ray-data"),
        ("bonefracture", "a/b/bone-fracture-detection-using-xrays"),
    ],
)
def test_attached_copy_found_at_any_depth_without_downloading(tmp_path, monkeypatch, fake_hub, name, attached):
    inp = tmp_path / "input"
    (inp / "unrelated-dataset" / "sub").mkdir(parents=True)
    (inp / attached).mkdir(parents=True)
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(inp))
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: pytest.fail("must not probe the network"))
    assert download(name) == inp / attached
    assert fake_hub.calls == []


def test_find_attached_none(tmp_path):
    assert find_attached("mura", tmp_path / "missing") is None
    (tmp_path / "other").mkdir()
    assert find_attached("mura", tmp_path) is None


def test_downloads_through_kagglehub(monkeypatch, fake_hub, no_kaggle_input):
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: True)
    assert download("fracatlas") == fake_hub.result
    assert download("mura", force=True) == fake_hub.result
    assert fake_hub.calls == [
        ("mahmudulhasantasin/fracatlas-original-dataset", False),
        ("cjinny/mura-v11", True),
    ]


def test_force_ignores_an_attached_copy(tmp_path, monkeypatch, fake_hub):
    (tmp_path / "input" / "mura-v11").mkdir(parents=True)
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "input"))
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: True)
    assert download("mura", force=True) == fake_hub.result


def test_offline_fails_fast_with_both_ways_out(monkeypatch, fake_hub, no_kaggle_input):
    # Offline as a sandbox sees it: every connection attempt is refused at once.
    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download("mura")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "cjinny/mura-v11" in msg and "Add Input" in msg and "root=" in msg
    assert fake_hub.calls == []  # kagglehub (which retries for minutes) never called


def test_hanging_network_is_cut_short(monkeypatch, fake_hub, no_kaggle_input):
    """A probe that hangs (DNS ignores socket timeouts) is abandoned after the timeout."""
    monkeypatch.setattr(dl, "NETWORK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    assert dl._network_ok(timeout=0.2) is False
    assert time.monotonic() - start < 3


def test_network_probe_against_a_closed_local_port():
    with socket.socket() as s:  # find a free port, then close it: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert dl._network_ok(("127.0.0.1", port), timeout=1.0) is False
    assert time.monotonic() - start < 3


def test_proxy_is_probed_instead_of_kaggle(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert dl._probe_address() == ("proxy.internal", 3128)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    assert dl._probe_address() == dl.KAGGLE_HOST


def test_kagglehub_failure_is_wrapped(monkeypatch, tmp_path, no_kaggle_input):
    hub = FakeKagglehub(error=ConnectionError("403 Forbidden"))
    monkeypatch.setitem(sys.modules, "kagglehub", hub)
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: True)
    with pytest.raises(DownloadError, match=r"vuppalaadithyasairam/bone-fracture-detection-using-xrays.*403"):
        download("bonefracture")


def test_kagglehub_missing(monkeypatch, no_kaggle_input):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import now raises ImportError
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: True)
    with pytest.raises(DownloadError, match="pip install kagglehub"):
        download("mura")


# ---- inside Kaggle, and kagglehub's cache --------------------------------------------------------


@pytest.fixture
def in_kaggle(monkeypatch, no_kaggle_input):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("KAGGLE_DATA_PROXY_URL", "https://dp.kaggle.net")
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: pytest.fail("no probe may stand before Kaggle's resolver"))


def test_kaggle_resolver_is_asked_without_a_network_probe(in_kaggle, fake_hub):
    assert download("mura") == fake_hub.result
    assert fake_hub.calls == [("cjinny/mura-v11", False)]


def test_kaggle_resolver_failing_names_the_dataset_to_attach(in_kaggle, monkeypatch):
    hub = FakeKagglehub(error=ConnectionError("data proxy refused"))
    monkeypatch.setitem(sys.modules, "kagglehub", hub)
    with pytest.raises(DownloadError) as info:
        download("fracatlas")
    msg = str(info.value)
    assert "attach Kaggle dataset 'mahmudulhasantasin/fracatlas-original-dataset'" in msg and "Add Input" in msg
    assert "data proxy refused" in msg and "\n" not in msg


def test_kaggle_without_its_resolver_and_offline_says_attach(monkeypatch, fake_hub, no_kaggle_input):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.delenv("KAGGLE_DATA_PROXY_URL", raising=False)
    monkeypatch.setattr(dl, "_network_ok", lambda *a, **k: False)
    with pytest.raises(DownloadError, match=r"not attached.*no Internet: attach Kaggle dataset 'cjinny/mura-v11'"):
        download("mura")
    assert fake_hub.calls == []


def test_find_cached_takes_the_newest_complete_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    top = tmp_path / "datasets" / "cjinny" / "mura-v11"
    assert dl.find_cached("mura") is None
    for v in (1, 2, 3):
        (top / "versions" / str(v)).mkdir(parents=True)
    (top / "1.complete").touch()
    (top / "2.complete").touch()  # 3 is a download that never finished
    assert dl.find_cached("mura") == top / "versions" / "2"
    assert dl.find_cached("cjinny/mura-v11") == top / "versions" / "2"
