"""The SEG's JPEG-LS encoder plugin (imagecodecs' CharLS, which releases the GIL) writes the
codestream pydicom's own plugin (pyjpegls) writes, SPIFF header dropped, and decodes back."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.pixels.encoders import JPEGLSLosslessEncoder
from pydicom.uid import JPEGLSLossless

from plugin.outputs import jpegls
from tests.support.gil import steps_during


def _frames() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[:700, :500]
    smooth = np.clip(255 * np.exp(-((rows - 350) ** 2 + (cols - 250) ** 2) / 2e4), 0, 255)
    saliency = smooth.astype(np.uint8)
    saliency[:, :120] = 0
    return {
        "saliency map": saliency,
        "noise": rng.integers(0, 256, (300, 257), dtype=np.uint8),
        "all zero": np.zeros((64, 48), np.uint8),
        "all 255": np.full((64, 48), 255, np.uint8),
        "one row": rng.integers(0, 4, (1, 999), dtype=np.uint8),
    }


FRAMES = _frames()


def _encode(frame: np.ndarray, plugin: str, bits_stored: int = 8) -> bytes:
    return JPEGLSLosslessEncoder.encode(
        frame,
        encoding_plugin=plugin,
        rows=frame.shape[0],
        columns=frame.shape[1],
        samples_per_pixel=1,
        bits_allocated=frame.itemsize * 8,
        bits_stored=bits_stored,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )


@pytest.mark.parametrize("name", FRAMES)
def test_codestream_is_the_one_pyjpegls_writes(name):
    assert jpegls.register() == jpegls.LABEL
    frame = FRAMES[name]
    ours = _encode(frame, jpegls.LABEL)
    assert ours == _encode(frame, "pyjpegls")
    assert not ours.startswith(b"\xff\xd8\xff\xe8")  # no SPIFF header
    assert np.array_equal(imagecodecs.jpegls_decode(ours), frame)


def test_a_compressed_dataset_reads_back_with_pydicom():
    frames = np.stack([FRAMES["saliency map"], 255 - FRAMES["saliency map"]])
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.NumberOfFrames = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.compress(JPEGLSLossless, frames, encoding_plugin=jpegls.register())
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(ds.pixel_array, frames)


def test_other_bit_depths_are_refused_with_the_way_out():
    frame = (FRAMES["noise"].astype(np.uint16) << 4).astype(np.uint16)
    with pytest.raises(RuntimeError, match="8-bit single-sample frames only.*pyjpegls"):
        _encode(frame, jpegls.register(), bits_stored=12)


def test_without_spiff_leaves_a_plain_codestream_and_refuses_what_is_not_one():
    plain = _encode(FRAMES["noise"], "pyjpegls")
    assert jpegls.without_spiff(plain) == plain
    with pytest.raises(ValueError, match="SOI"):
        jpegls.without_spiff(b"\x00\x01" + plain)


def test_other_threads_run_while_a_frame_encodes(monkeypatch):
    """What the plugin is for: CharLS runs without the GIL (`steps_during`): about a million
    steps in a 2048x2048 frame's encode."""
    frame = np.random.default_rng(1).integers(0, 256, (2048, 2048), dtype=np.uint8)

    def encode_three() -> None:
        for _ in range(3):
            _encode(frame, jpegls.register())

    during = steps_during(monkeypatch, imagecodecs, "jpegls_encode", encode_three)
    assert during and min(during) > 50_000
