"""Mammography pixels: decode a DICOM data set into the `Mammogram` the models read.

Pixel values reach the models as stored (bits stored, MONOCHROME1 inverted so brighter is
denser), without the Modality LUT (rescale) or the VOI LUT (window): the published models were
trained on detector values preprocessed by their own per-image normalisation, and a site's
window is a display choice that varies by vendor and by technologist.

`expected_pixel_bytes` is the one pixel-length rule: the listener applies it to the bytes it
receives, the reader to the data set it decodes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom import uid as uids
from pydicom.encaps import generate_fragmented_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from .header import ImageDescription, NotAMammogramError, describe
from .mammogram import Mammogram, MammogramError

MAX_DIMENSION = 10000
"""Largest Rows or Columns accepted; the biggest mammography detectors are about 4100 x 5600."""


class NotScreeningViewError(MammogramError):
    """`read_mammogram` was asked for a screening image but the header describes another one."""


class PixelDataError(MammogramError):
    """The pixel data cannot be decoded as the header describes it."""


class ImplausibleDimensionsError(PixelDataError):
    """Rows, Columns, bit depth or frame count outside what a mammogram can be."""


class TruncatedPixelDataError(PixelDataError):
    """Fewer pixel bytes than the header promises, or a compressed stream cut short."""


class PixelDataLengthError(PixelDataError):
    """More uncompressed pixel bytes than the header describes."""


class UnsupportedPixelDataError(PixelDataError):
    """A pixel format or transfer syntax this reader does not decode."""


def expected_pixel_bytes(
    rows: int, columns: int, bits_allocated: int, samples_per_pixel: int = 1, frames: int = 1
) -> int:
    """Bytes of native (uncompressed) Pixel Data the header describes, before even padding."""
    return (rows * columns * samples_per_pixel * frames * bits_allocated + 7) // 8


def read_mammogram(ds: Dataset, *, require_screening: bool = True) -> Mammogram:
    """Decode one mammogram.

    With `require_screening` (the default) only screening views are read; otherwise anything
    with L/R laterality, CC/MLO view and one frame is (its `kind` and `view_modifiers` say what
    it is). Raises `NotScreeningViewError`, a `PixelDataError` subclass, or what `describe`
    raises.
    """
    d = describe(ds)
    if not d.screening_view and (
        require_screening or d.laterality is None or d.view is None or d.number_of_frames != 1
    ):
        raise NotScreeningViewError(
            f"{d.view_key} is not a screening view: {d.not_screening_reason}. Only For "
            "Presentation CC and MLO images without view modifiers are analysed."
        )
    assert d.laterality is not None and d.view is not None
    pixels = _decode(ds, d)
    return Mammogram(
        pixels=pixels,
        laterality=d.laterality,
        view=d.view,
        bits_stored=d.bits_stored,
        sop_instance_uid=d.sop_instance_uid,
        series_instance_uid=d.series_instance_uid,
        study_instance_uid=d.study_instance_uid,
        sop_class_uid=d.sop_class_uid,
        kind=d.kind,
        view_modifiers=d.view_modifiers,
        pixel_spacing_mm=d.pixel_spacing_mm,
        patient_orientation=d.patient_orientation,
        patient_id=str(ds.get("PatientID") or "").strip(),
        photometric_interpretation=d.photometric_interpretation,
    )


def read_mammogram_file(path: str | Path, *, require_screening: bool = True) -> Mammogram:
    """`read_mammogram` on a file; a file cut short raises `TruncatedPixelDataError`."""
    path = Path(path)
    with path.open("rb") as fp, warnings.catch_warnings():
        # pydicom warns, rather than raises, when the file ends inside a value of undefined
        # length (encapsulated pixel data); it then stops where that value began. Where it
        # stopped, not what it warned, says whether the file was read to its end.
        warnings.simplefilter("ignore", UserWarning)
        try:
            ds = pydicom.dcmread(fp)
        except InvalidDicomError as exc:
            raise NotAMammogramError(f"{path} is not a DICOM file: {exc}") from exc
        except EOFError as exc:
            raise _truncated_file(path) from exc
        stopped_early = fp.tell() < path.stat().st_size
    if stopped_early or len(ds) == 0:
        raise _truncated_file(path)
    return read_mammogram(ds, require_screening=require_screening)


def _truncated_file(path: Path) -> TruncatedPixelDataError:
    return TruncatedPixelDataError(
        f"{path} ends before its data does: the file is truncated. Re-send the instance."
    )


def _decode(ds: Dataset, d: ImageDescription) -> np.ndarray:
    _check_format(d)
    if "PixelData" not in ds:
        raise TruncatedPixelDataError(
            f"{d.view_key} has no Pixel Data (7FE0,0010). Re-send the complete instance."
        )
    syntax = UID(d.transfer_syntax_uid)
    data = ds.PixelData
    if syntax.is_encapsulated:
        _check_encapsulated(data, syntax, d)
    else:
        expected = expected_pixel_bytes(d.rows, d.columns, d.bits_allocated)
        if len(data) < expected:
            raise TruncatedPixelDataError(
                f"Pixel Data has {len(data)} bytes but {d.rows} x {d.columns} x "
                f"{d.bits_allocated} bits needs {expected}: the data is truncated. Re-send the "
                "instance."
            )
        if len(data) > expected + 1:
            raise PixelDataLengthError(
                f"Pixel Data has {len(data)} bytes but Rows {d.rows} x Columns {d.columns} x "
                f"{d.bits_allocated} bits needs {expected}: the header does not describe the "
                "data. Fix Rows, Columns or BitsAllocated at the source."
            )
    _check_decoder(syntax)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise anything; we name the failure
        raise _decode_error(exc, syntax, d) from exc
    if raw.shape != (d.rows, d.columns):
        raise PixelDataError(
            f"decoded pixels are {raw.shape}, header says {d.rows} x {d.columns}. Fix Rows and "
            "Columns at the source."
        )
    return _to_float(raw, d)


def _check_format(d: ImageDescription) -> None:
    if not (0 < d.rows <= MAX_DIMENSION and 0 < d.columns <= MAX_DIMENSION):
        raise ImplausibleDimensionsError(
            f"Rows (0028,0010) {d.rows} x Columns (0028,0011) {d.columns} is not a plausible "
            f"mammogram (each must be 1..{MAX_DIMENSION}); the header is corrupt. Re-export the "
            "image from the modality."
        )
    if d.bits_allocated not in (8, 16) or not 1 <= d.bits_stored <= d.bits_allocated:
        raise ImplausibleDimensionsError(
            f"BitsAllocated (0028,0100) {d.bits_allocated} with BitsStored (0028,0101) "
            f"{d.bits_stored} is not a grayscale mammogram (8 or 16 bits allocated, stored ≤ "
            "allocated)."
        )
    if d.samples_per_pixel != 1 or d.photometric_interpretation not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise UnsupportedPixelDataError(
            f"SamplesPerPixel {d.samples_per_pixel}, PhotometricInterpretation "
            f"{d.photometric_interpretation!r}: a mammogram must be one grayscale sample "
            "(MONOCHROME1 or MONOCHROME2). Send the original, not a colour rendering."
        )


_ENDS_WITH_EOI = frozenset(
    [*uids.JPEGTransferSyntaxes, *uids.JPEGLSTransferSyntaxes, *uids.JPEG2000TransferSyntaxes]
)
"""Codestreams that end with an FF D9 marker (JPEG's EOI, JPEG 2000's EOC)."""


def _check_encapsulated(data: bytes, syntax: UID, d: ImageDescription) -> None:
    try:
        frames = [b"".join(f) for f in generate_fragmented_frames(data, number_of_frames=1)]
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for cut items
        raise TruncatedPixelDataError(
            f"the encapsulated Pixel Data of {d.view_key} ({syntax.name}) is cut short or "
            f"malformed ({exc}). Re-send the instance."
        ) from exc
    if not frames or not frames[0]:
        raise TruncatedPixelDataError(
            f"the encapsulated Pixel Data of {d.view_key} ({syntax.name}) holds no frame. "
            "Re-send the instance."
        )
    if syntax in _ENDS_WITH_EOI:
        stream = frames[0].rstrip(b"\x00")
        if not stream.endswith(b"\xff\xd9"):
            raise TruncatedPixelDataError(
                f"the {syntax.name} stream of {d.view_key} has no end-of-image marker: the "
                "compressed data is truncated. Re-send the instance."
            )


def _check_decoder(syntax: UID) -> None:
    """A transfer syntax pydicom has no decoder for, or whose decoder lacks its plugins, is
    named before decoding starts (so that decoding errors are errors in the data)."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        available, missing = False, ""
    else:
        available = decoder.is_available
        missing = "; ".join(decoder.missing_dependencies)
    if not available:
        raise UnsupportedPixelDataError(
            f"cannot decode {syntax.name} ({syntax}){f': needs {missing}' if missing else ''}. "
            "Install the pylibjpeg and pyjpegls plugins, or ask the sender for JPEG 2000, "
            "JPEG-LS or uncompressed data."
        )


