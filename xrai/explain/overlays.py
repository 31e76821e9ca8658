"""Pictures of a CAM: mapped back onto the original X-ray's pixels, blended over it with a text band
(actual and predicted label, probability), gallery tiles and rows, PNG files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from xrai.labels import CLASS_NAMES, DEFAULT_THRESHOLD

__all__ = ["cam_to_image", "overlay", "save_png", "text_band", "tile_row"]


def cam_to_image(cam: np.ndarray, shape: tuple[int, int], *, resize_size: int,
                 resize: str = "letterbox") -> np.ndarray:
    """Map a CAM from the model's input frame back onto the original image's pixels.

    The model saw ``fit_square(image, resize_size, resize)`` centre-cropped to ``cam.shape``
    (``xrai.data.augment.preprocess``). This undoes both: the crop is placed back in the square (the
    cropped-away ring gets 0); for "letterbox" the padding is cut off; the content is resized to ``shape``.

    Returns:
        float32 (H, W) in the CAM's range.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or cam.shape[0] != cam.shape[1]:
        raise ValueError(f"cam must be a square (C, C) map in the model's input frame, got {cam.shape}")
    h, w = int(shape[0]), int(shape[1])
    side, crop = int(resize_size), cam.shape[0]
    # the same integer offset as GpuAugment's eval branch (torchvision CenterCrop); negative = padded
    offset = int(round((side - crop) / 2.0))
    canvas = np.zeros((side, side), dtype=np.float32)
    lo, hi = max(offset, 0), min(offset + crop, side)
    canvas[lo:hi, lo:hi] = cam[lo - offset : hi - offset, lo - offset : hi - offset]
    if resize == "stretch":  # the whole square is the image, squashed
        return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
    # the letterbox geometry of xrai.data.decode.images.letterbox
    scale = side / max(h, w)
    new_w, new_h = min(side, max(1, round(w * scale))), min(side, max(1, round(h * scale)))
    top, left = (side - new_h) // 2, (side - new_w) // 2
    content = canvas[top : top + new_h, left : left + new_w]
    return cv2.resize(content, (w, h), interpolation=cv2.INTER_LINEAR)


def text_band(width: int, lines: list[str], colour: tuple[int, int, int], *, max_scale: float = 1.0) -> np.ndarray:
    """Lines of text on black, as wide as the image, the font scaled down until the widest line fits."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = float(np.clip(width / 560, 0.3, max_scale))
    for _ in range(3):  # shrink until the widest line fits narrow images (thickness grows with scale)
        thick = max(1, int(round(scale * 1.6)))
        widest = max(cv2.getTextSize(s, font, scale, thick)[0][0] for s in lines)
        if widest <= 0.96 * width:
            break
        scale *= 0.96 * width / widest
    line_h = cv2.getTextSize("Ag", font, scale, thick)[0][1]
    pad = max(3, int(line_h * 0.6))
    band = np.zeros((pad + len(lines) * (line_h + pad), width, 3), dtype=np.uint8)
    for i, text in enumerate(lines):
        y = pad + line_h + i * (line_h + pad)
        cv2.putText(band, text, (max(2, int(width * 0.02)), y), font, scale, colour, thick, cv2.LINE_AA)
    return band


def overlay(
    image_uint8_hw: np.ndarray,
    cam: np.ndarray,
    *,
    label: int | None = None,
    predicted: int | None = None,
    probability: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    resize_size: int | None = None,
    alpha: float = 0.4,
    resize: str = "letterbox",
    names: tuple[str, str] = CLASS_NAMES,
) -> np.ndarray:
    """The heatmap over the ORIGINAL X-ray, with a text band above it (actual label, predicted label,
    probability) when any of those is given.

    Args:
        image_uint8_hw: the original grey image (H, W) uint8, as ``read_image`` returns it.
        cam: a map on the image's own pixels (H, W), or one in the model's input frame (C, C) together
            with ``resize_size`` and ``resize`` (the run's ``config.resize_size``, ``config.resize``); see
            :func:`cam_to_image`.
        label: the actual label (0/1) or None when unknown.
        predicted: the predicted label; derived from ``probability >= threshold`` when None.
        alpha: heatmap weight.
        names: the words for label 0 and 1 (``xrai.labels.class_names(source)``: FracAtlas's are
            "not fractured" / "fractured").

    Returns:
        RGB uint8 (band + H, W, 3); the bottom H rows are the overlay at the original size.
    """
    image = np.asarray(image_uint8_hw)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if image.ndim != 2:
        raise ValueError(f"overlay wants a grey (H, W) image, got shape {image.shape}")
    h, w = image.shape
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (h, w):
        if resize_size is None:
            raise ValueError(
                f"cam {cam.shape} is not on the image's pixels {(h, w)}: pass resize_size= (the run's "
                "config.resize_size) to map it from the model's input frame"
            )
        cam = cam_to_image(cam, (h, w), resize_size=resize_size, resize=resize)
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32) / 255.0
    out = show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)
    if predicted is None and probability is not None:
        predicted = int(probability >= threshold)
    if label is None and predicted is None and probability is None:
        return out
    lines, colour = _band_text(label, predicted, probability, threshold, names)
    return np.concatenate([text_band(w, lines, colour), out], axis=0)


def _band_text(label: int | None, predicted: int | None, probability: float | None, threshold: float,
               names: tuple[str, str]) -> tuple[list[str], tuple[int, int, int]]:
    """The text band's lines and colour: green when the prediction is right, red when wrong, else white."""
    lines = []
    if label is not None:
        lines.append(f"actual: {names[int(label)]}")
    if predicted is not None:
        lines.append(f"predicted: {names[int(predicted)]}")
    if probability is not None:
        lines.append(f"p({names[1]}) = {probability:.3f} (threshold {threshold:.3f})")
    colour = (255, 255, 255)
    if label is not None and predicted is not None:
        colour = (90, 220, 90) if int(label) == int(predicted) else (255, 90, 90)
    return lines, colour


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)
    return path


def tile_row(tiles: list[np.ndarray], title: str) -> np.ndarray:
    """Tiles side by side under a title band (a gallery row)."""
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 8), (0, 0))) for t in tiles]
    row = np.concatenate(padded, axis=1)[:, :-8]
    return np.concatenate([text_band(row.shape[1], [title], (255, 255, 255)), row], axis=0)
