"""A JPEG-LS lossless encoder plugin for pydicom that lets other threads run while it encodes.

pydicom's own JPEG-LS plugin (pyjpegls) holds the GIL while CharLS encodes, so in the output
stage's threads one view's SEG frames (about 30 ms each at 3328x2560) stalled the other
views' heat-maps. imagecodecs wraps CharLS too and releases the GIL. It always writes a SPIFF
header, which DICOM's JPEG-LS interchange format does not use; that header is dropped, and the
codestream is then byte for byte the one pyjpegls writes (tests/test_outputs_jpegls.py).

Registered with pydicom's public plugin interface (`register`), so `Dataset.compress` still
does the encapsulation and the transfer syntax: ``ds.compress(JPEGLSLossless, arr,
encoding_plugin=LABEL)``. Only what the SEG needs: one 8-bit sample per pixel.
"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
from pydicom.pixels.encoders import JPEGLSLosslessEncoder
from pydicom.pixels.encoders.base import EncodeRunner
from pydicom.uid import JPEGLSLossless

LABEL = "imagecodecs"

ENCODER_DEPENDENCIES = {JPEGLSLossless: ("numpy", "imagecodecs")}
"""What pydicom's plugin interface asks of a plugin module."""

_SOI, _APP8 = b"\xff\xd8", b"\xff\xe8"


def is_available(uid: str) -> bool:
    return uid == JPEGLSLossless and find_spec("imagecodecs") is not None


def encode_pixel_data(src: bytes, runner: EncodeRunner) -> bytes:
    """One frame (`src`, native little-endian pixels) as a JPEG-LS lossless codestream."""
    import imagecodecs

    if (runner.samples_per_pixel, runner.bits_allocated, runner.bits_stored) != (1, 8, 8):
        raise ValueError(
            f"the '{LABEL}' JPEG-LS plugin encodes 8-bit single-sample frames only, not "
            f"{runner.samples_per_pixel} sample(s) of {runner.bits_stored} bits stored in "
            f"{runner.bits_allocated}; use encoding_plugin='pyjpegls'"
        )
    frame = np.frombuffer(src, np.uint8).reshape(runner.rows, runner.columns)
    try:
        codestream = imagecodecs.jpegls_encode(frame)
    except imagecodecs.JpeglsError:
        # imagecodecs sizes its output buffer by an estimate that an incompressible frame
        # (noise) can exceed: once more with room for twice the frame.
        codestream = imagecodecs.jpegls_encode(frame, out=2 * frame.nbytes + 4096)
    return without_spiff(bytes(codestream))


def without_spiff(codestream: bytes) -> bytes:
    """The codestream without its SPIFF header: the APP8 marker segments (the header, then
    the directory's end entry, which carries the codestream's own SOI) after the first SOI."""
    if not codestream.startswith(_SOI):
        raise ValueError("not a JPEG-LS codestream: it does not start with SOI")
    position = len(_SOI)
    while codestream.startswith(_APP8, position):
        position += len(_APP8) + int.from_bytes(codestream[position + 2 : position + 4], "big")
    if position == len(_SOI):
        return codestream
    if codestream[position - len(_SOI) : position] != _SOI:
        raise ValueError("the SPIFF directory does not end with the codestream's SOI")
    return _SOI + codestream[position:]


def register() -> str:
    """Add the plugin to pydicom's JPEG-LS lossless encoder; the `encoding_plugin` to ask
    for: `LABEL`, or "" (pydicom's choice) where imagecodecs is missing."""
    if LABEL not in JPEGLSLosslessEncoder.available_plugins and is_available(JPEGLSLossless):
        JPEGLSLosslessEncoder.add_plugin(LABEL, (__name__, "encode_pixel_data"))
    return LABEL if LABEL in JPEGLSLosslessEncoder.available_plugins else ""