def _decode_error(exc: Exception, syntax: UID, d: ImageDescription) -> PixelDataError:
    if isinstance(exc, NotImplementedError):
        return UnsupportedPixelDataError(
            f"cannot decode this {syntax.name} ({syntax}) pixel data: {exc}. Ask the sender "
            "for JPEG 2000, JPEG-LS or uncompressed data."
        )
    return PixelDataError(f"decoding the {syntax.name} pixel data of {d.view_key} failed: {exc}")


def _to_float(raw: np.ndarray, d: ImageDescription) -> np.ndarray:
    """Stored values → float32 with brighter = denser, at the stored bit depth."""
    bits = d.bits_stored
    if d.pixel_representation == 0:
        # Masked to 16 bits (at most 16 are allocated) and then to float32: a pass each
        # (three or four through 32-bit integers took 12 ms more per 3328x2560 image).
        top = (1 << bits) - 1
        values = np.bitwise_and(raw, np.uint16(top), dtype=np.uint16, casting="unsafe")
        if d.photometric_interpretation == "MONOCHROME1":
            return np.subtract(np.float32(top), values, dtype=np.float32)
    else:
        values = raw.astype(np.int32)
        if d.photometric_interpretation == "MONOCHROME1":
            values = -1 - values  # maps [-2^(b-1), 2^(b-1)-1] onto itself, reversed
    return np.ascontiguousarray(values, dtype=np.float32)
