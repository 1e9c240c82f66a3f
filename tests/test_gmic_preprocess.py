"""GMIC preprocessing: the reference window and input, orientation, padding and window rules,
and the geometry that maps results back onto the source image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import Crop, Flip, Laterality, Mammogram, MammogramError, Pad, Resize, View
from models.gmic import PRESETS, default_spec, extract_window, preprocess
from models.gmic.preprocess import PreprocessSpec, place_window, window_centre

PUBLISHED = default_spec(PRESETS["published"])


def mammogram(
    pixels: np.ndarray,
    laterality: str = "L",
    view: str = "CC",
    orientation: tuple[str, str] | None = None,
) -> Mammogram:
    return Mammogram(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        laterality=Laterality(laterality),
        view=View(view),
        bits_stored=12,
        sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        patient_orientation=orientation,
    )


@pytest.fixture(scope="module")
def reference(shared_reference: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window, model input, source) of case 0_L-CC; the source is window[460:2483, 0:801]."""
    case = shared_reference / "gmic" / "cases" / "0_L-CC"
    window = np.array(Image.open(case / "window_uint16.png"))
    assert window.dtype == np.uint16 and window.shape == (2944, 1920)
    source = window[460:2483, 0:801].astype(np.float32)
    return window, np.load(case / "input_compressed.npz")["input"], source


def test_reference_window_and_input(reference) -> None:
    window, expected_input, source = reference
    got_window, geometry = extract_window(mammogram(source), PUBLISHED)
    np.testing.assert_array_equal(got_window, window.astype(np.float32))
    assert geometry.steps == (Pad(top=460, bottom=461, left=0, right=1119),)
    prepared = preprocess(mammogram(source), PUBLISHED)
    assert prepared.tensor.shape == (1, 2944, 1920) and prepared.tensor.dtype.is_floating_point
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected_input, rtol=0, atol=1e-5)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_geometry_maps_boxes_and_maps_back_to_source(reference, laterality: str) -> None:
    window, _, source = reference
    if laterality == "R":  # an R view as displayed: chest wall on the right
        source = source[:, ::-1]
    image = mammogram(source, laterality)
    got_window, geometry = extract_window(image, PUBLISHED)
    np.testing.assert_array_equal(got_window, window.astype(np.float32))
    assert (Flip(axis=1) in geometry.steps) == (laterality == "R")

    # The first reference ROI: input rows 1472:1728, cols 320:576.
    top, left, bottom, right = geometry.box_to_source((1472, 320, 1728, 576))
    rows, cols = slice(int(top), int(bottom)), slice(int(left), int(right))
    patch = source[rows, cols][:, ::-1] if laterality == "R" else source[rows, cols]
    assert (bottom - top, right - left) == (256, 256)
    np.testing.assert_array_equal(patch, window[1472:1728, 320:576])
    expected_left = 801 - 576 if laterality == "R" else 320
    assert (top, left) == (1012, expected_left)

    # A map of the whole input comes back as the source itself ...
    np.testing.assert_array_equal(geometry.map_to_source(got_window), source)
    # ... and one saliency cell (map 46x30, cell (23, 5)) lands on its 64x64 source block.
    cell = np.zeros((46, 30), np.float32)
    cell[23, 5] = 1.0
    on_source = geometry.map_to_source(cell)
    assert on_source.shape == source.shape
    peak = np.argwhere(on_source == on_source.max())
    block_cols = (801 - 384, 801 - 320) if laterality == "R" else (320, 384)
    assert peak[:, 0].min() >= 1012 and peak[:, 0].max() < 1076
    assert peak[:, 1].min() >= block_cols[0] and peak[:, 1].max() < block_cols[1]


def test_orientation_decision() -> None:
    breast = np.zeros((200, 120), np.float32)
    breast[20:180, :70] = 1000.0  # chest wall at column 0
    window = PreprocessSpec(window=(256, 128), crop_iterations=2, crop_buffer=5)

    def flipped(image: Mammogram, spec: PreprocessSpec = window) -> bool:
        return Flip(axis=1) in extract_window(image, spec)[1].steps

    assert not flipped(mammogram(breast, "L"))
    assert flipped(mammogram(breast[:, ::-1], "R"))
    # The chest-wall side decides, not the laterality alone.
    assert not flipped(mammogram(breast, "R"))
    assert flipped(mammogram(breast[:, ::-1], "L"))
    # PatientOrientation wins when present: "P…" means columns run towards the chest wall.
    assert flipped(mammogram(breast, "L", orientation=("P", "L")))
    assert not flipped(mammogram(breast[:, ::-1], "R", orientation=("A", "FR")))
    # GMIC's own rule: mirror every R view.
    gmic_rule = PreprocessSpec(
        window=(256, 128), crop_iterations=2, crop_buffer=5, orientation="laterality"
    )
    assert flipped(mammogram(breast, "R"), gmic_rule)
    assert not flipped(mammogram(breast[:, ::-1], "L"), gmic_rule)


def test_crop_stage_drops_thin_lines_and_keeps_buffers() -> None:
    image = np.zeros((300, 200), np.float32)
    image[100:220, 0:90] = 500.0  # the breast
    image[150, 90:] = 300.0  # a thin line from the breast to the edge, removed by erosion
    spec = PreprocessSpec(window=(320, 256), crop_iterations=4, crop_buffer=5)
    window, geometry = extract_window(mammogram(image), spec)
    # Tissue rows 100:220 and columns 0:91 (where the line met the breast, one pixel survives
    # the erosion), plus 5 pixels above, below and on the nipple side.
    assert geometry.steps[0] == Crop(top=95, left=0, height=130, width=96)
    # CC: short image padded evenly above and below, narrow image padded on the right.
    assert geometry.steps[1] == Pad(top=95, bottom=95, left=0, right=160)
    np.testing.assert_array_equal(window[95 + 5 : 95 + 125, :90], 500.0)
    assert window.sum() == 500.0 * 120 * 90 + 300.0 * 6  # the line inside the crop


