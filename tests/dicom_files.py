"""DICOM files the tests write with pydicom (no download), each carrying patient tags that must never leak.

``write_dicom`` makes a single- or multi-frame DX image: MONOCHROME1 or 2, 8/12/16 bit, with or
without a window or a VOI LUT Sequence, compressed, without preamble. ``write_report`` makes a
Basic Text SR (a DICOM with no pixels). ``window_8bit`` is the DICOM LINEAR window to 0..255 written
out from PS3.3 C.11.2.1.2, independently of xrai.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Identifying values written into every test file; no output of xrai may ever contain one of them.
PATIENT_NAME = "Zyxwulf^Quonstance"  # words that appear nowhere else, not even by chance in base64
PATIENT_ID = "PID-7731-SECRET"
PATIENT_TAGS = {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "PatientBirthDate": "19610417",
                "InstitutionName": "St Hidden Hospital", "AccessionNumber": "ACC99812"}
SECRETS = ("Zyxwulf", "Quonstance", PATIENT_ID, "19610417", "St Hidden", "ACC99812")


def assert_no_secrets(text: str, where: str = "") -> None:
    """Assert that no patient value of SECRETS appears in `text` (an output of xrai)."""
    for secret in SECRETS:
        assert secret not in text, f"patient data {secret!r} leaked into {where or 'the text'}: {text[:500]}"


DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _base(sop_class: str, transfer_syntax=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    for keyword, value in PATIENT_TAGS.items():
        setattr(ds, keyword, value)
    ds.StudyDescription = f"wrist of {PATIENT_NAME}"
    return ds


def write_dicom(path: str | Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, window: tuple[float, float] | None = None,
                voi_lut: np.ndarray | None = None, rescale: tuple[float, float] | None = None,
                preamble: bool = True, compress=None) -> Path:
    """Write ``pixels`` (uint8 or uint16, (H, W) or (frames, H, W)) as a DX image; returns the path.

    Args:
        photometric: MONOCHROME1 or MONOCHROME2.
        bits_stored: defaults to 8 for uint8, 16 for uint16.
        window: (centre, width).
        voi_lut: a VOI LUT Sequence item's data (uint16, first value mapped 0, 16 bits an entry).
        rescale: (slope, intercept).
        preamble: False writes the dataset without preamble, "DICM" or file meta.
        compress: a transfer syntax UID to compress to (pydicom's encoders).
    """
    import pydicom

    ds = _base(DX_FOR_PRESENTATION)
    ds.Modality = "DX"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        from pydicom.dataset import Dataset

        item = Dataset()
        entries = len(voi_lut) % 65536  # 0 stands for 2**16 entries (PS3.3 C.11.2.1.1)
        item.add_new(0x00283002, "US", [entries, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
        # LUT Data: OW (its other allowed VR), as US cannot hold more than 32,767 entries in explicit VR.
        item.add_new(0x00283006, "OW", np.asarray(voi_lut, dtype="<u2").tobytes())
        ds.VOILUTSequence = [item]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if compress is not None:
        ds.compress(compress)
    path = Path(path)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def write_report(path: str | Path) -> Path:
    """A Basic Text SR: a valid DICOM file without pixel data."""
    ds = _base(BASIC_TEXT_SR)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContentDate = "20240101"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def window_8bit(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2.1) with an output range of 0..255, rounded."""
    c, w = centre - 0.5, width - 1
    x = values.astype(np.float64)
    y = ((x - c) / w + 0.5) * 255
    y = np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))
    return np.rint(y).astype(np.uint8)


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def _explicit_le(ds) -> bytes:
    """A dataset's elements in Explicit VR Little Endian, without preamble or file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def write_deflated_bomb(path: str | Path, *, filler: int, size: int = 64) -> Path:
    """A Deflated Explicit VR Little Endian file: a size x size 8-bit image behind a private element of
    ``filler`` zero bytes. The deflated stream is written in chunks (small on disk and in memory: zeros
    deflate about 1000:1)."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ds = _base(DX_FOR_PRESENTATION, DEFLATED)
    ds.Modality, ds.Rows, ds.Columns = "DX", size, size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    creator = b"XRAI TEST "
    head = (_explicit_le(ds) + struct.pack("<HH2sH", 0x7FDF, 0x0010, b"LO", len(creator)) + creator
            + struct.pack("<HH2sHI", 0x7FDF, 0x1000, b"OB", 0, filler))
    pixels = (np.arange(size * size) % 256).astype(np.uint8).tobytes()
    tail = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, len(pixels)) + pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(deflate.compress(head))
        chunk = b"\0" * 2**22
        for start in range(0, filler, len(chunk)):
            f.write(deflate.compress(chunk[: min(len(chunk), filler - start)]))
        f.write(deflate.compress(tail) + deflate.flush())
    return path


def j2k_header(width: int, height: int, *, components: int = 1, bits: int = 8) -> bytes:
    """The start of a JPEG 2000 codestream: SOC, then a SIZ marker segment saying width x height (no
    tile data: enough for a decoder to size its buffers, not to decode)."""
    import struct

    siz = struct.pack(">HIIIIIIIIH", 0, width, height, 0, 0, width, height, 0, 0, components)
    siz += bytes([bits - 1, 1, 1]) * components
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(siz) + 2) + siz


def jpeg_saying(width: int, height: int) -> bytes:
    """A real 64x64 baseline JPEG whose SOF marker is patched to say width x height."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, height, width)
    return bytes(data)


def write_j2k_liar(path: str | Path, *, rows: int, columns: int, codestream: bytes,
                   syntax: str = "1.2.840.10008.1.2.4.90") -> Path:
    """A compressed DICOM (JPEG 2000 Lossless unless ``syntax`` says another) whose header says
    rows x columns (8-bit grey) around ``codestream``."""
    from pydicom.encaps import encapsulate

    ds = _base(DX_FOR_PRESENTATION, syntax)
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_damaged(path: str | Path, damage: str) -> Path:
    """A small 8-bit DICOM with one header fault: ``frames`` (NumberOfFrames is IS "abc"), ``vr`` (a
    flipped byte makes Rows' VR the unknown "UQ") or ``photometric`` (a PhotometricInterpretation of
    control characters and 300 letters)."""
    import pydicom

    path = write_dicom(path, np.zeros((8, 8), np.uint8))
    if damage == "photometric":
        settings = pydicom.config.settings
        checking = settings.reading_validation_mode, settings.writing_validation_mode
        settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE  # the point
        try:
            ds = pydicom.dcmread(path)
            ds["PhotometricInterpretation"].value = "\x1b[31mEVIL\r\n" + "X" * 300
            ds.save_as(path)
        finally:
            settings.reading_validation_mode, settings.writing_validation_mode = checking
        return path
    if damage == "frames":
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 1000
        ds.save_as(path)
    old, new = {"frames": (b"IS\x04\x001000", b"IS\x04\x00abc "), "vr": (b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00UQ")}[damage]
    data = path.read_bytes()
    assert data.count(old) == 1, damage
    path.write_bytes(data.replace(old, new))
    return path
