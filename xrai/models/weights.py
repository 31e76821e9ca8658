"""ImageNet weights for the registry's models: found on disk, or downloaded only when the network answers.

A dead network must not hang a notebook: the download is tried only after a HEAD request got an
answer within a few seconds, and the error says how to run without the weights or where to put them.
"""

from __future__ import annotations

import http.client
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import torchvision

from xrai.errors import UserError
from xrai.models.registry import ModelSpec

__all__ = ["CONNECT_TIMEOUT_S", "PretrainedWeightsError", "cached_weights_file", "pretrained_weights", "weights_help"]

CONNECT_TIMEOUT_S = 3.0


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for but can be neither found on disk nor downloaded."""


def pretrained_weights(spec: ModelSpec) -> torchvision.models.WeightsEnum:
    """The weights enum, after checking that it can be had without hanging on a dead network."""
    weights = torchvision.models.get_weight(spec.weights)
    if cached_weights_file(weights).is_file():
        return weights  # torch.hub loads a cached file without touching the network
    if not _can_reach(weights.url, timeout=CONNECT_TIMEOUT_S):
        host = urllib.parse.urlsplit(weights.url).hostname
        raise PretrainedWeightsError(weights_help(spec, f"{host} is unreachable (no network?)"))
    return weights


def cached_weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch.hub keeps (and first looks for) a weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(weights.url).path).name


def weights_help(spec: ModelSpec, reason: str) -> str:
    weights = torchvision.models.get_weight(spec.weights)
    file = cached_weights_file(weights)
    return (
        f"cannot get the pretrained weights {spec.weights} for {spec.name}: {reason}. Either build "
        f"without them (create_model({spec.name!r}, pretrained=False), or --no-pretrained on the command "
        f"line), or turn the network on (Kaggle: Settings > Internet on), or download {weights.url} "
        f"elsewhere and put the file {file.name} in {file.parent} (torch.hub.get_dir()/checkpoints; "
        f"TORCH_HOME moves it)."
    )


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
