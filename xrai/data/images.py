"""The one safe decoder: any PNG or JPEG X-ray -> uint8 (H, W) grey, or an ImageError that names the file."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin

__all__ = [
    "DECODER_VERSION",
    "MAX_PIXELS",
    "ImageError",
    "TruncatedImageWarning",
    "fit_square",
    "letterbox",
    "read_image",
    "scan_images",
    "stretch",
]

# Part of every decoded-image cache key: bump it whenever read_image or letterbox can return other pixels.
DECODER_VERSION = "1"

# 64 MiPixels: ~8000 x 8000, far beyond any radiograph (MURA and FracAtlas are <= ~3000 px a side), and
# below PIL's own MAX_IMAGE_PIXELS (~89 M), so our header check always fires before PIL's would.
MAX_PIXELS = 64 * 2**20

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names the file and what is wrong."""


class TruncatedImageWarning(UserWarning):
    """A truncated JPEG was decoded as far as its data goes (the rest of the picture is grey)."""


def _open(data: bytes, path: str) -> ImageFile.ImageFile:
    """Parse the header only (no pixel decoding yet).

    PNG and JPEG are opened through their plugin classes rather than Image.open: Image.open runs PIL's
    decompression-bomb check, which can only *warn* for sizes between 1x and 2x its limit, and turning
    that warning into an error would need warnings.catch_warnings, which is not thread-safe. We check
    the size ourselves right after this, before any pixel is decoded.
    """
    fp = io.BytesIO(data)
    if data.startswith(_PNG_MAGIC):
        return PngImagePlugin.PngImageFile(fp)
    if data.startswith(_JPEG_MAGIC):
        return JpegImagePlugin.JpegImageFile(fp)
    # Anything else PIL knows (BMP, TIFF, WebP...) is accepted too; PIL's own bomb check applies there.
    return Image.open(fp)


def _decode(data: bytes, path: str, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, then decode; a truncated JPEG is finished with a fake EOI."""
    try:
        img = _open(data, path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: decompression bomb refused ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises SyntaxError for broken PNG headers
        raise ImageError(f"{path}: not a readable image ({e})") from e
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{path}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,} "
            "(a decompression bomb or not a radiograph); pass a larger max_pixels if it is genuine"
        )
    try:
        img.load()
        return img
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: decompression bomb refused ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        first_error = e
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        raise ImageError(f"{path}: cannot decode {img.format or 'image'} data ({first_error})") from first_error
    # A JPEG cut short (no end-of-image marker). PIL's documented cure is the global switch
    # ImageFile.LOAD_TRUNCATED_IMAGES, whose only effect for JPEG is to feed libjpeg a fake EOI marker
    # at end of file. Flipping a process-wide switch would race with other threads, so we append the
    # marker to this one image's bytes instead: same pixels, no global state.
    try:
        img = JpegImagePlugin.JpegImageFile(io.BytesIO(data + _JPEG_EOI))
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: truncated JPEG that cannot be decoded even partially ({e})") from e
    warnings.warn(
        f"{path}: truncated JPEG ({first_error}); decoded as far as the data goes",
        TruncatedImageWarning,
        stacklevel=3,
    )
    return img


def _to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W)."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (and 32-bit int/float) radiographs rarely use the full range: most detectors store
        # 10-14 bits, so a fixed >> 8 would give a near-black picture. Stretching the image's own
        # min..max to 0..255 keeps all its contrast, and is what a viewer's default window does.
        a = np.asarray(img).astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            return np.zeros(a.shape, dtype=np.uint8)
        return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        # Composite over black: X-ray background is black, so transparent areas become background.
        rgba = img.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        return np.rint(grey * alpha).astype(np.uint8)
    # RGB, CMYK, YCbCr, 1, ...: PIL's ITU-R 601-2 luma.
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a radiograph as a uint8 (H, W) grey array.

    PNG and JPEG, 8 or 16 bit, modes L/LA/RGB/RGBA/P/I;16/I/F (16-bit is stretched by its own range).
    EXIF orientation is applied, as a viewer would. Thread- and process-safe: no global PIL state.

    Args:
        path: the image file.
        max_pixels: refuse images larger than this (checked from the header, before decoding).
    Returns:
        np.ndarray uint8 of shape (H, W).
    Raises:
        ImageError: empty file, non-image, undecodable data or a decompression bomb.
    Warns:
        TruncatedImageWarning: a truncated JPEG was decoded as far as it goes.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError as e:
        raise ImageError(f"{path}: is a directory, not an image") from e
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)")
    img = _decode(data, path, max_pixels)
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return _to_grey_uint8(img)


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Fit a uint8 (H, W) image into a (size, size) square: keep the aspect ratio, pad with black.

    The longer side becomes `size` (area averaging when shrinking, bilinear when enlarging), the image
    is centred and the rest is 0. Black is the X-ray background, so padding adds no false anatomy, and
    long thin parts (fingers, forearms) are not cropped away as a plain resize-and-crop would.
    """
    if image.ndim != 2:
        raise ValueError(f"letterbox wants a grey (H, W) image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"letterbox size must be >= 1, got {size}")
    h, w = image.shape
    if h < 1 or w < 1:
        raise ValueError(f"letterbox got an empty image of shape {image.shape}")
    scale = size / max(h, w)
    new_w = min(size, max(1, round(w * scale)))
    new_h = min(size, max(1, round(h * scale)))
    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        src = src.resize((new_w, new_h), resample=resample)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(src, dtype=np.uint8)
    return out


def stretch(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W) image to (size, size), aspect not kept (torchvision's Resize((size, size))):
    the whole picture fills the square, at the price of squashing long thin parts."""
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"stretch wants a non-empty grey (H, W) image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"stretch size must be >= 1, got {size}")
    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if src.size != (size, size):
        shrink = size < max(image.shape)
        src = src.resize((size, size), resample=Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.array(src, dtype=np.uint8)  # a writable copy, as letterbox returns


def fit_square(image: np.ndarray, size: int, resize: str = "letterbox") -> np.ndarray:
    """The one definition of how an X-ray becomes the (size, size) square every path starts from (the
    cache, the classic loader, single-image inference): ``letterbox`` or ``stretch`` (TrainConfig.resize)."""
    if resize == "letterbox":
        return letterbox(image, size)
    if resize == "stretch":
        return stretch(image, size)
    raise ValueError(f"unknown resize {resize!r}; choose one of: letterbox, stretch")


def scan_images(
    paths: Iterable[str | os.PathLike], *, progress: bool = True, max_pixels: int = MAX_PIXELS
) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode every file once and sort them into good and bad; never stops on one file.

    Truncated JPEGs that decode partially count as good (with their TruncatedImageWarning).

    Returns:
        (good paths, [(bad path, reason), ...]), in input order.
    """
    from tqdm.auto import tqdm

    paths = [os.fspath(p) for p in paths]
    good: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in tqdm(paths, desc="checking images", unit="img", disable=not progress):
        try:
            read_image(p, max_pixels=max_pixels)
        except (ImageError, OSError) as e:  # OSError: unreadable file (permissions, vanished)
            bad.append((p, str(e)))
        else:
            good.append(p)
    return good, bad

