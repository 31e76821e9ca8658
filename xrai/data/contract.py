"""The preprocessing contract of a trained model, and its numpy implementation (no torch).

What turns a decoded uint8 (H, W) radiograph into a model's input, with the numbers a run was trained
with: fit it into a ``resize_size`` square (letterbox), centre-crop ``image_size`` (zero-padded when
the square is smaller), grey -> 3 channels, x / 255, the model's normalisation (ImageNet's mean and std for
torchvision's weights, ``MODEL_NORMALISATION`` for the others); float32 (B, 3, S, S).
``xrai.data.augment.preprocess`` is the torch implementation (its eval branch is the same integer crop
and the same float32 arithmetic); ``prepare`` here is the numpy one, which the ONNX server uses
without torch; tests hold them within 1e-6. An export writes ``InputContract.to_dict()`` into its
sidecar JSON, so any runtime can rebuild the input from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xrai.config import (
    RESIZES as RESIZE_MODES,  # xrai.data.decode.images.fit_square; config imports only the stdlib
)
from xrai.data.decode.images import fit_square as _fit_square

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD", "MODEL_NORMALISATION", "InputContract",
           "centre_crop_offset", "model_normalisation", "prepare"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TensorFlow weights were trained on (x - 127) / 128 of 0-255 pixels: [-1, 1]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# The input normalisation of each model whose weights expect something other than ImageNet's mean and std
# (xrai.models.registry.register_model adds to it); every other model name gets ImageNet's.
MODEL_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "efficientnet_lite0": (LITE_MEAN, LITE_STD),
}


def model_normalisation(model: str) -> dict[str, tuple[float, float, float]]:
    """{"mean", "std"} a model's input is normalised with (ImageNet's unless MODEL_NORMALISATION says)."""
    mean, std = MODEL_NORMALISATION.get(str(model), (IMAGENET_MEAN, IMAGENET_STD))
    return {"mean": tuple(mean), "std": tuple(std)}


def centre_crop_offset(side: int, size: int) -> int:
    """Top (= left) offset of a centre crop of ``size`` from a ``side`` square, as torchvision's
    CenterCrop rounds it; negative when the crop is larger (it is then padded with zeros)."""
    return int(round((side - size) / 2.0))


@dataclass(frozen=True, kw_only=True)
class InputContract:
    """How a model's input is made from a decoded uint8 grey image.

    Attributes:
        image_size: the model's input side (the centre crop).
        resize_size: the side of the square the image is first fitted into.
        resize: how it is fitted: "letterbox" (aspect kept, padded with black) or "stretch" (resized to
            the square), as TrainConfig.resize.
        mean, std: per-channel normalisation of x / 255, after the grey image is copied to 3 channels.
    """

    image_size: int
    resize_size: int
    resize: str = "letterbox"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize_size < 1:
            raise ValueError(f"image_size and resize_size must be >= 1, got {self.image_size}, {self.resize_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")

    @classmethod
    def from_config(cls, config: Any) -> InputContract:
        """The contract of a TrainConfig (its image_size, resize_size and resize mode, and its model's
        normalisation)."""
        return cls(image_size=int(config.image_size), resize_size=int(config.resize_size),
                   resize=str(getattr(config, "resize", "letterbox")),
                   **model_normalisation(getattr(config, "model", "")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        """Read back ``to_dict()`` (a sidecar's ``input``); unknown keys are refused, naming them."""
        known = {"image_size", "resize_size", "resize", "mean", "std"}
        extra = sorted(set(data) - known - {"name", "layout", "dtype", "channels", "steps"})  # descriptive keys
        if extra:
            raise ValueError(f"unknown preprocessing keys {extra}; this xrai reads {sorted(known)}")
        values = {k: data[k] for k in known if k in data}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the layout spelled out for runtimes other than xrai."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "channels": 3,
                "layout": "NCHW", "dtype": "float32",
                "steps": ["decode to uint8 grey (DICOM windowed as the file says, MONOCHROME1 inverted)",
                          f"{self.resize} into a {self.resize_size} px square " + (
                              "(aspect kept, black padding)" if self.resize == "letterbox" else
                              "(resized to the square, aspect not kept)"),
                          f"centre crop {self.image_size} px (zero-padded if larger)",
                          "copy grey to 3 channels, x / 255, (x - mean) / std per channel"]}


def fit_square(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """The uint8 (H, W) image fitted into the contract's ``resize_size`` square."""
    return _fit_square(np.asarray(image, dtype=np.uint8), contract.resize_size, contract.resize)


def prepare(images: Sequence[np.ndarray] | np.ndarray, contract: InputContract) -> np.ndarray:
    """Decoded uint8 (H, W) images -> float32 (B, 3, S, S), exactly as the run's eval preprocessing.

    Args:
        images: one (H, W) array or a sequence of them.
        contract: the run's InputContract.
    Returns:
        The model input, C-contiguous float32.
    """
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    if len(images) == 0:
        raise ValueError("prepare got no images")
    size, side = contract.image_size, contract.resize_size
    offset = centre_crop_offset(side, size)
    crops = np.zeros((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        square = fit_square(image, contract)
        src = square[max(0, offset) : offset + size, max(0, offset) : offset + size]
        pad = max(0, -offset)
        crops[i, pad : pad + src.shape[0], pad : pad + src.shape[1]] = src
    # The same float32 operations as the torch eval branch: x * (1/255), then add + x * (1/std).
    x = crops.astype(np.float32) * np.float32(1.0 / 255.0)
    mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
    mul = (np.float32(1.0) / std).reshape(1, 3, 1, 1)
    add = (-mean / std).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(add + x[:, None] * mul, dtype=np.float32)
