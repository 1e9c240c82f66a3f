"""JPEG baseline frames for the SC heat-map, encoded while other threads run.

highdicom encodes a JPEG baseline frame with Pillow (quality 95, 4:2:0 chroma), which holds the
GIL while libjpeg-turbo runs: in the output stage's threads one view's heat-map (about 30 ms at
3328x2560) stalled the other views' SEGs. imagecodecs wraps libjpeg-turbo too and releases the
GIL; with the same settings its codestream is byte for byte Pillow's
(tests/test_outputs_jpeg.py), and it takes 0.032 s for a heat-map against Pillow's 0.043 s
(bench/outputs.py). Where imagecodecs is missing, highdicom's encoder is used.

highdicom takes no encoded frames, so the SC is built uncompressed (RGB) around a one-pixel
`PLACEHOLDER`, and `store` then puts in what highdicom would have: the frame's grid, the
transfer syntax, YBR_FULL_422 and the encapsulated frame.
"""

from __future__ import annotations

from importlib.util import find_spec

import highdicom as hd
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

QUALITY = 95
"""highdicom's (`highdicom.frame.encode_frame`)."""
HAVE_IMAGECODECS = find_spec("imagecodecs") is not None


def encode(rgb: np.ndarray) -> bytes:
    """One (rows, cols, 3) uint8 RGB frame as the JPEG baseline codestream highdicom writes.
    The RGB view of an RGBX image (`heatmap.overlay`) is encoded from the RGBX image, which
    libjpeg-turbo reads as it is, without a copy: the codestream is the same."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (rows, cols, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    if not HAVE_IMAGECODECS:
        frame = np.ascontiguousarray(rgb)
        ybr = hd.PhotometricInterpretationValues.YBR_FULL_422
        return hd.frame.encode_frame(frame, JPEGBaseline8Bit, 8, 8, ybr, 0, 0)
    import imagecodecs

    rgbx = _rgbx_under(rgb)
    if rgbx is None:
        frame = np.ascontiguousarray(rgb)
        return bytes(imagecodecs.jpeg8_encode(frame, level=QUALITY, subsampling="420"))
    return bytes(
        imagecodecs.jpeg8_encode(
            rgbx,
            level=QUALITY,
            subsampling="420",
            colorspace=imagecodecs.JPEG8.CS.EXT_RGBX,
            outcolorspace=imagecodecs.JPEG8.CS.YCbCr,
        )
    )


def _rgbx_under(rgb: np.ndarray) -> np.ndarray | None:
    """The (rows, cols, 4) RGBX image whose first three bytes per pixel `rgb` is, or None."""
    rows, cols = rgb.shape[:2]
    base = rgb.base
    if not isinstance(base, np.ndarray) or not base.flags.c_contiguous:
        return None
    if base.nbytes != rows * cols * 4 or rgb.strides != (4 * cols, 4, 1):
        return None
    if rgb.ctypes.data != base.ctypes.data:
        return None
    return base.view(np.uint8).reshape(rows, cols, 4)


PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)
PLACEHOLDER.flags.writeable = False
"""What highdicom may build the data set around (`store` gives it its grid): a full-size
frame would only be checked and copied into uncompressed pixel data that `store` replaces."""


def store(ds: pydicom.Dataset, rgb: np.ndarray) -> None:
    """Replace the uncompressed RGB pixel data of `ds`, built by highdicom from `rgb` or
    from `PLACEHOLDER`, by `rgb` as one JPEG baseline frame, as highdicom stores it."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or ds.PhotometricInterpretation != "RGB":
        raise ValueError("store() takes a data set highdicom built uncompressed, in RGB")
    if ds.SamplesPerPixel != 3 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the pixels {rgb.shape} are not the data set's")
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = hd.PhotometricInterpretationValues.YBR_FULL_422.value
    ds.PixelData = encapsulate([encode(rgb)])
