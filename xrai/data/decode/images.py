"""The one safe decoder: any PNG, JPEG or DICOM X-ray -> uint8 (H, W) grey, or an ImageError that names the file."""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import (
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
)

from xrai.config import RESIZES
from xrai.data.decode.dicom import HEAD_BYTES, decode_dicom, looks_like_dicom
from xrai.data.decode.limits import (  # shared with the DICOM decoder; importable from here as before
    DATASET_REMEDY,
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    STRIP_ROWS,
    UPLOAD_MAX_DECODED_BYTES,
    UPLOAD_REMEDY,
    ImageError,
    ImageTooLargeError,
    check_decode_budget,
)
from xrai.errors import first_lines, outside_package_stacklevel

__all__ = [
    "DECODER_VERSION",
    "MAX_DECODED_BYTES",
    "DamagedImages",
    "MAX_PIXELS",
    "UPLOAD_MAX_DECODED_BYTES",
    "UPLOAD_REMEDY",
    "ImageError",
    "ImageTooLargeError",
    "TruncatedImageWarning",
    "check_decode_budget",
    "decode_image",
    "decoded_layout",
    "fit_square",
    "letterbox",
    "read_image",
    "scan_images",
    "stretch",
]

# Part of every decoded-image cache key: bump it whenever read_image or letterbox can return other pixels.
DECODER_VERSION = "2"  # 2: DICOM

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


_LOG = logging.getLogger("xrai.data.decode")
_DAMAGED_COLUMNS = ("path", "problem", "reason")


class TruncatedImageWarning(UserWarning):
    """A truncated JPEG was decoded as far as its data goes (the rest of the picture is grey)."""


