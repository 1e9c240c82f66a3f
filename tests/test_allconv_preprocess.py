"""All-conv preprocessing: the published scaling bit for bit, resizing, bit depths, specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.allconv import DDSM_MEAN, INBREAST_MEAN, PRESETS, default_spec, preprocess
from models.geometry import Resize
from models.mammogram import Laterality, Mammogram, View

CASE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "reference"
    / "allconv"
    / "cases"
    / "resnet50_zeropad_seed1"
)
SMALL = {
    "target_size": [64, 48],
    "featurewise_mean": DDSM_MEAN,
    "rescale": 0.003891,
    "scale_to_16bit": True,
}


def _image(pixels: np.ndarray, bits: int = 16) -> Mammogram:
    return Mammogram(
        pixels=pixels.astype(np.float32),
        laterality=Laterality.RIGHT,
        view=View.MLO,
        bits_stored=bits,
        sop_instance_uid="1.2.3",
        series_instance_uid="1.2",
        study_instance_uid="1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
    )


def test_reproduces_the_reference_input_bit_for_bit() -> None:
    if not (CASE / "input.npz").is_file():
        pytest.skip(f"all-conv reference input not found at {CASE}; it lives in ../shared")
    data = np.load(CASE / "input.npz")
    prepared = preprocess(_image(data["raw_uint16"]), default_spec(PRESETS["resnet50"]))
    assert prepared.tensor.shape == (3, 1152, 896)
    for channel in prepared.tensor.numpy():
        assert np.array_equal(channel, data["preprocessed_f32"])
    assert prepared.geometry.steps == (Resize(1152, 896),)


def test_scaling_is_16bit_to_0_255_minus_the_mean() -> None:
    pixels = np.random.default_rng(0).integers(0, 65536, (64, 48)).astype(np.float32)
    pixels[0, 0], pixels[0, 1] = 0, 65535
    out = preprocess(_image(pixels), SMALL).tensor
    assert out.shape == (3, 64, 48)
    np.testing.assert_allclose(out[1].numpy(), pixels * 0.003891 - DDSM_MEAN, atol=1e-4)
    assert float(out[2, 0, 0]) == pytest.approx(-DDSM_MEAN)
    assert float(out[2, 0, 1]) == pytest.approx(255.0 - DDSM_MEAN, abs=0.01)


@pytest.mark.parametrize("bits", [12, 14])
def test_fewer_bits_are_stretched_to_the_16bit_range(bits: int) -> None:
    top = 2**bits - 1
    pixels = np.full((64, 48), top, dtype=np.float32)
    pixels[:32] = 0
    out = preprocess(_image(pixels, bits), SMALL).tensor[0].numpy()
    assert out[40, 10] == pytest.approx(65535 * 0.003891 - DDSM_MEAN, abs=1e-4)
    assert out[10, 10] == pytest.approx(-DDSM_MEAN)
    raw = preprocess(_image(pixels, bits), SMALL | {"scale_to_16bit": False}).tensor[0].numpy()
    assert raw[40, 10] == pytest.approx(top * 0.003891 - DDSM_MEAN, abs=1e-4)


def test_resize_is_bicubic_on_pixel_centres_with_a_geometry_back() -> None:
    """A horizontal ramp stays a ramp (cubic convolution is exact on linear functions), sampled
    at the half-pixel-mapped centres; the Geometry maps the input grid back to the source."""
    cols = np.arange(96, dtype=np.float32) * 100.0
    pixels = np.tile(cols, (128, 1))
    prepared = preprocess(_image(pixels), SMALL | {"featurewise_mean": 0.0, "rescale": 1.0})
    row = prepared.tensor[0, 30].numpy()
    centres = (np.arange(48) + 0.5) * 2 - 0.5
    np.testing.assert_allclose(row[2:-2], np.rint(centres[2:-2] * 100.0), atol=0.5)
    assert prepared.geometry.input_shape == (64, 48)
    np.testing.assert_allclose(prepared.geometry.to_source([[64, 48]]), [[128, 96]])


def test_resize_saturates_like_a_16bit_image() -> None:
    pixels = np.zeros((128, 96), dtype=np.float32)
    pixels[:, 48:] = 65535  # bicubic overshoots at the edge
    out = preprocess(_image(pixels), SMALL | {"featurewise_mean": 0.0, "rescale": 1.0}).tensor
    assert float(out.max()) == 65535.0 and float(out.min()) == 0.0


def test_default_spec_follows_the_architecture() -> None:
    assert default_spec(PRESETS["resnet50"])["target_size"] == [1152, 896]
    assert default_spec(PRESETS["demo"])["target_size"] == PRESETS["demo"]["input_shape"]
    assert default_spec(PRESETS["vgg16"])["featurewise_mean"] == DDSM_MEAN
    assert INBREAST_MEAN == 44.33


def test_bad_inputs_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match=r"all-conv preprocessing: unknown fields \['mean'\]"):
        preprocess(_image(np.zeros((8, 8))), SMALL | {"mean": 1.0})
    with pytest.raises(ValueError, match="scale_to_16bit: must be true or false, got 'false'"):
        preprocess(_image(np.zeros((8, 8))), SMALL | {"scale_to_16bit": "false"})
    with pytest.raises(ValueError, match="bits_stored 20"):
        preprocess(_image(np.zeros((8, 8)), bits=20), SMALL)


def _float64_stretch(pixels: np.ndarray, bits: int) -> np.ndarray:
    """The stretch as upstream's 16-bit PNG holds it, in float64 (the reference)."""
    stretched = np.rint(pixels.astype(np.float64) * (65535.0 / (2**bits - 1)))
    return np.clip(stretched, 0.0, 65535.0).astype(np.float32)


def _stretched(pixels: np.ndarray, bits: int) -> np.ndarray:
    """The model input before rescaling, at the source size (no resize)."""
    spec = SMALL | {"target_size": list(pixels.shape), "rescale": 1.0, "featurewise_mean": 0.0}
    return preprocess(_image(pixels, bits), spec).tensor[0].numpy()


@pytest.mark.parametrize("bits", range(1, 16))
def test_stretch_of_every_stored_value_is_the_float64_one(bits: int) -> None:
    """Each value 0 .. 2^bits − 1, three times over, across several of the stretch's blocks."""
    values = np.tile(np.arange(2**bits, dtype=np.float32), max(3, 200_000 // 2**bits))
    pixels = np.zeros((-(-values.size // 512), 512), np.float32)
    pixels.flat[: values.size] = values
    np.testing.assert_array_equal(_stretched(pixels, bits), _float64_stretch(pixels, bits))


@pytest.mark.parametrize(
    "odd", [0.5, 4095.25, -1.0, 4096.0, 1e9, np.nan], ids=lambda v: f"pixel {v}"
)
def test_stretch_of_other_values_is_the_float64_one(odd: float) -> None:
    """Values that are not stored values of the bit depth, in the image's last block."""
    pixels = np.random.default_rng(3).integers(0, 4096, (300, 260)).astype(np.float32)
    pixels[-1, -1] = odd
    np.testing.assert_array_equal(_stretched(pixels, 12), _float64_stretch(pixels, 12))
