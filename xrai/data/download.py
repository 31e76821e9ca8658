"""Get a dataset onto disk: a copy attached in Kaggle first, else kagglehub; offline fails fast and clearly."""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections import deque
from pathlib import Path

from xrai.env import detect_platform
from xrai.errors import UserError

__all__ = ["DATASETS", "DownloadError", "download", "find_attached", "kaggle_input_dir"]

DATASETS = {
    "mura": "cjinny/mura-v11",
    "fracatlas": "mahmudulhasantasin/fracatlas-original-dataset",
    "multiregion": "bmadushanirodrigo/fracture-multi-region-x-ray-data",
    "bonefracture": "vuppalaadithyasairam/bone-fracture-detection-using-xrays",
}

# Folder names that identify an attached copy when Kaggle mounts it under a name other than the slug's.
_MARKERS = {
    "mura": ("mura-v1.1",),
    "fracatlas": ("fracatlas",),
    "multiregion": ("bone_fracture_binary_classification",),
    "bonefracture": ("archive (6)",),
}
KAGGLE_HOST = ("www.kaggle.com", 443)
NETWORK_TIMEOUT_S = 3.0
_ATTACHED_DEPTH = 4  # /kaggle/input/<slug>/... or /kaggle/input/datasets/<owner>/<slug>/...


class DownloadError(UserError, RuntimeError):
    """A dataset could not be fetched; the message names the slug and the two ways out."""


def kaggle_input_dir() -> Path:
    """Kaggle's read-only folder of attached data ($XRAI_KAGGLE_INPUT overrides it, for tests)."""
    return Path(os.environ.get("XRAI_KAGGLE_INPUT", "/kaggle/input"))


def _resolve(name: str) -> tuple[str, str]:
    key = name.strip().lower()
    if key in DATASETS:
        return key, DATASETS[key]
    for k, slug in DATASETS.items():  # a full slug is accepted too
        if key == slug.lower():
            return k, slug
    raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


def find_attached(name: str, input_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of an attached copy of dataset `name` under Kaggle's input folder, at any depth, or None.

    A folder matches when it is named like the slug's dataset part (``mura-v11``) or like a folder
    the dataset is known to hold (``MURA-v1.1``); the shallowest match wins.
    """
    key, slug = _resolve(name)
    top = Path(input_dir) if input_dir is not None else kaggle_input_dir()
    if not top.is_dir():
        return None
    wanted = {slug.split("/")[1].lower(), *_MARKERS.get(key, ())}
    queue = deque([(top, 0)])
    while queue:
        d, depth = queue.popleft()
        if depth >= _ATTACHED_DEPTH:
            continue
        try:
            subs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
        except OSError:  # unreadable mount point: nothing attached there for us
            continue
        for sub in map(Path, subs):
            if sub.name.lower() in wanted:
                return sub
        queue.extend((Path(s), depth + 1) for s in subs)
    return None


def _probe_address() -> tuple[str, int]:
    """Where a connection must get to: the HTTPS proxy if one is set, else Kaggle itself."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    return KAGGLE_HOST


def _network_ok(address: tuple[str, int] | None = None, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """True when a TCP connection to Kaggle (or the proxy) opens within `timeout` seconds.

    kagglehub itself retries for minutes without a network; this answers in seconds. The probe runs
    in a daemon thread because name resolution ignores socket timeouts.
    """
    address = address or _probe_address()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result.append(True)
        except Exception:  # noqa: BLE001 - any failure to connect (OSError, a bad host name's UnicodeError) is "no network"
            result.append(False)

    thread = threading.Thread(target=probe, name="xrai-network-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result) and result[0]


def _help(name: str, slug: str, reason: str) -> str:
    return (
        f"cannot download Kaggle dataset '{slug}': {reason}. Two ways out: (1) in a Kaggle notebook, "
        f"attach it (Add data > search '{slug}' > Add); it then appears under /kaggle/input and is used "
        f"without downloading; (2) anywhere, pass root= the folder of a local copy, e.g. "
        f"xrai.data.load('{name}', root='/path/to/{slug.split('/')[1]}')."
    )


def download(name: str, *, force: bool = False) -> Path:
    """Return a local folder holding dataset `name` (a key of DATASETS, or its slug).

    In Kaggle, a copy attached under /kaggle/input (any depth) is returned without downloading.
    Otherwise kagglehub.dataset_download fetches it into kagglehub's cache (reused next time).

    Args:
        name: "mura", "fracatlas", "multiregion" or "bonefracture".
        force: download again even if kagglehub has it cached (an attached copy is then ignored).
    Raises:
        ValueError: unknown name.
        DownloadError: no network, kagglehub missing, or kagglehub failed; says what to do.
    """
    key, slug = _resolve(name)
    if not force:
        attached = find_attached(key)
        if attached is not None:
            return attached
    if not _network_ok():
        platform, _ = detect_platform()
        where = " (Kaggle notebooks need Settings > Internet on)" if platform == "kaggle" else ""
        raise DownloadError(_help(key, slug, f"no network connection to {KAGGLE_HOST[0]}{where}"))
    try:
        import kagglehub
    except ImportError as e:
        raise DownloadError(_help(key, slug, "the kagglehub package is not installed (pip install kagglehub)")) from e
    try:
        path = kagglehub.dataset_download(slug, force_download=force)
    except Exception as e:  # noqa: BLE001 - kagglehub raises requests, HTTP and its own errors; all mean "failed"
        raise DownloadError(_help(key, slug, f"kagglehub failed with {type(e).__name__}: {e}")) from e
    return Path(path)
