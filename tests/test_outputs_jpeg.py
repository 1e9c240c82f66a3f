"""The SC's JPEG baseline encoder (imagecodecs' libjpeg-turbo, which releases the GIL) writes
the file highdicom writes with its own encoder (Pillow), and lets other threads run."""

from __future__ import annotations

import io

import highdicom as hd
import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from plugin.outputs import jpeg
from tests.support.gil import steps_during


def _rgb(rows: int = 333, cols: int = 256) -> np.ndarray:
    """A heat-map-like frame: grey ramps with a smooth coloured spot and some noise."""
    rng = np.random.default_rng(3)
    r, c = np.mgrid[:rows, :cols]
    grey = (r * 255 // max(rows - 1, 1)).astype(np.uint8)
    spot = np.exp(-((r - rows / 2) ** 2 + (c - cols / 3) ** 2) / (rows * 4))[..., None]
    colour = np.array([253, 231, 37]) * spot + grey[..., None] * (1 - spot)
    return np.clip(colour + rng.normal(0, 3, colour.shape), 0, 255).astype(np.uint8)


def _sc(rgb: np.ndarray, syntax: str, photometric: str) -> hd.sc.SCImage:
    return hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        series_number=1,
        sop_instance_uid="1.2.3.4.5",
        instance_number=1,
        manufacturer="test",
        patient_orientation=("A", "R"),
        transfer_syntax_uid=syntax,
    )


def _same_clock(ours: pydicom.Dataset, theirs: pydicom.Dataset) -> None:
    """The creation times of `theirs` in `ours`: the two were built a moment apart."""
    for keyword in ("InstanceCreationTime", "ContentTime", "TimeOfSecondaryCapture"):
        setattr(ours, keyword, getattr(theirs, keyword))
    for mine, other in zip(
        ours.ContributingEquipmentSequence, theirs.ContributingEquipmentSequence, strict=True
    ):
        mine.ContributionDateTime = other.ContributionDateTime


def _file(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("placeholder", [False, True], ids=["built on the frame", "placeholder"])
@pytest.mark.parametrize("shape", [(333, 256), (17, 3001), (1, 1)])
def test_the_file_is_the_one_highdicom_writes_with_pillow(shape, placeholder):
    """Whether highdicom built the data set on the frame itself or on `jpeg.PLACEHOLDER`
    (what the heat-map does: `store` gives it the frame's grid)."""
    rgb = _rgb(*shape)
    theirs = _sc(rgb, JPEGBaseline8Bit, "YBR_FULL_422")
    ours = _sc(jpeg.PLACEHOLDER if placeholder else rgb, ExplicitVRLittleEndian, "RGB")
    jpeg.store(ours, rgb)
    _same_clock(ours, theirs)
    assert _file(ours) == _file(theirs)
    decoded = pydicom.dcmread(io.BytesIO(_file(ours))).pixel_array
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb).mean() < 3


def test_an_rgbx_images_rgb_view_is_encoded_as_its_rgb_copy(monkeypatch):
    """The heat-map hands over the RGB view of an RGBX image (`heatmap.overlay`): the
    encoder reads the RGBX image without a copy and writes the RGB copy's codestream; a view
    of other channels (no RGBX image under it) is encoded from its own pixels."""
    rgb = _rgb()
    rgbx = np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)])
    view = rgbx[..., :3]
    assert jpeg.encode(view) == jpeg.encode(rgb)
    other = rgbx[..., 1:]
    assert jpeg.encode(other) == jpeg.encode(np.ascontiguousarray(other))
    from_rgbx = []
    real = imagecodecs.jpeg8_encode
    monkeypatch.setattr(
        imagecodecs,
        "jpeg8_encode",
        lambda a, **kw: from_rgbx.append(a.shape[2] == 4) or real(a, **kw),
    )
    jpeg.encode(view), jpeg.encode(other), jpeg.encode(rgb)
    assert from_rgbx == [True, False, False]


def test_without_imagecodecs_highdicoms_encoder_gives_the_same_bytes(monkeypatch):
    rgb = _rgb()
    view = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])[..., :3]
    ours = jpeg.encode(rgb)
    monkeypatch.setattr(jpeg, "HAVE_IMAGECODECS", False)
    assert jpeg.encode(rgb) == jpeg.encode(view) == ours


def test_refuses_what_it_cannot_store():
    rgb = _rgb()
    with pytest.raises(ValueError, match="uint8 RGB"):
        jpeg.encode(rgb[..., 0])
    compressed = _sc(rgb, JPEGBaseline8Bit, "YBR_FULL_422")
    with pytest.raises(ValueError, match="uncompressed, in RGB"):
        jpeg.store(compressed, rgb)
    with pytest.raises(ValueError, match="not the data set's"):
        jpeg.store(_sc(rgb, ExplicitVRLittleEndian, "RGB"), rgb[..., :2])


def test_other_threads_run_while_a_frame_encodes(monkeypatch):
    """What the module is for: libjpeg-turbo runs without the GIL (`steps_during`)."""
    rgb = np.random.default_rng(1).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)

    def encode_three() -> None:
        for _ in range(3):
            jpeg.encode(rgb)

    during = steps_during(monkeypatch, imagecodecs, "jpeg8_encode", encode_three)
    assert len(during) == 3 and min(during) > 50_000
