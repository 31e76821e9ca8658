"""DICOM radiographs for the one decoder: pydicom reads them, the file's own LUTs make them grey uint8.

The pipeline is the display pipeline of PS3.3 C.11 (and what torchxrayvision's ``read_xray_dcm`` and a
viewer do): stored values -> Modality LUT (rescale slope/intercept or the Modality LUT Sequence) ->
VOI LUT (the VOI LUT Sequence, else Window Center/Width with its VOI LUT Function, as the file says;
pydicom's ``apply_voi`` / ``apply_windowing``) -> 8 bits -> MONOCHROME1 inverted, so bone is always
bright. The window's output range is mapped to 0..255, so the picture is the one the file asks a
viewer to show. No window is ever guessed: a file without one is stretched over its own min..max (as
16-bit PNGs are), except plain 8-bit data, which is taken as stored.

Only the tags the pixels need are read (``dcmread(specific_tags=...)``): patient and study tags are
never parsed, so they cannot reach a message, a log or an output. Multi-frame files are refused;
compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg, from the ``dicom-jpeg``
extra; Pillow for baseline JPEG and JPEG 2000), and a file no installed plugin can read gets a one-line
error naming the extra.
"""

from __future__ import annotations

import contextvars
import io
import logging
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

from xrai.data.decode.limits import (  # STRIP_ROWS: rows windowed at a time, as images converts them
    DATASET_REMEDY,
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    STRIP_ROWS,
    ImageError,
    ImageTooLargeError,
    check_decode_budget,
)
from xrai.errors import first_lines

__all__ = ["DICOM_EXTENSIONS", "DICOM_JPEG_EXTRA", "decode_dicom", "looks_like_dicom"]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
DICOM_JPEG_EXTRA = 'pip install "xrai[dicom-jpeg]"'
HEAD_BYTES = 132  # the 128-byte preamble and "DICM": enough to recognise a DICOM file by content

