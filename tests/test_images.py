"""The safe decoder: every mode, every fault, letterbox and the scanning pass."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_app import bomb_png

from xrai.data.decode.images import (
    ImageError,
    TruncatedImageWarning,
    letterbox,
    read_image,
    scan_images,
)


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _truncated_jpeg(path: Path, size: int = 256, keep: float = 0.6) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)  # noise: a long entropy-coded segment
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [(mode, "png") for mode in ("L", "LA", "RGB", "RGBA", "P")] + [("L", "jpg"), ("RGB", "jpg")],  # JPEG: no alpha, no palette
)
def test_eight_bit_modes(tmp_path, mode, fmt):
    grey = _gradient()
    img = Image.fromarray(grey, mode="L")
    if mode == "LA":
        img = Image.merge("LA", (img, Image.new("L", img.size, 255)))
    elif mode != "L":
        img = img.convert(mode)
    out = read_image(_save(img, tmp_path / f"x.{fmt}"))
    assert out.dtype == np.uint8 and out.shape == grey.shape
    tol = 0 if fmt == "png" else 12
    assert np.abs(out.astype(int) - grey).mean() <= max(tol, 1)


def test_alpha_is_composited_over_black(tmp_path):
    grey = np.full((8, 8), 200, np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255
    img = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    out = read_image(_save(img, tmp_path / "a.png"))
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 200).all()


def test_sixteen_bit_png_is_stretched_by_its_own_range(tmp_path):
    # A 12-bit detector image stored in 16 bits: values 0..4095. A plain >> 8 would give 0..15.
    a = np.linspace(0, 4095, 64 * 32).reshape(32, 64).astype(np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    path = _save(img, tmp_path / "x16.png")
    assert Image.open(path).mode in ("I;16", "I")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (32, 64)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone: order kept


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_integer_and_float_modes(tmp_path, mode):
    dtype = np.int32 if mode == "I" else np.float32
    a = (np.arange(20 * 30).reshape(20, 30) * 7).astype(dtype)
    path = _save(Image.fromarray(a, mode=mode), tmp_path / "x.tif")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30) and out[0, 0] == 0 and out[-1, -1] == 255


def test_constant_sixteen_bit_image_is_black_not_nan(tmp_path):
    path = _save(Image.fromarray(np.full((8, 8), 1000, np.uint16)), tmp_path / "flat.png")
    assert (read_image(path) == 0).all()


def test_truncated_jpeg_decodes_with_a_warning_naming_the_file(tmp_path):
    path = _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(OSError):  # plain PIL refuses it...
        Image.open(path).load()
    with pytest.warns(TruncatedImageWarning, match="cut.jpg"):
        out = read_image(path)  # ...we decode what is there
    assert out.shape == (256, 256) and out.dtype == np.uint8
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global switch left on


def test_truncated_jpeg_is_thread_safe(tmp_path):
    """Threads decoding truncated and whole files at once: the whole ones never see a warning."""
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    good = _save(Image.fromarray(_gradient()), tmp_path / "good.jpg")
    errors: list[BaseException] = []

    def work(p: Path) -> None:
        try:
            for _ in range(10):
                read_image(p)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedImageWarning)
        threads = [threading.Thread(target=work, args=(p,)) for p in (cut, good, cut, good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        read_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*0 bytes"):
        read_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="notes.png"):
        read_image(path)


def test_bad_png_header(tmp_path):
    path = tmp_path / "header.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageError, match="header.png"):
        read_image(path)


def test_decompression_bomb_refused_from_the_header(tmp_path):
    # A small file that decodes to many pixels: all-zero PNG compresses to almost nothing.
    path = _save(Image.new("L", (3000, 2000)), tmp_path / "bomb.png", optimize=True)
    assert path.stat().st_size < 50_000
    with pytest.raises(ImageError, match=r"bomb\.png.*6,000,000 pixels"):
        read_image(path, max_pixels=1_000_000)
    assert read_image(path).shape == (2000, 3000)  # the default limit lets a genuine big image through


def test_forged_header_bomb(tmp_path):
    """A PNG whose header claims 20000 x 20000 is refused before a single pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    path = tmp_path / "forged.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="forged.png.*exceeds max_pixels"):
        read_image(path)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_gradient(16, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    assert read_image(path).shape == (32, 16)


@pytest.mark.parametrize(("h", "w"), [(100, 50), (50, 100), (64, 64), (10, 300), (20, 30)])
def test_letterbox_keeps_aspect_and_pads_black(h, w):
    img = np.full((h, w), 255, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    rows = np.flatnonzero(out.max(axis=1) > 0)
    cols = np.flatnonzero(out.max(axis=0) > 0)
    scale = 64 / max(h, w)
    assert abs(len(rows) - h * scale) <= 1 and abs(len(cols) - w * scale) <= 1
    # centred
    assert abs(rows[0] - (63 - rows[-1])) <= 1 and abs(cols[0] - (63 - cols[-1])) <= 1


def test_letterbox_rejects_colour():
    with pytest.raises(ValueError, match="grey"):
        letterbox(np.zeros((4, 4, 3), np.uint8), 8)


def test_scan_images_lists_bad_files_and_goes_on(tmp_path):
    good = _save(Image.fromarray(_gradient()), tmp_path / "good.png")
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")
    with pytest.warns(TruncatedImageWarning):
        ok, bad = scan_images([good, empty, cut, text, tmp_path / "missing.png"], progress=False)
    assert ok == [str(good), str(cut)]
    assert [p for p, _ in bad] == [str(empty), str(text), str(tmp_path / "missing.png")]
    assert all(reason for _, reason in bad)


# ---- decode budget: decoded bytes checked from the header ---------------------------------------


@pytest.mark.parametrize("mode, info, expected", [
    ("L", {}, (1, 1)), ("LA", {}, (2, 1)), ("RGB", {}, (3, 1)), ("RGBA", {}, (4, 1)), ("CMYK", {}, (4, 1)),
    ("P", {}, (3, 1)), ("P", {"transparency": 0}, (4, 1)), ("I;16", {}, (1, 2)), ("I;16B", {}, (1, 2)),
    ("I", {}, (1, 4)), ("F", {}, (1, 4)), ("1", {}, (1, 1)),
])
def test_decoded_layout(mode, info, expected):
    from xrai.data.decode.images import decoded_layout

    assert decoded_layout(mode, info) == expected


def test_budget_counts_pixels_channels_and_sample_bytes():
    from xrai.data.decode.images import ImageTooLargeError, check_decode_budget

    assert check_decode_budget("a.png", width=100, height=50, channels=4, bytes_per_sample=2) == 40_000
    with pytest.raises(ImageTooLargeError, match=r"a.dcm: 100x50 pixels x 1 channel\(s\) x 2 byte\(s\) = "
                                                 r"10,000 bytes decoded, over the limit of 9,999 bytes; try less"):
        check_decode_budget("a.dcm", width=100, height=50, bytes_per_sample=2, max_bytes=9_999, remedy="try less")
    with pytest.raises(ImageTooLargeError, match="exceeds max_pixels=10"):
        check_decode_budget("b.png", width=4, height=4, max_pixels=10)
    with pytest.raises(ImageError, match="no pixels"):
        check_decode_budget("c.png", width=0, height=4)


def test_over_budget_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    """8000 x 8000 RGBA: 64 Mpx passes the pixel limit, 244 MiB decoded does not pass the upload budget."""
    from PIL import PngImagePlugin

    from xrai.data.decode.images import (
        UPLOAD_MAX_DECODED_BYTES,
        ImageTooLargeError,
        decode_image,
    )

    data = bomb_png(8000, 8000, rgba=True)
    assert len(data) < 300_000
    loads = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with pytest.raises(ImageTooLargeError, match=r"screenshot.png: 8000x8000 pixels x 4 channel\(s\) x 1 byte\(s\) "
                                                 r"= 244 MiB decoded, over the limit of 64 MiB"):
        decode_image(data, name="screenshot.png", max_bytes=UPLOAD_MAX_DECODED_BYTES)
    assert loads == []  # not a pixel was decoded
    path = tmp_path / "big.png"
    path.write_bytes(bomb_png(3000, 2000, rgba=True))
    assert read_image(path).shape == (2000, 3000)  # the dataset budget (256 MiB) lets 24 MB through
    with pytest.raises(ImageTooLargeError, match="big.png.*over the limit of 16 MiB"):
        read_image(path, max_bytes=16 * 2**20)


def test_decode_image_takes_bytes_and_returns_notes_instead_of_warning():
    from xrai.data.decode.images import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(buf, "JPEG")
    whole = buf.getvalue()
    image, notes = decode_image(whole, name="a.jpg")
    assert image.shape == (256, 256) and notes == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decode_image warns nothing: thread-safe for a server
        image, notes = decode_image(whole[: int(len(whole) * 0.6)], name="cut.jpg")
    assert image.shape == (256, 256) and len(notes) == 1 and notes[0].startswith("cut.jpg: truncated JPEG")
    with pytest.raises(ImageError, match=r"upload.bin: empty file \(0 bytes\)"):
        decode_image(b"", name="upload.bin")


def test_large_alpha_and_sixteen_bit_images_are_converted_in_strips(tmp_path):
    """Strip-wise conversion (no full-size float copies) gives exactly the whole-image formula's pixels."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (700, 90, 4), dtype=np.uint8)  # more rows than one strip
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    grey = np.asarray(Image.fromarray(rgba, "RGBA").convert("L"), dtype=np.float32)
    expected = np.rint(grey * (rgba[..., 3].astype(np.float32) / 255.0)).astype(np.uint8)
    assert np.array_equal(read_image(path), expected)
    deep = rng.integers(300, 3000, (650, 70)).astype(np.uint16)
    path = _save(Image.fromarray(deep), tmp_path / "d.png")
    a = deep.astype(np.float64)
    expected = np.clip(np.rint((a - a.min()) * (255.0 / (a.max() - a.min()))), 0, 255).astype(np.uint8)
    assert np.array_equal(read_image(path), expected)


def test_truncated_images_can_be_counted_quietly_and_said_in_one_line(tmp_path):
    from xrai.data.decode.images import DamagedImages

    cuts = [_truncated_jpeg(tmp_path / f"cut{i}.jpg") for i in range(3)]
    damaged = DamagedImages()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted, not warned
        threads = [threading.Thread(target=read_image, args=(p,), kwargs={"damaged": damaged}) for p in cuts * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    damaged.add(tmp_path / "bad.png", "unreadable", "bad.png: not an image")
    assert len(damaged) == 4  # each image once, whichever thread met it
    assert {p for p, _, _ in damaged.entries()} == {str(p) for p in [*cuts, tmp_path / "bad.png"]}
    listing = tmp_path / "damaged.csv"
    line = damaged.summary(listing)
    assert line.startswith("4 image(s) were truncated or unreadable (dropped 1 unreadable, 3 truncated")
    assert f"listed in {listing}" in line and "\n" not in line
    rows = listing.read_text().splitlines()
    assert rows[0] == "path,problem,reason" and len(rows) == 5
    again = DamagedImages()
    again.add(tmp_path / "other.jpg", "truncated", "other.jpg: truncated JPEG")
    again.summary(listing)  # a second pass (test after valid) adds to the list
    assert len(listing.read_text().splitlines()) == 6
    assert DamagedImages().summary(listing) is None
    assert "bad.png: not an image" in damaged.summary()  # no listing: the line names them
