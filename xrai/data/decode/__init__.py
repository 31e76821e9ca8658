"""The one safe decoder: PNG, JPEG and DICOM X-rays into uint8 grey arrays, within shared limits (no torch)."""

from xrai.data.decode.dicom import (
    DICOM_EXTENSIONS,
    DICOM_JPEG_EXTRA,
    decode_dicom,
    looks_like_dicom,
)
from xrai.data.decode.images import (
    DECODER_VERSION,
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    UPLOAD_MAX_DECODED_BYTES,
    DamagedImages,
    ImageError,
    ImageTooLargeError,
    TruncatedImageWarning,
    decode_image,
    fit_square,
    letterbox,
    read_image,
    scan_images,
)

__all__ = ["DECODER_VERSION", "DICOM_EXTENSIONS", "DICOM_JPEG_EXTRA", "MAX_DECODED_BYTES", "MAX_PIXELS",
           "UPLOAD_MAX_DECODED_BYTES", "DamagedImages", "ImageError", "ImageTooLargeError", "TruncatedImageWarning",
           "decode_dicom", "decode_image", "fit_square", "letterbox", "looks_like_dicom", "read_image", "scan_images"]
