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
