"""Get a dataset onto disk: a copy attached in Kaggle first, else kagglehub; offline fails fast and clearly.

Inside a Kaggle notebook kagglehub attaches a public dataset through Kaggle's own data proxy, which
works with the notebook's Internet off (kagglehub's KaggleCacheResolver, chosen when
KAGGLE_KERNEL_RUN_TYPE and KAGGLE_DATA_PROXY_URL are set), so no network probe stands in its way
there. Everywhere else a TCP probe answers "offline" in seconds, where kagglehub would retry for minutes.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections import deque
from pathlib import Path

from xrai.env import detect_platform, kaggle_input_dir
from xrai.errors import UserError

__all__ = ["DATASETS", "DownloadError", "attach_hint", "dataset_key", "download", "find_attached", "find_cached",
           "kaggle_input_dir"]

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


# kagglehub's own cache: $KAGGLEHUB_CACHE or ~/.cache/kagglehub, then datasets/<owner>/<name>/versions/<N>/,
# with an empty <N>.complete file beside versions/ once a download has finished.
KAGGLEHUB_CACHE_ENV = "KAGGLEHUB_CACHE"
# kagglehub's KaggleCacheResolver needs both (kagglesdk.kaggle_env.is_in_kaggle_notebook).
KAGGLE_RESOLVER_ENV = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_DATA_PROXY_URL")


def dataset_key(name: str) -> str:
    """The DATASETS key of a name or a full slug ("mura", "cjinny/mura-v11" -> "mura").

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    return _resolve(name)[0]


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


def find_cached(name: str) -> Path | None:
    """The newest complete copy of dataset ``name`` in kagglehub's cache on this machine, or None."""
    _, slug = _resolve(name)
    owner, dataset = slug.split("/")
    top = Path(os.environ.get(KAGGLEHUB_CACHE_ENV, Path.home() / ".cache" / "kagglehub")) / "datasets" / owner / dataset
    try:
        versions = [int(e.name) for e in os.scandir(top / "versions") if e.is_dir() and e.name.isdigit()]
    except OSError:  # nothing cached
        return None
    complete = [v for v in sorted(versions, reverse=True) if (top / f"{v}.complete").exists()]
    return top / "versions" / str(complete[0]) if complete else None


def attach_hint(name: str) -> str:
    """How to attach dataset ``name`` to a Kaggle notebook, in one sentence."""
    _, slug = _resolve(name)
    return (f"attach Kaggle dataset '{slug}' to this notebook (right panel: Add Input > Datasets > search "
            f"'{slug.split('/')[1]}' > +), then run again")


def _kaggle_resolver_ready() -> bool:
    return all(os.environ.get(k) for k in KAGGLE_RESOLVER_ENV)


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
        f"attach it (Add Input > search '{slug}' > Add); it then appears under /kaggle/input and is used "
        f"without downloading; (2) anywhere, pass root= the folder of a local copy, e.g. "
        f"xrai.data.load('{name}', root='/path/to/{slug.split('/')[1]}')."
    )


def download(name: str, *, force: bool = False) -> Path:
    """Return a local folder holding dataset `name` (a key of DATASETS, or its slug).

    In Kaggle, a copy attached under /kaggle/input (any depth) is returned without downloading; else
    kagglehub's Kaggle resolver attaches it (no Internet needed). Elsewhere kagglehub.dataset_download
    fetches it into kagglehub's cache (reused next time), with its own progress bar.

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
    in_kaggle = detect_platform()[0] == "kaggle"
    # Kaggle's resolver attaches through the data proxy, Internet on or off: no probe before it.
    if not (in_kaggle and _kaggle_resolver_ready()) and not _network_ok():
        if in_kaggle:
            raise DownloadError(f"dataset '{slug}' is not attached and this Kaggle notebook has no Internet: "
                                f"{attach_hint(key)} (or turn Settings > Internet on)")
        raise DownloadError(_help(key, slug, f"no network connection to {KAGGLE_HOST[0]}"))
    try:
        import kagglehub  # on use: an optional install the ONNX server lacks (ImportError said below)
    except ImportError as e:
        raise DownloadError(_help(key, slug, "the kagglehub package is not installed (pip install kagglehub)")) from e
    try:
        path = kagglehub.dataset_download(slug, force_download=force)
    except Exception as e:  # noqa: BLE001 - kagglehub raises requests, HTTP and its own errors; all mean "failed"
        if in_kaggle:
            raise DownloadError(f"dataset '{slug}' is not attached and kagglehub could not attach it "
                                f"({type(e).__name__}: {e}): {attach_hint(key)}") from e
        raise DownloadError(_help(key, slug, f"kagglehub failed with {type(e).__name__}: {e}")) from e
    return Path(path)