_MAGIC_OFFSET, _MAGIC = 128, b"DICM"
# The only tags read: the image pixel, modality LUT and VOI LUT modules, and what tells an image from
# a report. Nothing that identifies a patient, a study or an institution.
_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "VOILUTSequence", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData",
    "FloatPixelData", "DoubleFloatPixelData",
]
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib'd
# Inflated dataset allowed beyond the decode budget: the pixels are within the budget (checked from the
# header later), and the image tags read are a few KB; a 1000:1 zeros bomb is refused at this size.
DATASET_MARGIN = 4 * 2**20
_INFLATE_CHUNK = 2**16  # compressed bytes fed to zlib at a time
# Compressed pixel data carries its own size, from which the decoder sizes its buffers: the JPEG 2000
# family (Part 1, Part 2, HTJ2K) in its SIZ marker, the JPEG family (baseline, extended, lossless,
# JPEG-LS) in its SOF marker. Both are checked against the header and the budget before decoding.
_J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                  "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                  "1.2.840.10008.1.2.4.203"})
_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_SOC_SIZ = b"\xff\x4f\xff\x51"
# JPEG start-of-frame markers (all processes, and JPEG-LS's SOF55), and those without a length field.
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 4-byte length in explicit VR
_SHOWN = 64  # characters of a file's own text a message may quote
_FAR = 1e30  # beyond any stored value: probing the window with +-_FAR gives its output range
# Value representations, for recognising a dataset written without preamble (explicit VR).
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                 b"UR US UT UV".split())


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (``HEAD_BYTES`` suffice) are DICOM's.

    A DICOM file has "DICM" after a 128-byte preamble. Older files and some PACS exports start straight
    with the dataset: then its first element, a tag of group 0002 (file meta) or 0008 (the first group
    of every image), little or big endian, followed by an explicit VR or an implicit length that fits.
    """
    if head[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] == _MAGIC:
        return True
    if len(head) < 8:
        return False
    for order in "<>":
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x0100:
            continue
        if head[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if order == "<" and length < 0x100:  # implicit VR is always little endian; first values are short
            return True
    return False


def decode_dicom(data: bytes, *, name: str, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_DECODED_BYTES,
                 remedy: str = DATASET_REMEDY) -> np.ndarray:
    """A single-frame DICOM image as uint8 (H, W) grey, windowed as the file specifies.

    Args:
        data: the file's bytes.
        name: the file (or upload) name for messages.
        max_pixels, max_bytes: the decode budget, checked from the header (rows x columns x samples x
            bytes allocated) before the pixel data is decoded; a deflated dataset is inflated only up to
            ``max_bytes + DATASET_MARGIN`` and a JPEG 2000 codestream's own size is checked too.
        remedy: the advice an over-budget message ends with.
    Raises:
        ImageError: not a readable DICOM, no pixel data (a report), multi-frame, an unsupported colour
            model or transfer syntax, a missing decoder plugin (the message names the extra).
        ImageTooLargeError: over the budget.

    What pydicom logs or warns about the file never reaches stderr as such: it becomes at most one
    warning line on the ``xrai.data.decode`` logger for a file that decodes, or is left to the one-line
    ImageError for one that does not (every message at DEBUG).
    """
    said: list[str] = []
    token = _install_quiet_pydicom().set(said)
    try:
        image = _decode(data, name, max_pixels, max_bytes, remedy)
    except ImageError:
        _log_said(name, said, logging.DEBUG)
        raise
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - pydicom parses lazily: a damaged tag fails where first read
        _log_said(name, said, logging.DEBUG)
        raise ImageError(f"{name}: not a readable DICOM file (damaged header: {type(error).__name__}: "
                         f"{_shown(first_lines(error, 1))})") from error
    finally:
        _SAID.reset(token)
    _log_said(name, said, logging.WARNING)
    return image


def _decode(data: bytes, name: str, max_pixels: int, max_bytes: int, remedy: str) -> np.ndarray:
    ds = _read(data, name, max_bytes)
    _check_image(ds, name)
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    check_decode_budget(name, width=columns, height=rows, channels=samples, bytes_per_sample=max(1, -(-bits // 8)),
                        max_pixels=max_pixels, max_bytes=max_bytes, remedy=remedy)
    _check_decoder(ds, name)
    if str(ds.file_meta.TransferSyntaxUID) in _J2K | _JPEG:
        _check_codestream(ds, name, rows=rows, columns=columns, samples=samples, max_pixels=max_pixels,
                          max_bytes=max_bytes, remedy=remedy)
    try:
        pixels = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - any plugin's failure on untrusted bytes is the file's fault
        raise ImageError(f"{name}: cannot decode the DICOM pixel data ({first_lines(error, 2)})") from error
    try:
        if str(ds.PhotometricInterpretation).startswith("MONOCHROME"):
            grey = _display_grey(pixels, ds)
            if ds.PhotometricInterpretation == "MONOCHROME1":  # stored "white is low": invert for display
                np.subtract(255, grey, out=grey)
            return grey
        return _colour_to_grey(pixels, ds, name)
    except ImageError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as error:
        # Bad LUT or window tags (a width of 0, a LUT of 3 bits): the file's fault, said in one line.
        raise ImageError(f"{name}: cannot apply the DICOM's LUTs ({first_lines(error, 2)})") from error


# pydicom's log records while this context decodes a file (None: not decoding; records pass through).
_SAID: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("xrai_pydicom_said", default=None)
_LOG = logging.getLogger("xrai.data.decode")
_PYDICOM_WARNINGS = ("ignore", None, Warning, None, 0)  # filled in by _install_quiet_pydicom


class _PerFile(logging.Handler):
    """On pydicom's logger: a record made while a file decodes is kept for that file (message only, no
    traceback); any other goes on to the root logger's handlers, as propagation would have sent it."""

    def emit(self, record: logging.LogRecord) -> None:
        said = _SAID.get()
        if said is None:
            logging.getLogger().callHandlers(record)
        else:
            said.append(_shown(first_lines(record.getMessage(), 1), quote=False, limit=200))


def _install_quiet_pydicom() -> contextvars.ContextVar:
    """Route pydicom's logger through _PerFile and ignore pydicom's own warnings (their log twins are
    kept per file); idempotent, cheap enough to call for every file (pytest resets warning filters)."""
    global _PYDICOM_WARNINGS
    logger = logging.getLogger("pydicom")
    if not any(isinstance(h, _PerFile) for h in logger.handlers):
        logger.addHandler(_PerFile())
        logger.propagate = False  # _PerFile forwards what is not a decoding file's
    if _PYDICOM_WARNINGS not in warnings.filters:
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        _PYDICOM_WARNINGS = warnings.filters[0]
    return _SAID


