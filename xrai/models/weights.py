"""ImageNet weights for the registry's models: found on disk, or downloaded only when the network answers.

A dead network must not hang a notebook: the download is tried only after a HEAD request got an
answer within a few seconds, and the error says how to run without the weights or where to put them.

With the Internet off (Kaggle), ``python -m xrai wheelhouse --weights NAME`` puts the weights files in
the wheelhouse's ``weights/`` folder with a ``SHA256SUMS``; attached as a dataset, a file found there
(its sha256 checked) is copied into torch.hub's checkpoints folder before any network check.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import torchvision

from xrai.env import kaggle_input_dir
from xrai.errors import UserError
from xrai.fileio import sha256_file
from xrai.models.lite import LITE0_SHA256, lite0_weights_file
from xrai.models.registry import ModelSpec

__all__ = ["CONNECT_TIMEOUT_S", "SUMS_FILE", "WEIGHTS_DIR", "WEIGHTS_DIR_ENV", "PretrainedWeightsError",
           "cached_weights_file", "install_wheelhouse_weights", "pretrained_weights", "read_sums", "sha256_file",
           "weights_file_name", "weights_help", "weights_record", "wheel_weights_file", "wheelhouse_weights_dirs",
           "write_sums"]

CONNECT_TIMEOUT_S = 3.0
WEIGHTS_DIR = "weights"  # the wheelhouse's folder of weights files
SUMS_FILE = "SHA256SUMS"  # in it: "<sha256>  <file name>" per line, as sha256sum writes it
WEIGHTS_DIR_ENV = "XRAI_WEIGHTS_DIR"  # a weights folder (or a wheelhouse holding one) to look in first
_SEARCH_DEPTH = 5  # <input>/datasets/<owner>/<slug>/weights, as deep as the install cell looks for wheels

log = logging.getLogger(__name__)


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for but can be neither found on disk nor downloaded."""


def pretrained_weights(spec: ModelSpec) -> torchvision.models.WeightsEnum:
    """The weights enum, after checking that it can be had without hanging on a dead network."""
    weights = torchvision.models.get_weight(spec.weights)
    if cached_weights_file(weights).is_file():
        return weights  # torch.hub loads a cached file without touching the network
    if install_wheelhouse_weights(weights) is not None:
        return weights  # copied from an attached wheelhouse: cached now
    if not _can_reach(weights.url, timeout=CONNECT_TIMEOUT_S):
        host = urllib.parse.urlsplit(weights.url).hostname
        folders = wheelhouse_weights_dirs()
        absent = (f" and {weights_file_name(weights)} is not in the wheelhouse's weights folder "
                  f"{', '.join(map(str, folders))}" if folders else "")
        raise PretrainedWeightsError(weights_help(spec, f"{host} is unreachable (no network?){absent}"))
    return weights


def wheel_weights_file(spec: ModelSpec) -> Path:
    """The weights file of a model whose weights come in a pip wheel (``spec.source == "wheel"``).

    Raises:
        PretrainedWeightsError: the wheel is not installed (one line: what to install, or how to go without).
    """
    path = lite0_weights_file()
    if path is None:
        raise PretrainedWeightsError(
            f"cannot get the pretrained weights of {spec.name}: the {spec.weights} wheel is not installed. "
            f'Install it (pip install "xrai[lite]"; offline: add it to the wheelhouse with python -m xrai '
            f"wheelhouse --weights {spec.name}), or build without them (--no-pretrained).")
    return path


def cached_weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch.hub keeps (and first looks for) a weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights_file_name(weights)


def weights_file_name(weights: torchvision.models.WeightsEnum) -> str:
    """The weights file's name, from its URL ("mobilenet_v2-7ebf99e0.pth")."""
    return Path(urllib.parse.urlsplit(weights.url).path).name


def weights_help(spec: ModelSpec, reason: str) -> str:
    weights = torchvision.models.get_weight(spec.weights)
    file = cached_weights_file(weights)
    return (
        f"cannot get the pretrained weights {spec.weights} for {spec.name}: {reason}. Either build "
        f"without them (create_model({spec.name!r}, pretrained=False), or --no-pretrained on the command "
        f"line), or turn the network on (Kaggle: Settings > Internet on), or add {file.name} to the attached "
        f"wheelhouse dataset (python -m xrai wheelhouse --weights {spec.name}), or download {weights.url} "
        f"elsewhere and put the file {file.name} in {file.parent} (torch.hub.get_dir()/checkpoints; "
        f"TORCH_HOME moves it)."
    )


