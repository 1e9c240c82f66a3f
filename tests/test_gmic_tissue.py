"""GMIC's crop stage: the bit-packed erosion and run labelling (`models.gmic.tissue`) and
`find_tissue` give exactly what GMIC's own recipe gives, the slow way: r scipy cross erosions,
scipy's labelling, the largest component, r scipy cross dilations, its box and right-most
column. On the conformance images, the synthetic exam's windows, and awkward masks (holes,
several components, tissue at the edges, ties, tiny images, widths around 64-bit words,
r = 0, both mirrorings): ~1,200 erosions, ~600 labellings, 150 crop stages.
About 5-10 s on one core."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from PIL import Image

from models import MammogramError
from models.gmic import PRESETS, default_spec, extract_window
from models.gmic.preprocess import PreprocessSpec, TissueBox, _city_block_distance, find_tissue
from models.gmic.tissue import BitMask, largest_component
from models.reading import read_mammogram

GMIC_PREPROCESS = importlib.import_module("models.gmic.preprocess")  # not the function
PUBLISHED = PreprocessSpec.from_dict(default_spec(PRESETS["published"]))


def gmic_crop_stage(pixels: np.ndarray, spec: PreprocessSpec, flipped: bool) -> TissueBox:
    """The crop stage as GMIC describes it (reference/gmic/ARCHITECTURE.md §9, step 3), pass
    by pass over the whole image; the first label wins a tie of sizes (numpy's argmax)."""
    r = spec.crop_iterations
    mask = pixels > 0
    if r:
        mask = ndi.binary_erosion(mask, iterations=r)
    labels, count = ndi.label(mask)
    if count == 0:
        raise MammogramError("no breast tissue found")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    tissue = labels == int(sizes.argmax())
    if r:
        tissue = ndi.binary_dilation(tissue, iterations=r)

    rows = np.flatnonzero(tissue.any(axis=1))
    cols = np.flatnonzero(tissue.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    bottommost = bottom - 1
    height, width = pixels.shape
    top -= min(top, spec.crop_buffer)
    bottom += min(height - bottom, spec.crop_buffer)
    right += min(width - right, spec.crop_buffer)

    boxed = tissue[top:bottom, left:right]
    lower = boxed[int(boxed.shape[0] * spec.rightmost_search_from) :]
    lower_cols = np.flatnonzero(lower.any(axis=0))
    if lower_cols.size == 0:  # a box so short that its tissue is all in the top part
        lower_cols = cols - left
    rightmost = int(lower_cols[-1]) + int(flipped)
    return TissueBox(top, bottom, left, right, rightmost, bottommost - top)


def assert_same_crop_stage(pixels: np.ndarray, spec: PreprocessSpec) -> None:
    for flipped in (False, True):
        try:
            expected = gmic_crop_stage(pixels, spec, flipped)
        except MammogramError:
            with pytest.raises(MammogramError, match="no breast tissue found"):
                find_tissue(torch.from_numpy(pixels), spec, flipped)
            return
        assert find_tissue(torch.from_numpy(pixels), spec, flipped) == expected


# -- awkward masks ---------------------------------------------------------------------------


def random_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Blobs, some touching the edges, with holes, speckle and thin lines."""
    y, x = np.mgrid[:rows, :cols]
    mask = np.zeros((rows, cols), bool)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(-0.2, 1.2) * rows, rng.uniform(-0.2, 1.2) * cols
        ry, rx = rng.uniform(0.05, 0.8) * rows + 1, rng.uniform(0.05, 0.8) * cols + 1
        blob = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        mask = mask & ~blob if rng.random() < 0.2 else mask | blob  # some blobs cut holes
    if rng.random() < 0.5:
        mask &= rng.random((rows, cols)) > rng.choice([0.001, 0.01, 0.1])
    if rng.random() < 0.5:
        mask |= rng.random((rows, cols)) < 0.01
    if rng.random() < 0.3:
        mask[int(rng.integers(rows)), :] = True
    return mask


SHAPES = [(1, 1), (1, 70), (70, 1), (2, 63), (3, 64), (5, 65), (40, 127), (33, 128), (64, 129)]


@pytest.mark.parametrize("seed", range(4))
def test_erosion_is_scipys_iterated_erosion(seed: int) -> None:
    """Also the accelerator's distance transform: both paths give the labelling one mask."""
    rng = np.random.default_rng(seed)
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 150, 2)) for _ in range(30)]
    for rows, cols in shapes:
        mask = random_mask(rng, rows, cols)
        for r in (0, 1, 2, 3, 4, 7, 16, int(rng.integers(5, 40))):
            expected = ndi.binary_erosion(mask, iterations=r) if r else mask
            eroded = BitMask.pack(mask).erode_diamond(r)
            np.testing.assert_array_equal(eroded.unpack(), expected, err_msg=f"{rows}x{cols} {r}")
            if r:
                distance = _city_block_distance(torch.from_numpy(mask)).numpy()
                np.testing.assert_array_equal(BitMask.pack(distance > r).words, eroded.words)


def test_bits_beyond_the_last_column_stay_clear() -> None:
    mask = BitMask.pack(np.ones((3, 70), bool))
    for dy, dx in ((0, -1), (0, -65), (1, -3), (0, 1), (-1, 64)):
        words = mask.shifted(dy, dx)
        assert not (words[:, -1] >> np.uint64(6)).any()