class DamagedImages:
    """The images of one run that decoded only partly (``truncated``) or not at all (``unreadable``),
    counted quietly so that the run says ONE line about them (``summary``) instead of a warning each.

    Thread-safe: decoding threads ``add`` to it. Each image is logged at DEBUG on
    ``xrai.data.decode`` (the CLI's ``-v`` shows them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, str]] = {}  # path -> (problem, reason), first seen order

    def add(self, path: str | os.PathLike, problem: str, reason: str) -> None:
        path = os.fspath(path)
        with self._lock:
            self._entries.setdefault(path, (problem, reason))
        _LOG.debug("%s image: %s", problem, reason)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[tuple[str, str, str]]:
        """[(path, problem, reason), ...] in the order first met."""
        with self._lock:
            return [(p, problem, reason) for p, (problem, reason) in self._entries.items()]

    def write_csv(self, path: str | os.PathLike) -> None:
        """List them (path, problem, reason) in ``path``, with the rows already there for other images
        (the valid and the test pass of one evaluate share the file)."""
        rows = {}
        try:
            with open(path, newline="") as f:
                rows = {r["path"]: (r["problem"], r["reason"]) for r in csv.DictReader(f) if r.get("path")}
        except (OSError, KeyError, csv.Error):
            rows = {}
        rows.update({p: (problem, reason) for p, problem, reason in self.entries()})
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_DAMAGED_COLUMNS)
            writer.writerows((p, problem, reason) for p, (problem, reason) in rows.items())
        os.replace(tmp, path)

    def summary(self, listing: str | os.PathLike | None = None) -> str | None:
        """The one line for the run (None if nothing was damaged); with ``listing``, the list is written
        there first and the line says where. Without, the line names the first few."""
        entries = self.entries()
        if not entries:
            return None
        truncated = sum(problem == "truncated" for _, problem, _ in entries)
        parts = ([f"dropped {len(entries) - truncated} unreadable"] if truncated < len(entries) else []) + (
            [f"{truncated} truncated, decoded as far as their data goes"] if truncated else [])
        counts = f"{len(entries)} image(s) were truncated or unreadable ({', '.join(parts)})"
        more = " ..." if len(entries) > 3 else ""
        first = sorted(entries, key=lambda e: e[1] != "unreadable")[:3]  # the dropped ones first
        if listing is not None:
            try:
                self.write_csv(listing)
                named = ", ".join(p for p, _, _ in first)
                return f"{counts}; listed in {os.fspath(listing)} ({named}{more})"
            except OSError as error:  # a read-only run folder: the line names them instead
                _LOG.debug("cannot write %s: %s", listing, error)
        named = "; ".join(reason for _, _, reason in first)
        return f"{counts}: {named}{more}"


def decoded_layout(mode: str, info: dict | None = None) -> tuple[int, int]:
    """(channels, bytes per sample) of a PIL mode as this decoder works on it.

    A palette image ("P") is expanded to RGB, or RGBA when it has a transparent colour, so it counts
    as that. 16-bit modes count 2 bytes a sample, 32-bit integer and float modes 4, the rest 1.
    """
    if mode == "P":
        return (4 if info and "transparency" in info else 3), 1
    if mode.startswith("I;16"):
        return 1, 2
    if mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        return 1, 4
    return Image.getmodebands(mode), 1


def _open(data: bytes, name: str) -> ImageFile.ImageFile:
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
    try:
        return Image.open(fp)
    except UnidentifiedImageError as e:  # its message shows the BytesIO object, not the file
        raise ImageError(f"{name}: not an image (neither PNG, JPEG, DICOM nor another format Pillow reads)") from e


def _decode(data: bytes, name: str, max_pixels: int, max_bytes: int,
            remedy: str = DATASET_REMEDY) -> tuple[Image.Image, str | None]:
    """Open, check the budget from the header, then decode; a truncated JPEG is finished with a fake EOI.

    Returns the decoded image and, for a truncated JPEG, the note to pass on (None otherwise).
    """
    try:
        img = _open(data, name)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: decompression bomb refused ({first_lines(e, None)})") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises SyntaxError for broken PNG headers
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: not a readable image ({first_lines(e, None)})") from e
    width, height = img.size
    channels, sample_bytes = decoded_layout(img.mode, img.info)
    check_decode_budget(name, width=width, height=height, channels=channels, bytes_per_sample=sample_bytes,
                        max_pixels=max_pixels, max_bytes=max_bytes, remedy=remedy)
    try:
        img.load()
        return img, None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: decompression bomb refused ({first_lines(e, None)})") from e
    except (OSError, ValueError, SyntaxError) as e:
        first_error = e
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        reason = first_lines(first_error, None)
        raise ImageError(f"{name}: cannot decode {img.format or 'image'} data ({reason})") from first_error
    # A JPEG cut short (no end-of-image marker). PIL's documented cure is the global switch
    # ImageFile.LOAD_TRUNCATED_IMAGES, whose only effect for JPEG is to feed libjpeg a fake EOI marker
    # at end of file. Flipping a process-wide switch would race with other threads, so we append the
    # marker to this one image's bytes instead: same pixels, no global state.
    try:
        img = JpegImagePlugin.JpegImageFile(io.BytesIO(data + _JPEG_EOI))
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: truncated JPEG that cannot be decoded even partially "
                         f"({first_lines(e, None)})") from e
    return img, f"{name}: truncated JPEG ({first_lines(first_error, None)}); decoded as far as the data goes"


def _to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W), in strips of rows so that no full-size float copy is ever made."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (and 32-bit int/float) radiographs rarely use the full range: most detectors store
        # 10-14 bits, so a fixed >> 8 would give a near-black picture. Stretching the image's own
        # min..max to 0..255 keeps all its contrast, and is what a viewer's default window does.
        a = np.asarray(img)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            return np.zeros(a.shape, dtype=np.uint8)
        scale = 255.0 / (hi - lo)
        out = np.empty(a.shape, dtype=np.uint8)
        for top in range(0, a.shape[0], STRIP_ROWS):
            strip = a[top : top + STRIP_ROWS].astype(np.float64)
            out[top : top + STRIP_ROWS] = np.clip(np.rint((strip - lo) * scale), 0, 255).astype(np.uint8)
        return out
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        # Composite over black: X-ray background is black, so transparent areas become background.
        # Strip by strip, so no full-size grey, alpha or float copy is ever made next to the image.
        width, height = img.size
        out = np.empty((height, width), dtype=np.uint8)
        for top in range(0, height, STRIP_ROWS):
            strip = img.crop((0, top, width, min(height, top + STRIP_ROWS)))
            rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
            grey = np.asarray(rgba.convert("L"), dtype=np.float32)
            weight = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
            out[top : top + STRIP_ROWS] = np.rint(grey * weight).astype(np.uint8)
        return out
    # RGB, CMYK, YCbCr, 1, ...: PIL's ITU-R 601-2 luma.
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_DECODED_BYTES, remedy: str = DATASET_REMEDY) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes (an upload, say) as a uint8 (H, W) grey array; thread-safe, no global state.

    PNG, JPEG, DICOM (by content: ``xrai.data.decode.dicom``) and the other formats Pillow reads.

    Args:
        data: the file's bytes.
        name: the name messages use (never a temporary path).
        max_pixels, max_bytes: limits checked from the header before decoding (see
            ``check_decode_budget``); ``UPLOAD_MAX_DECODED_BYTES`` for uploads.
        remedy: the advice an over-limit message ends with (``UPLOAD_REMEDY`` for uploads).
    Returns:
        (image, notes): notes are messages for the user, e.g. that a truncated JPEG was decoded as far
        as its data goes (``read_image`` turns them into TruncatedImageWarning).
    Raises:
        ImageError: empty data, non-image, undecodable data; ImageTooLargeError: over a limit.
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if not data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        if looks_like_dicom(data[:HEAD_BYTES]):  # by content: before PIL, which takes a TIFF+DICOM file as TIFF
            return decode_dicom(data, name=name, max_pixels=max_pixels, max_bytes=max_bytes, remedy=remedy), []
    img, note = _decode(data, name, max_pixels, max_bytes, remedy)
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return _to_grey_uint8(img), [note] if note else []


def read_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_DECODED_BYTES, damaged: DamagedImages | None = None) -> np.ndarray:
    """Read a radiograph as a uint8 (H, W) grey array.

    PNG and JPEG, 8 or 16 bit, modes L/LA/RGB/RGBA/P/I;16/I/F (16-bit is stretched by its own range);
    DICOM, recognised by content whatever the file is called, windowed as the file says
    (``xrai.data.decode.dicom``).
    EXIF orientation is applied, as a viewer would. Thread- and process-safe: no global PIL state.

    Args:
        path: the image file.
        max_pixels: refuse images larger than this (checked from the header, before decoding).
        max_bytes: refuse images whose decoded size (pixels x channels x bytes per sample) is larger.
        damaged: where a truncated image is counted, quietly, instead of warned about (the caller then
            says one line for all of them: ``DamagedImages.summary``).
    Returns:
        np.ndarray uint8 of shape (H, W).
    Raises:
        ImageError: empty file, non-image, undecodable data; ImageTooLargeError: over a limit.
    Warns:
        TruncatedImageWarning: a truncated JPEG was decoded as far as it goes (without ``damaged``).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError as e:
        raise ImageError(f"{path}: is a directory, not an image") from e
    image, notes = decode_image(data, name=path, max_pixels=max_pixels, max_bytes=max_bytes)
    for note in notes:
        if damaged is None:
            warnings.warn(note, TruncatedImageWarning, stacklevel=outside_package_stacklevel())
        else:
            damaged.add(path, "truncated", note)
    return image


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
    raise ValueError(f"unknown resize {resize!r}; choose one of: {', '.join(RESIZES)}")


def scan_images(
    paths: Iterable[str | os.PathLike], *, progress: bool = True, max_pixels: int = MAX_PIXELS
) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode every file once and sort them into good and bad; never stops on one file.

    Truncated JPEGs that decode partially count as good (with their TruncatedImageWarning).

    Returns:
        (good paths, [(bad path, reason), ...]), in input order.
    """
    from tqdm.auto import tqdm  # not at import: the ONNX server imports this decoder and has no tqdm

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

