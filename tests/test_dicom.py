"""DICOM in the one decoder: LUTs from the file, MONOCHROME1, bit depths, compression, faults, privacy."""

from __future__ import annotations

import logging
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _checks import child_env

pydicom = pytest.importorskip("pydicom")

from dicom_files import (  # noqa: E402
    assert_no_secrets,
    j2k_header,
    jpeg_saying,
    window_8bit,
    write_damaged,
    write_deflated_bomb,
    write_dicom,
    write_j2k_liar,
    write_report,
)

from xrai.data.decode.dicom import DICOM_JPEG_EXTRA, looks_like_dicom  # noqa: E402
from xrai.data.decode.images import (  # noqa: E402
    ImageError,
    ImageTooLargeError,
    decode_image,
    read_image,
)


def _bundled(name: str) -> Path:
    """A sample file shipped inside pydicom's wheel (never downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's sample {name} is not installed")
    return Path(path)


def _twelve_bit(h: int = 40, w: int = 56) -> np.ndarray:
    """12-bit values in uint16, multiples of 16 (so no windowed value sits on a rounding edge)."""
    return ((np.arange(h * w).reshape(h, w) * 37) % 256 * 16).astype(np.uint16)


def test_eight_bit_monochrome2_is_read_as_stored(tmp_path):
    pixels = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    out = read_image(write_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_array_equal(out, pixels)


def test_recognised_by_content_whatever_the_name(tmp_path):
    pixels = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    data = write_dicom(tmp_path / "a.dcm", pixels).read_bytes()
    for name in ("IM000001", "image.png", "scan.jpg"):
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(read_image(tmp_path / name), pixels)
    no_preamble = write_dicom(tmp_path / "raw", pixels, preamble=False)
    assert no_preamble.read_bytes()[128:132] != b"DICM" and looks_like_dicom(no_preamble.read_bytes()[:132])
    np.testing.assert_array_equal(read_image(no_preamble), pixels)
    assert not looks_like_dicom(b"hello, world: not an image at all" * 8)


def test_twelve_bit_without_a_window_is_stretched_over_its_own_range(tmp_path):
    pixels = _twelve_bit()
    out = read_image(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    lo, hi = int(pixels.min()), int(pixels.max())
    expected = np.rint((pixels.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bits", [12, 16])
def test_window_from_the_file_then_monochrome1_inverted(tmp_path, bits):
    pixels = _twelve_bit() if bits == 12 else (_twelve_bit().astype(np.uint32) * 16 + 8).astype(np.uint16)
    centre, width = (2052.5, 4081) if bits == 12 else (32840.5, 65281)  # never on a rounding edge
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=bits, window=(centre, width)))
    np.testing.assert_array_equal(mono2, window_8bit(pixels, centre, width))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, bits_stored=bits, window=(centre, width),
                                   photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    narrow = read_image(write_dicom(tmp_path / "n.dcm", pixels, bits_stored=bits, window=(centre, width / 4)))
    assert (narrow == 0).sum() > (mono2 == 0).sum() and (narrow == 255).sum() > (mono2 == 255).sum()


def test_voi_lut_sequence_is_applied_and_wins_over_the_window(tmp_path):
    pixels = _twelve_bit()
    lut = (257 * ((np.arange(4096) // 16)[::-1])).astype(np.uint16)  # an inverting 256-step LUT, 0..65535
    out = read_image(write_dicom(tmp_path / "lut.dcm", pixels, bits_stored=12, voi_lut=lut, window=(100, 50)))
    np.testing.assert_array_equal(out, (lut[pixels] // 257).astype(np.uint8))


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    pixels = _twelve_bit()
    # Stored 0..4080 -> modality values -1024..3056; the window is given in modality values.
    out = read_image(write_dicom(tmp_path / "ct.dcm", pixels, bits_stored=12, rescale=(1, -1024),
                                 window=(2052.5 - 1024, 4081)))
    np.testing.assert_array_equal(out, window_8bit(pixels, 2052.5, 4081))


def test_pydicoms_bundled_samples_match_pydicoms_own_pipeline():
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    for name in ("CT_small.dcm", "MR_small.dcm"):  # CT: rescale, no window; MR: a window
        path = _bundled(name)
        ds = pydicom.dcmread(path)
        values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        if "WindowCenter" in ds:
            c, w = float(ds.WindowCenter), float(ds.WindowWidth)
            lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            expected = window_8bit(apply_modality_lut(ds.pixel_array, ds), c, w)
            assert lo < values.max() and hi > values.min()
        else:
            expected = np.rint((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)
        got = read_image(path)
        assert np.abs(got.astype(int) - expected).max() <= 1 and (got == expected).mean() > 0.99


def test_compressed_files_decode_to_the_same_pixels(tmp_path):
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless, RLELossless

    pixels = _twelve_bit()
    plain = read_image(write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=12, window=(2052.5, 4081)))
    syntaxes = [RLELossless] + ([JPEG2000Lossless] if get_encoder(JPEG2000Lossless).is_available else [])
    for uid in syntaxes:
        path = write_dicom(tmp_path / f"{uid}.dcm", pixels, bits_stored=12, window=(2052.5, 4081), compress=uid)
        np.testing.assert_array_equal(read_image(path), plain, err_msg=uid.name)
    reference = read_image(_bundled("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        from pydicom.pixels import get_decoder

        path = _bundled(name)
        if get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID).is_available:
            np.testing.assert_array_equal(read_image(path), reference, err_msg=name)


def test_without_a_decoder_plugin_the_error_names_the_extra():
    """JPEG-LS decodes only through pylibjpeg-libjpeg (or pyjpegls): hide those, as a bare install is."""
    path = _bundled("MR_small_jpeg_ls_lossless.dcm")
    code = ("from xrai.data.decode.images import read_image, ImageError\n"
            f"try:\n    read_image({str(path)!r})\nexcept ImageError as e:\n    print('ERR', e)\n")
    env = child_env(block=("pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ERR") and DICOM_JPEG_EXTRA in proc.stdout and "JPEG-LS" in proc.stdout


def test_multi_frame_report_truncated_and_bomb_are_one_clear_error(tmp_path):
    frames = np.zeros((3, 16, 16), dtype=np.uint8)
    cases = {
        write_dicom(tmp_path / "cine.dcm", frames): "multi-frame DICOM (3 frames)",
        write_report(tmp_path / "sr.dcm"): "not an image: a DICOM 'Basic Text SR Storage' object",
        _bundled("test-SR.dcm"): "not an image",
    }
    whole = write_dicom(tmp_path / "whole.dcm", _twelve_bit(), bits_stored=12).read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(whole[:-500])
    cases[tmp_path / "cut_pixels.dcm"] = "less than expected"
    (tmp_path / "cut_header.dcm").write_bytes(whole[:400])
    cases[tmp_path / "cut_header.dcm"] = "truncated"
    for path, expected in cases.items():
        with pytest.raises(ImageError) as info:
            read_image(path)
        message = str(info.value)
        assert message.startswith(str(path)) and expected in message and "\n" not in message, message
        assert_no_secrets(message)


def test_decode_budget_is_read_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 6000  # 6000 x 6000 x 2 bytes = 69 MB promised, 128 bytes present
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError, match="6000x6000 pixels x 1 channel"):
        decode_image(path.read_bytes(), name="big.dcm", max_bytes=64 * 2**20)


def test_class_folders_take_dcm_and_extensionless_dicom_by_content(tmp_path):
    from xrai.data.sources import read_class_folders

    pixels = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    for label in ("fractured", "not fractured"):
        folder = tmp_path / "set" / "train" / label
        folder.mkdir(parents=True)
        write_dicom(folder / "a.dcm", pixels)
        write_dicom(folder / "IM000002", pixels, preamble=False)
        (folder / "README").write_text("scanned on the ward; not an image\n")
        (folder / "c.DICOM").write_bytes((folder / "a.dcm").read_bytes())
    manifest = read_class_folders(tmp_path / "set")
    names = sorted(Path(p).name for p in manifest["path"])
    assert names == sorted(["a.dcm", "IM000002", "c.DICOM"] * 2)
    assert (manifest["patient_id"] == "").all()
    for path in manifest["path"]:
        np.testing.assert_array_equal(read_image(path), pixels)


def test_a_deflated_file_decodes_and_a_deflated_bomb_is_refused_before_it_is_inflated(tmp_path):
    small = write_deflated_bomb(tmp_path / "small.dcm", filler=1000)
    assert read_image(small).shape == (64, 64)
    inflated = 200 * 2**20  # zeros behind a 64x64 image: ~200 KB on disk
    bomb = write_deflated_bomb(tmp_path / "bomb.dcm", filler=inflated).read_bytes()
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="deflated DICOM dataset inflates to more than 5 MiB") as info:
            decode_image(bomb, name="bomb.dcm", max_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak:,} bytes while refusing"  # the cap (budget + 4 MiB), not 200 MiB
    assert str(info.value).startswith("bomb.dcm") and "\n" not in str(info.value)
    with pytest.raises(ImageError, match="damaged deflated"):  # a corrupt stream is one line too
        decode_image(bomb[:400] + b"\xff" * 64 + bomb[464:], name="bad.dcm")


def _needs_j2k_decoder():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder plugin installed")


@pytest.mark.parametrize("siz, expected", [
    ((16000, 16000), "16000x16000 = 256,000,000 pixels exceeds max_pixels"),  # ImageTooLargeError
    ((300, 256), "codestream is 300x256 x 1 component(s) but the DICOM header says 256x256 x 1"),
    ((256, 256, 3), "codestream is 256x256 x 3 component(s)"),
    (None, "without a readable codestream size (SIZ marker)"),
])
def test_a_jpeg2000_codestream_is_checked_against_the_header_before_decoding(tmp_path, siz, expected):
    _needs_j2k_decoder()
    codestream = j2k_header(*siz[:2], components=(siz[2:] or (1,))[0]) if siz else b"\xff\x4f\xff\x90" + bytes(40)
    path = write_j2k_liar(tmp_path / "liar.dcm", rows=256, columns=256, codestream=codestream)
    with pytest.raises(ImageError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message, message
    assert isinstance(info.value, ImageTooLargeError) == (siz == (16000, 16000))


@pytest.mark.parametrize("width, expected", [
    (64, None),
    (30000, "30000x30000 = 900,000,000 pixels exceeds max_pixels"),  # +4.3 GB before this check
    (65, "JPEG codestream is 65x65 x 1 component(s) but the DICOM header says 64x64 x 1"),
])
def test_a_jpeg_codestream_is_checked_against_the_header_before_decoding(tmp_path, width, expected):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG decoder plugin installed")
    path = write_j2k_liar(tmp_path / "liar.dcm", rows=64, columns=64, codestream=jpeg_saying(width, width),
                          syntax=JPEGBaseline8Bit)
    if expected is None:
        assert read_image(path).shape == (64, 64)
        return
    with pytest.raises(ImageError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message, message


@pytest.mark.parametrize("damage, expected", [
    ("frames", "DICOM NumberOfFrames is not a number ('abc')"),
    ("vr", "not a readable DICOM file (damaged header: NotImplementedError"),
])
def test_damaged_header_values_are_one_line_errors_naming_the_file(tmp_path, damage, expected, capsys):
    path = write_damaged(tmp_path / f"{damage}.dcm", damage)
    with pytest.raises(ImageError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_the_file_s_own_text_is_sanitised_in_messages(tmp_path):
    path = write_damaged(tmp_path / "evil.dcm", "photometric")
    with pytest.raises(ImageError, match="photometric interpretation") as info:
        read_image(path)
    message = str(info.value)
    assert "\x1b" not in message and "\r" not in message and "\n" not in message
    assert "X" * 60 not in message and len(message) < 250, message


def test_pydicoms_log_becomes_one_line_per_file_without_tracebacks(tmp_path, capsys, caplog):
    _needs_j2k_decoder()
    caplog.set_level(logging.DEBUG)  # (pytest's caplog also hooks pydicom's logger itself: not what a user sees)
    caplog.set_level(logging.DEBUG, logger="xrai.data.decode")  # as -v does, whatever an earlier main() set on "xrai"
    root = logging.getLogger()
    stream = logging.StreamHandler(sys.stderr)  # as the CLI's basicConfig: what reaches stderr

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record)

    seen: list[logging.LogRecord] = []
    handlers = (stream, Seen())
    for handler in handlers:
        root.addHandler(handler)
    try:
        broken = write_j2k_liar(tmp_path / "broken.dcm", rows=256, columns=256,
                                codestream=j2k_header(256, 256) + bytes(100))  # right size, no tiles
        for _ in range(3):
            with pytest.raises(ImageError, match="cannot decode the DICOM pixel data") as info:
                read_image(broken)
            assert "\n" not in str(info.value)
        assert not [r for r in seen if r.name.startswith("pydicom")] and not any(r.exc_info for r in seen)
        assert "Traceback" not in capsys.readouterr().err
        said = [r.getMessage() for r in seen if r.name == "xrai.data.decode"]
        assert said and all(m.startswith(str(broken)) and "\n" not in m for m in said)  # at DEBUG, per file
        logging.getLogger("pydicom").warning("outside a decode")  # pydicom used elsewhere: passed on
        assert "outside a decode" in capsys.readouterr().err
    finally:
        for handler in handlers:
            root.removeHandler(handler)