def _log_said(name: str, said: list[str], level: int) -> None:
    """What pydicom said about one file, as one line (each message at DEBUG)."""
    for message in said:
        _LOG.debug("%s: pydicom: %s", name, message)
    if said and level > logging.DEBUG:
        more = f" (+{len(said) - 1} more; -v shows them)" if len(said) > 1 else ""
        _LOG.log(level, "%s: pydicom: %s%s", name, said[0], more)


def _shown(value, quote: bool = True, limit: int = _SHOWN) -> str:
    """A file's own text made safe to quote: printable ASCII only, at most ``limit`` characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(value))
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(text) if quote else text


def _read(data: bytes, name: str, max_bytes: int = MAX_DECODED_BYTES):
    """Parse the image tags (never the patient's); a dataset without preamble is read as pydicom can; a
    deflated dataset is inflated here, within the budget, before pydicom sees it."""
    # pydicom (~0.3 s to import) only once a DICOM arrives: every importer of the decoder would pay it
    import pydicom
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    has_preamble = data[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] == _MAGIC
    start, syntax = _file_meta(data, 132 if has_preamble else 0)
    deflated = syntax == _DEFLATED
    source = _inflate(data, start, name, cap=max_bytes + DATASET_MARGIN) if deflated else io.BytesIO(data)
    try:
        ds = pydicom.dcmread(source, force=deflated or not has_preamble, specific_tags=_TAGS)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types on damaged headers
        # Only the type: a parser's message may quote bytes of the header, which we do not repeat.
        raise ImageError(f"{name}: not a readable DICOM file (damaged or truncated header: "
                         f"{type(error).__name__})") from error
    if deflated:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated dataset is
    elif "TransferSyntaxUID" not in ds.file_meta:
        # No file meta (no preamble): the encoding pydicom found is the transfer syntax.
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None:
            raise ImageError(f"{name}: DICOM dataset without file meta whose encoding cannot be told")
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _file_meta(data: bytes, pos: int) -> tuple[int, str | None]:
    """(where the dataset starts, the transfer syntax UID) from the file meta (group 0002, always
    explicit VR little endian) at ``pos``; (pos, None) where there is none or it cannot be walked."""
    syntax = None
    try:
        while pos + 8 <= len(data):
            group, element = struct.unpack_from("<HH", data, pos)
            if group != 0x0002:
                break
            if data[pos + 4 : pos + 6] in _LONG_VRS:
                (length,), head = struct.unpack_from("<I", data, pos + 8), 12
            else:
                (length,), head = struct.unpack_from("<H", data, pos + 6), 8
            if length == 0xFFFFFFFF:  # undefined length in the file meta: leave it to pydicom
                return pos, None
            if element == 0x0010:
                syntax = data[pos + head : pos + head + length].decode("ascii", "replace").strip("\0 ")
            pos += head + length
    except struct.error:
        return pos, None
    return pos, syntax


def _inflate(data: bytes, start: int, name: str, *, cap: int) -> io.BytesIO:
    """The deflated dataset after ``start``, inflated a chunk at a time and refused past ``cap`` bytes
    (a zip bomb: zeros deflate about 1000:1), before it is all in memory. A BytesIO: never copied whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out, size = io.BytesIO(), 0
    view, pos, pending = memoryview(data), start, b""
    while not inflater.eof:
        if not pending and pos >= len(data):
            size += out.write(inflater.flush())  # the little still held back (a truncated stream: pydicom says so)
            _check_inflated(size, cap, name)
            break
        if not pending:
            pending, pos = view[pos : pos + _INFLATE_CHUNK], pos + _INFLATE_CHUNK
        try:
            size += out.write(inflater.decompress(pending, min(_INFLATE_CHUNK * 16, cap + 1 - size)))
        except zlib.error as error:
            raise ImageError(f"{name}: damaged deflated DICOM dataset ({error})") from error
        _check_inflated(size, cap, name)
        pending = inflater.unconsumed_tail
    out.seek(0)
    return out


def _check_inflated(size: int, cap: int, name: str) -> None:
    if size > cap:
        raise ImageTooLargeError(
            f"{name}: deflated DICOM dataset inflates to more than {cap / 2**20:,.0f} MiB (the decode "
            f"budget plus {DATASET_MARGIN // 2**20} MiB of tags): a decompression bomb, refused")


def _check_image(ds, name: str) -> None:
    """Refuse what is not one 2-D image: no pixel data, float pixel data, several frames, odd colours."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageError(f"{name}: DICOM with floating-point pixel data (a parametric map), not a radiograph")
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", "") if sop is not None else ""
        if kind and "Image" not in kind:
            raise ImageError(f"{name}: not an image: a DICOM '{kind}' object has no pixel data")
        raise ImageError(f"{name}: DICOM without pixel data (truncated or damaged: an image file ends with its "
                         "pixels)")
    for tag in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(tag) in (None, ""):
            raise ImageError(f"{name}: DICOM image without {tag} (damaged header)")
    frames = ds.get("NumberOfFrames")
    try:
        count = 1 if frames in (None, "") else int(frames)
    except (TypeError, ValueError) as error:
        raise ImageError(f"{name}: DICOM NumberOfFrames is not a number ({_shown(frames)}): damaged "
                         "header") from error
    if count > 1:
        raise ImageError(f"{name}: multi-frame DICOM ({count} frames) is not supported; save the frame to "
                         "classify as a single-frame file")
    colour = str(ds.PhotometricInterpretation)
    if not colour.startswith(("MONOCHROME", "RGB", "YBR")):
        raise ImageError(f"{name}: DICOM photometric interpretation {_shown(colour)} is not supported (a "
                         "radiograph is MONOCHROME1 or MONOCHROME2)")


def _check_codestream(ds, name: str, *, rows: int, columns: int, samples: int, max_pixels: int, max_bytes: int,
                      remedy: str) -> None:
    """Refuse a JPEG or JPEG 2000 codestream whose own size (its SOF or SIZ marker) is over the budget or
    is not the header's Rows x Columns x SamplesPerPixel: the decoder sizes its buffers from the codestream."""
    fragment = _first_fragment(ds.PixelData, name)
    j2k = str(ds.file_meta.TransferSyntaxUID) in _J2K
    kind, marker = ("JPEG 2000", "SIZ") if j2k else ("JPEG", "SOF")
    try:
        width, height, components, bits = _j2k_size(fragment) if j2k else _jpeg_size(fragment)
    except struct.error as error:
        raise ImageError(f"{name}: {kind} pixel data without a readable codestream size ({marker} marker): "
                         "damaged") from error
    check_decode_budget(name, width=width, height=height, channels=components, bytes_per_sample=-(-bits // 8),
                        max_pixels=max_pixels, max_bytes=max_bytes, remedy=remedy)
    if (width, height, components) != (columns, rows, samples):
        raise ImageError(f"{name}: {kind} codestream is {width}x{height} x {components} component(s) but the "
                         f"DICOM header says {columns}x{rows} x {samples}: damaged or forged, refused")


def _j2k_size(fragment: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, bits) from a JPEG 2000 codestream's SIZ; struct.error if there is none."""
    at = fragment.find(_SOC_SIZ)  # at 0 in a bare codestream; inside the jp2c box of a JP2 file
    if at < 0:
        raise struct.error("no SIZ")
    # SIZ: Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, Ssiz per component
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", fragment, at + 8)
    (components,) = struct.unpack_from(">H", fragment, at + 40)
    depths = fragment[at + 42 : at + 42 + 3 * components : 3]
    if components < 1 or len(depths) != components:
        raise struct.error("short SIZ")
    return xsiz - xosiz, ysiz - yosiz, components, max((d & 0x7F) + 1 for d in depths)


def _jpeg_size(fragment: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, bits) from a JPEG codestream's first SOF marker (any process, and
    JPEG-LS); struct.error if there is none before the scan starts."""
    if not fragment.startswith(b"\xff\xd8"):
        raise struct.error("no SOI")
    pos = 2
    while True:
        while fragment[pos : pos + 1] != b"\xff":  # (garbage between segments: skipped, as decoders do)
            if pos >= len(fragment):
                raise struct.error("no SOF")
            pos += 1
        while fragment[pos : pos + 1] == b"\xff":  # fill bytes
            pos += 1
        marker = struct.unpack_from(">B", fragment, pos)[0]
        pos += 1
        if marker in _NO_LENGTH:
            continue
        if marker == 0xDA:  # start of scan before any frame header
            raise struct.error("no SOF")
        (length,) = struct.unpack_from(">H", fragment, pos)
        if marker in _SOF:
            bits, height, width, components = struct.unpack_from(">BHHB", fragment, pos + 2)
            return width, height, components, bits
        pos += length


def _first_fragment(pixel_data: bytes, name: str) -> bytes:
    """The first fragment of encapsulated pixel data (after the Basic Offset Table item)."""
    pos, item = 0, b""
    for _ in range(2):  # the offset table, then the first fragment
        try:
            tag, length = struct.unpack_from("<II", pixel_data, pos)
        except struct.error as error:
            raise ImageError(f"{name}: encapsulated DICOM pixel data cut short") from error
        if tag != 0xE000FFFE:
            raise ImageError(f"{name}: encapsulated DICOM pixel data without its items: damaged")
        item, pos = pixel_data[pos + 8 : pos + 8 + length], pos + 8 + length
    return item


def _check_decoder(ds, name: str) -> None:
    """Fail in one line, naming the extra, when no installed plugin decodes the transfer syntax."""
    from pydicom.pixels import get_decoder  # pydicom on first DICOM only (see _read)

    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as error:
        raise ImageError(f"{name}: DICOM transfer syntax {uid.name or uid} is not supported") from error
    if not decoder.is_available:
        raise ImageError(f"{name}: compressed DICOM ({uid.name}) needs a decoder plugin: {DICOM_JPEG_EXTRA}")


def _display_grey(pixels: np.ndarray, ds) -> np.ndarray:
    """Modality LUT, VOI LUT, then the VOI output range (else the image's own range) to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing  # pydicom on first DICOM only

    voi = _voi_kind(ds)
    apply = {"lut": apply_voi, "window": apply_windowing}.get(voi)

    def values(strip: np.ndarray) -> np.ndarray:
        v = apply_modality_lut(strip, ds)
        if voi == "lut" and not np.issubdtype(v.dtype, np.integer):
            v = np.rint(v).astype(np.int64)  # a LUT is indexed by integers (rescaled values are whole)
        return apply(v, ds) if apply else v

    if voi == "lut":
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        lut = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        lo, hi = float(lut.min()), float(lut.max())  # the LUT's own output range: its darkest to its brightest
    elif voi == "window":
        with np.errstate(over="ignore"):  # a SIGMOID window's exp() overflows to its limit, as wanted
            lo, hi = (float(v) for v in apply_windowing(np.array([-_FAR, _FAR]), ds))
    elif _plain_8bit(ds):
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    elif np.issubdtype(pixels.dtype, np.integer) and not ds.get("ModalityLUTSequence"):
        # No window: the image's own range, as a viewer's default window (never a guessed one). A rescale
        # is affine, so the stored extremes rescaled are the rescaled extremes, to the bit (one integer pass).
        ends = apply_modality_lut(np.array([pixels.min(), pixels.max()], dtype=pixels.dtype), ds)
        lo, hi = sorted(float(v) for v in ends)
    else:  # the same with a modality LUT table (not monotone) or float pixels: every strip's range
        lo, hi = np.inf, -np.inf
        for top in range(0, pixels.shape[0], STRIP_ROWS):
            v = values(pixels[top : top + STRIP_ROWS])
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    out = np.zeros(pixels.shape, dtype=np.uint8)
    if hi == lo:
        return out
    scale = 255.0 / (hi - lo)  # negative when a rescale slope flips the range: the mapping still holds
    for top in range(0, pixels.shape[0], STRIP_ROWS):
        v = values(pixels[top : top + STRIP_ROWS])
        out[top : top + STRIP_ROWS] = np.clip(np.rint((v - lo) * scale), 0, 255).astype(np.uint8)
    return out


def _voi_kind(ds) -> str | None:
    """Which VOI transform the file specifies, with apply_voi_lut's precedence: "lut", "window" or None."""
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        return "window"
    return None


def _plain_8bit(ds) -> bool:
    """Unsigned 8-bit data with no modality transform: already display values (1-bit masks are stretched)."""
    if ds.get("ModalityLUTSequence"):
        return False
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope not in (None, "") and (float(slope), float(intercept or 0)) != (1.0, 0.0):
        return False
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    return bits == 8 and int(ds.get("PixelRepresentation") or 0) == 0


def _colour_to_grey(pixels: np.ndarray, ds, name: str) -> np.ndarray:
    """RGB (pydicom turns YBR into RGB) -> PIL's ITU-R 601-2 luma, as a colour PNG would be read."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageError(f"{name}: colour DICOM with pixel array of shape {pixels.shape} is not supported")
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if bits > 8:
        pixels = np.rint(pixels.astype(np.float64) * (255.0 / (2**bits - 1)))
    rgb = np.ascontiguousarray(np.clip(pixels, 0, 255), dtype=np.uint8)
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
