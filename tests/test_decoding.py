"""`plugin.decoding.decode`: what the decode stage hands on, and in which form.

A compressed source kept for the heat-map travels to other processes (decode and output pools)
pickled; pydicom's decoded-pixel cache does not survive that, so the decode stage stores the
pixels it decoded natively. Without that the heat-map would decode each JPEG 2000 mammogram a
second time in the output process.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from plugin.decoding import decode
from plugin.outputs.sc import display_image
from trainer.synth import encode, synth_exam


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("decoding")
    ds = synth_exam(5, rows=512, cols=416).datasets[0]
    out = {}
    for name, syntax in (("j2k", JPEG2000Lossless), ("explicit", ExplicitVRLittleEndian)):
        path = folder / f"{name}.dcm"
        encode(ds, syntax).save_as(path, enforce_file_format=True)
        out[name] = path
    return out


def test_a_compressed_source_travels_with_its_pixels_decoded(files: dict[str, Path]) -> None:
    as_received = dcmread(files["j2k"])
    decoded = decode([("k", files["j2k"])], native_pixels=True)
    (kept,) = decoded.datasets.values()
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert kept.SOPInstanceUID == as_received.SOPInstanceUID
    assert kept.PhotometricInterpretation == as_received.PhotometricInterpretation
    assert kept.BitsStored == as_received.BitsStored
    arrived = pickle.loads(pickle.dumps(kept))  # what an output process gets
    assert np.array_equal(arrived.pixel_array, as_received.pixel_array)
    assert np.array_equal(display_image(arrived), display_image(as_received))


def test_sources_stay_as_received_unless_they_travel(files: dict[str, Path]) -> None:
    (kept,) = decode([("k", files["j2k"])]).datasets.values()
    assert kept.file_meta.TransferSyntaxUID == JPEG2000Lossless
    # Uncompressed sources are read without decoding wherever they go: left as received.
    (plain,) = decode([("k", files["explicit"])], native_pixels=True).datasets.values()
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert plain.PixelData == dcmread(files["explicit"]).PixelData
    # Without the heat-map, no pixels are kept at all.
    (header,) = decode(
        [("k", files["j2k"])], keep_pixels=False, native_pixels=True
    ).datasets.values()
    assert "PixelData" not in header