# ---- weights from an attached wheelhouse (Internet off) ----------------------------------------------


def read_sums(folder: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} from ``folder``/SHA256SUMS ({} when absent); "<hex>  <name>" or "<hex> *<name>" lines."""
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.strip().partition(" ")
        if digest and name:
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def write_sums(folder: str | os.PathLike) -> Path:
    """Write ``folder``/SHA256SUMS for every other file in ``folder`` (sha256sum's format, sorted)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE)
    path = folder / SUMS_FILE
    path.write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files), encoding="utf-8")
    return path


def wheelhouse_weights_dirs() -> list[Path]:
    """Weights folders holding a SHA256SUMS, in the order they are searched: $XRAI_WEIGHTS_DIR (the folder
    itself or its ``weights/``), then every folder under Kaggle's input folder ($XRAI_KAGGLE_INPUT) holding
    a SHA256SUMS (the wheelhouse's ``weights/``, or a dataset whose files were uploaded flat), down to the
    depth where the notebooks' install cell looks for the wheelhouse's wheels."""
    candidates: list[Path] = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        given = Path(os.environ[WEIGHTS_DIR_ENV])
        candidates += [given, given / WEIGHTS_DIR]
    root = kaggle_input_dir()
    if root.is_dir():
        for depth in range(1, _SEARCH_DEPTH + 1):
            candidates += sorted(p.parent for p in root.glob("/".join(["*"] * depth + [SUMS_FILE])))
    return [c for c in dict.fromkeys(candidates) if (c / SUMS_FILE).is_file()]


def install_wheelhouse_weights(weights: torchvision.models.WeightsEnum) -> Path | None:
    """Copy the weights file from the first wheelhouse weights folder listing it into torch.hub's cache.

    Returns:
        The file copied (None when no folder lists it, or lists it without holding it).
    Raises:
        PretrainedWeightsError: the file's sha256 is not the one its SHA256SUMS gives (one line, naming it).
    """
    name = weights_file_name(weights)
    for folder in wheelhouse_weights_dirs():
        expected = read_sums(folder).get(name)
        source = folder / name
        if expected is None or not source.is_file():
            continue
        got = sha256_file(source)
        if got != expected:
            raise PretrainedWeightsError(f"{source}: sha256 {got} is not the {expected} that {folder / SUMS_FILE} "
                                         f"gives; build the wheelhouse again (python -m xrai wheelhouse --weights)")
        target = cached_weights_file(weights)
        target.parent.mkdir(parents=True, exist_ok=True)
        # copied beside the target, then renamed: a half-copied file is never taken for the weights
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("pretrained weights %s copied from %s into %s", name, folder, target.parent)
        return source
    return None


def weights_record(spec: ModelSpec) -> dict | None:
    """{"weights", "file", "sha256"} of the cached weights file a pretrained build of ``spec`` loads
    (None when it is not cached): what a run may record about the ImageNet weights it started from."""
    if spec.source == "wheel":
        path = lite0_weights_file()
        return None if path is None else {"weights": spec.weights, "file": path.name, "sha256": LITE0_SHA256}
    weights = torchvision.models.get_weight(spec.weights)
    file = cached_weights_file(weights)
    if not file.is_file():
        return None
    return {"weights": spec.weights, "file": file.name, "sha256": sha256_file(file)}


def _can_reach(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a HEAD request for the URL gets any HTTP answer within ``timeout`` seconds.

    It goes through urllib as torch.hub's download does, so proxies, TLS interception and captive
    networks count the same way for both. It runs in a daemon thread because name resolution ignores
    socket timeouts and can hang for long on a machine with no network.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server answered: the download will report what it says
            result.append(True)
        except (OSError, http.client.HTTPException, ValueError):  # no DNS, refused, timed out, TLS failed
            result.append(False)

    thread = threading.Thread(target=probe, name="xrai-weights-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