def test_mlo_pads_below_only() -> None:
    image = np.zeros((300, 200), np.float32)
    image[0:250, 0:90] = 500.0
    spec = PreprocessSpec(window=(320, 256), crop_iterations=4, crop_buffer=5)
    _, geometry = extract_window(mammogram(image, view="MLO"), spec)
    assert Pad(top=0, bottom=320 - 255, left=0, right=256 - 95) in geometry.steps


def test_cc_window_covers_most_tissue_then_nearest_centre() -> None:
    rows = np.zeros((400, 50), np.float32)
    rows[300:380, 0:40] = 1.0  # tissue low in a tall image
    # Window 100 rows: every centre from 330 to 350 covers all 80 tissue rows; the image
    # centre is 200, so the nearest of those, 330, wins.
    assert window_centre(rows, View.CC, rightmost_x=39, bottommost_y=379, window=(100, 20)) == (
        330,
        39 - 10 - 1,
    )
    # MLO: anchored at the bottom-most tissue row and the right-most column.
    assert window_centre(rows, View.MLO, 39, 379, (100, 20)) == (379 - 50 - 1, 28)
    # A window that sticks out is moved back inside the (padded) image.
    pad, top, left = place_window((400, 50), View.CC, (380, 5), (100, 20))
    assert (pad, top, left) == (Pad(), 300, 0)


def test_demo_spec_resizes_before_the_window(reference) -> None:
    _, _, source = reference
    spec = default_spec(PRESETS["demo"])
    assert spec["window"] == [768, 512] and spec["scale"] == pytest.approx(768 / 2944)
    prepared = preprocess(mammogram(source), spec)
    assert prepared.tensor.shape == (1, 768, 512)
    assert prepared.geometry.input_shape == (768, 512)
    resize = next(s for s in prepared.geometry.steps if isinstance(s, Resize))
    assert (resize.height, resize.width) == (round(2023 * 768 / 2944), round(801 * 768 / 2944))
    x = prepared.tensor[0].numpy()
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-4)
    # The resized image's corners land on the source's corners.
    pad = next(s for s in prepared.geometry.steps if isinstance(s, Pad))
    corners = [[pad.top, 0.0], [pad.top + resize.height, resize.width]]
    np.testing.assert_allclose(
        prepared.geometry.to_source(corners), [[0, 0], [2023, 801]], atol=1e-9
    )


@pytest.mark.parametrize(("rows", "cols", "resized"), [(600, 400, False), (3000, 1000, True)])
def test_fit_scale_resizes_only_what_does_not_fit(rows: int, cols: int, resized: bool) -> None:
    pixels = np.zeros((rows, cols), np.float32)
    pixels[rows // 10 : rows - rows // 10, : cols * 2 // 3] = 1000.0
    spec = dict(default_spec(PRESETS["demo"]), scale="fit", crop_iterations=5, crop_buffer=5)
    prepared = preprocess(mammogram(pixels), spec)
    assert prepared.tensor.shape == (1, 768, 512)
    steps = [s for s in prepared.geometry.steps if isinstance(s, Resize)]
    assert bool(steps) == resized
    if resized:
        assert steps[0].height <= 768 and steps[0].width <= 512
    # Every tissue pixel is inside the window: the fit kept the whole breast.
    tissue = np.argwhere(pixels > 0) + 0.5
    assert prepared.geometry.visible(prepared.geometry.to_input(tissue)).all()
    with pytest.raises(ValueError, match="'fit'"):
        PreprocessSpec.from_dict(dict(spec, scale="auto"))


def test_blank_image_is_refused() -> None:
    with pytest.raises(MammogramError, match="no breast tissue"):
        extract_window(mammogram(np.zeros((300, 200))), PUBLISHED)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clahe": True}, "GMIC preprocessing: unknown fields ['clahe']; known: ["),
        ({"orientation": "left"}, "orientation: must be 'auto' or 'laterality', got 'left'"),
        ({"scale": True}, "scale: must be in (0, 1] or 'fit', got True"),
        ({"crop_buffer": 5.5}, "crop_buffer: must be an integer, got 5.5"),
        ({"window": [0, 512]}, "window: must be (rows, cols), each at least 1, got [0, 512]"),
    ],
)
def test_bad_spec_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        PreprocessSpec.from_dict(dict(PUBLISHED, **change))
    assert message in str(err.value)


def test_prepared_window_is_a_fixed_point(shared_reference: Path) -> None:
    """legacy_0_R-CC is GMIC's own 2944x1920 window of an R-CC view, already mirrored: run
    again (as an R view facing right), it comes back pixel for pixel, without a flip."""
    case = shared_reference / "gmic" / "cases" / "legacy_0_R-CC"
    window = np.array(Image.open(case / "window_uint16.png")).astype(np.float32)
    prepared = preprocess(mammogram(window, "R"), PUBLISHED)
    assert Flip(axis=1) not in prepared.geometry.steps
    expected = np.load(case / "input_compressed.npz")["input"]
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected, rtol=0, atol=1e-5)
