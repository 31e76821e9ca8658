"""The limits every decoder shares: the decode budget checked from a header before any pixel is decoded,
the error types, and the strip height conversions work in (no PIL, no pydicom: images and dicom import it)."""

from __future__ import annotations

__all__ = [
    "DATASET_REMEDY",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "STRIP_ROWS",
    "UPLOAD_MAX_DECODED_BYTES",
    "UPLOAD_REMEDY",
    "ImageError",
    "ImageTooLargeError",
    "check_decode_budget",
]

# 64 MiPixels: ~8000 x 8000, far beyond any radiograph (MURA and FracAtlas are <= ~3000 px a side), and
# below PIL's own MAX_IMAGE_PIXELS (~89 M), so our header check always fires before PIL's would.
MAX_PIXELS = 64 * 2**20
# Decoded bytes = pixels x channels x bytes per sample, checked from the header before decoding. The
# pixel limit alone lets an 8000 x 8000 RGBA PNG (249 KB on disk) cost 256 MB decoded and ~1.5 GB on
# its way to grey. Datasets: 64 Mpx of 16-bit or 8-bit RGBA still pass. Uploads: a 4096 x 4096 RGBA or
# a 12 Mpx phone photo (RGB) passes; a decode then peaks at about 1.5x its decoded size (the image, the
# grey output, strips of temporaries).
MAX_DECODED_BYTES = 256 * 2**20
UPLOAD_MAX_DECODED_BYTES = 64 * 2**20
DATASET_REMEDY = "pass larger max_pixels / max_bytes to read_image if the image is genuine"
UPLOAD_REMEDY = "send a smaller or greyscale image (a radiograph needs one 8- or 16-bit channel)"
STRIP_ROWS = 256  # rows converted at a time: float temporaries stay a few MB whatever the image size


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names the file and what is wrong."""


class ImageTooLargeError(ImageError):
    """An image over the pixel or decoded-byte limit, refused from its header before decoding."""


def check_decode_budget(name: str, *, width: int, height: int, channels: int = 1, bytes_per_sample: int = 1,
                        max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_DECODED_BYTES,
                        remedy: str = DATASET_REMEDY) -> int:
    """Refuse an image whose header promises too many pixels or decoded bytes; return the decoded bytes.

    Call it with the header's numbers before decoding anything (any format: PNG, JPEG, DICOM...).

    Args:
        name: the file (or upload) name for the message.
        width, height: from the header.
        channels, bytes_per_sample: as decoded (``decoded_layout`` for PIL images).
        max_pixels, max_bytes: the limits (``UPLOAD_MAX_DECODED_BYTES`` for uploads).
        remedy: what the reader of the message can do about it (``UPLOAD_REMEDY`` for uploads).
    Raises:
        ImageError: no pixels. ImageTooLargeError: over either limit; the message states the limit.
    """
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {pixels:,} pixels exceeds max_pixels={max_pixels:,} "
            f"(a decompression bomb or not a radiograph); {remedy}"
        )
    decoded = pixels * channels * bytes_per_sample
    if decoded > max_bytes:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels x {channels} channel(s) x {bytes_per_sample} byte(s) = "
            f"{_size(decoded)} decoded, over the limit of {_size(max_bytes)}; {remedy}"
        )
    return decoded


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"
