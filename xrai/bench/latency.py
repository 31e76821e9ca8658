"""One image's latency on the CPU, PyTorch beside onnxruntime (``bench``'s predict_ms).

Both from the same decoded image to the same calibrated probability: PyTorch through
``xrai.data.augment.preprocess`` and the model, onnxruntime through the numpy contract
(``xrai.data.contract.prepare``) and the model exported to ONNX, as ``serve --onnx`` runs it, with
the same number of intra-op threads.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from xrai.bench.timing import timed_ms
from xrai.data.augment import preprocess
from xrai.data.contract import InputContract, prepare
from xrai.deploy.export import CalibratedModel, example_batch, onnx_available, onnx_bytes
from xrai.deploy.onnx_runtime import cpu_session

__all__ = ["cpu_predict_latency", "timed_ms"]


def cpu_predict_latency(model: nn.Module, *, image: np.ndarray, image_size: int, resize_size: int, runs: int,
                        onnx: bool = True, session: Any = None) -> dict:
    """ms from a decoded image to its probability on the CPU: PyTorch, and onnxruntime on the same model.

    Args:
        model: the one-logit model (copied to the CPU; the original is left where it is).
        image: a decoded uint8 (H, W) image.
        image_size, resize_size: the preprocessing.
        runs: timed calls after 3 warm-up calls.
        onnx: also time onnxruntime (when installed); the model is exported to ONNX for it.
        session: an onnxruntime session of this very model (an export made elsewhere) instead.
    Returns:
        {"torch_cpu": {"median", "p90"}, "onnxruntime_cpu": {"median", "p90"} or None}.
    """
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    wrapped = CalibratedModel(cpu_model).eval()

    def torch_once() -> float:
        x = preprocess([image], image_size=image_size, resize_size=resize_size)
        with torch.inference_mode():
            return float(wrapped(x)[1][0])

    out = {"torch_cpu": timed_ms(torch_once, runs), "onnxruntime_cpu": None}
    contract = InputContract(image_size=image_size, resize_size=resize_size)
    if session is None and onnx and onnx_available():
        # like for like with PyTorch's threads
        session = cpu_session(onnx_bytes(wrapped, example_batch(contract, batch=2)), threads=torch.get_num_threads())
    if session is not None:
        name = session.get_inputs()[0].name

        def onnx_once() -> float:
            return float(session.run(["probability"], {name: prepare([image], contract)})[0][0])

        out["onnxruntime_cpu"] = timed_ms(onnx_once, runs)
    return out