def assert_largest_component_is_scipys(mask: np.ndarray) -> None:
    labels, count = ndi.label(mask)
    component, got_count = largest_component(BitMask.pack(mask))
    assert got_count == count
    if count == 0:
        assert component is None
        return
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    tissue = labels == int(sizes.argmax())
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    box = (component.top, component.bottom, component.left, component.right)
    assert box == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    row_right = [np.flatnonzero(row)[-1] for row in tissue[rows[0] : rows[-1] + 1]]
    np.testing.assert_array_equal(component.row_right, row_right)


@pytest.mark.parametrize("seed", range(4))
def test_largest_component_is_scipys_label(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 150, 2)) for _ in range(40)]
    for rows, cols in shapes:
        mask = random_mask(rng, rows, cols)
        assert_largest_component_is_scipys(mask)
        assert_largest_component_is_scipys(ndi.binary_erosion(mask, iterations=3))
        assert_largest_component_is_scipys(rng.random((rows, cols)) < 0.5)  # many small ones


def test_ties_go_to_the_component_met_first_in_raster_order() -> None:
    mask = np.zeros((20, 40), bool)
    mask[5:10, 2:7] = True  # 25 pixels, starting at row 5
    mask[3:8, 30:35] = True  # 25 pixels, starting at row 3: first in raster order
    assert_largest_component_is_scipys(mask)
    assert largest_component(BitMask.pack(mask))[0].left == 30
    # A U of 136 pixels whose two arms join only at its bottom, against a bar of 136 met
    # after the U's first row (and a smaller line before both).
    u = np.zeros((12, 200), bool)
    u[1:10, 100:102] = u[1:10, 150:152] = u[9:11, 100:152] = True
    u[2:4, 0:68] = True
    u[0, 10:80] = True
    assert_largest_component_is_scipys(u)
    assert largest_component(BitMask.pack(u))[0].left == 100


# -- the crop stage --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_find_tissue_is_gmics_crop_stage_on_awkward_masks(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    for _ in range(25):
        rows, cols = (int(v) for v in rng.integers(1, 160, 2))
        pixels = random_mask(rng, rows, cols) * rng.uniform(1, 4096, (rows, cols))
        spec = PreprocessSpec(
            crop_iterations=int(rng.choice([0, 1, 2, 5, int(rng.integers(3, 30))])),
            crop_buffer=int(rng.integers(0, 20)),
            rightmost_search_from=float(rng.choice([0.0, 1 / 3, rng.uniform(0, 1)])),
        )
        assert_same_crop_stage(pixels.astype(np.float32), spec)


def test_a_breast_thinner_than_the_erosion_is_refused() -> None:
    pixels = np.zeros((300, 200), np.float32)
    pixels[:, :20] = 1000.0  # 20 columns survive no more than 9 erosions
    spec = PreprocessSpec(crop_iterations=10)
    with pytest.raises(MammogramError, match="wider than 20 pixels"):
        find_tissue(torch.from_numpy(pixels), spec, False)
    assert_same_crop_stage(pixels, spec)
    assert_same_crop_stage(pixels, PreprocessSpec(crop_iterations=9))


def test_negative_values_are_background() -> None:
    pixels = np.full((80, 90), -5.0, np.float32)
    pixels[10:70, :40] = 7.0
    assert_same_crop_stage(pixels, PreprocessSpec(crop_iterations=4, crop_buffer=3))


def test_find_tissue_is_gmics_crop_stage_on_the_conformance_images(shared_reference: Path) -> None:
    cases = shared_reference / "gmic" / "cases"
    window = np.array(Image.open(cases / "0_L-CC" / "window_uint16.png")).astype(np.float32)
    legacy = np.array(Image.open(cases / "legacy_0_R-CC" / "window_uint16.png"))
    for pixels in (window[460:2483, 0:801], legacy.astype(np.float32)):
        assert_same_crop_stage(pixels, PUBLISHED)


def test_synthetic_exam_windows_are_gmics(synth_exam_small, monkeypatch) -> None:
    """The whole window and geometry, with the crop stage swapped for GMIC's recipe."""
    spec = dict(default_spec(PRESETS["demo"]), crop_iterations=30)
    images = [read_mammogram(image.dataset) for image in synth_exam_small.images]
    fast = [extract_window(image, spec) for image in images]
    monkeypatch.setattr(
        GMIC_PREPROCESS,
        "find_tissue",
        lambda p, s, flipped: gmic_crop_stage(np.asarray(p), s, flipped),
    )
    for image, (window, geometry) in zip(images, fast, strict=True):
        expected_window, expected_geometry = extract_window(image, spec)
        assert geometry == expected_geometry
        np.testing.assert_array_equal(window, expected_window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_picks_the_cpus_box() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        pixels = random_mask(rng, 300, 250).astype(np.float32)
        spec = PreprocessSpec(crop_iterations=int(rng.integers(1, 20)), crop_buffer=5)
        try:
            expected = find_tissue(torch.from_numpy(pixels), spec, False)
        except MammogramError:
            continue
        assert find_tissue(torch.from_numpy(pixels).cuda(), spec, False) == expected
