"""Geometry maps points, boxes and maps exactly between the source and input grids."""

import numpy as np
import pytest
import torch

from models.geometry import Crop, Flip, Geometry, Pad, Resize


def apply_chain(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Apply the chain to an image the slow, obvious way (nearest-neighbour resize)."""
    out = image
    for step in geometry.steps:
        if isinstance(step, Flip):
            out = np.flip(out, axis=step.axis)
        elif isinstance(step, Crop):
            padded = np.zeros((step.height, step.width), out.dtype)
            r0, c0 = max(step.top, 0), max(step.left, 0)
            r1 = min(step.top + step.height, out.shape[0])
            c1 = min(step.left + step.width, out.shape[1])
            padded[r0 - step.top : r1 - step.top, c0 - step.left : c1 - step.left] = out[
                r0:r1, c0:c1
            ]
            out = padded
        elif isinstance(step, Pad):
            out = np.pad(out, ((step.top, step.bottom), (step.left, step.right)))
        elif isinstance(step, Resize):
            rows = ((np.arange(step.height) + 0.5) * out.shape[0] / step.height).astype(int)
            cols = ((np.arange(step.width) + 0.5) * out.shape[1] / step.width).astype(int)
            out = out[rows][:, cols]
    return out


CHAINS = [
    Geometry((100, 80)),
    Geometry((100, 80), (Flip(1),)),
    Geometry((100, 80), (Flip(0), Flip(1))),
    Geometry((100, 80), (Flip(1), Crop(10, 5, 60, 70), Pad(4, 6, 0, 30))),
    Geometry((100, 80), (Crop(-20, 0, 140, 80), Flip(1))),
    Geometry((100, 80), (Flip(1), Crop(10, 0, 60, 80), Pad(0, 4, 0, 16), Resize(128, 192))),
]


@pytest.mark.parametrize("geometry", CHAINS)
def test_input_shape_matches_applied_chain(geometry):
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    assert apply_chain(image, geometry).shape == geometry.input_shape


@pytest.mark.parametrize("geometry", CHAINS)
def test_points_round_trip(geometry):
    points = np.random.default_rng(0).uniform(0, 80, size=(50, 2))
    np.testing.assert_allclose(geometry.to_source(geometry.to_input(points)), points, atol=1e-9)


@pytest.mark.parametrize("geometry", CHAINS)
def test_pixel_centres_land_on_the_same_pixel(geometry):
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80) + 1
    applied = apply_chain(image, geometry)
    rows, cols = np.meshgrid(np.arange(100), np.arange(80), indexing="ij")
    centres = np.stack([rows + 0.5, cols + 0.5], axis=-1).reshape(-1, 2)
    mapped = geometry.to_input(centres)
    inside = geometry.visible(mapped)
    # With an integer upscale the centre maps into the pixel it became, for every chain here.
    idx = np.floor(mapped[inside]).astype(int)
    np.testing.assert_array_equal(applied[idx[:, 0], idx[:, 1]], image.reshape(-1)[inside])


@pytest.mark.parametrize("geometry", CHAINS)
def test_map_of_the_input_itself_comes_back_as_the_source(geometry):
    image = np.random.default_rng(1).uniform(size=(100, 80)).astype(np.float32)
    applied = apply_chain(image, geometry)
    back = geometry.map_to_source(applied)
    assert back.shape == image.shape
    if any(isinstance(s, Resize) for s in geometry.steps):
        return  # resampling twice blurs; covered by the coarse-map test
    visible = geometry.map_to_source(apply_chain(np.ones_like(image), geometry)) > 0.999
    assert visible.any()
    np.testing.assert_allclose(back[visible], image[visible], atol=1e-6)


def test_cropped_away_pixels_read_zero():
    g = Geometry((100, 80), (Crop(10, 0, 60, 80),))
    back = g.map_to_source(np.ones(g.input_shape, np.float32))
    assert back[:10].max() == 0 and back[70:].max() == 0 and back[10:70].min() == 1


def test_coarse_map_is_upsampled_bilinearly_on_pixel_centres():
    g = Geometry((64, 64), (Resize(128, 128),))
    coarse = np.zeros((2, 2), np.float32)
    coarse[0, 0] = 1.0
    back = g.map_to_source(coarse)
    assert back[0, 0] == pytest.approx(1.0)
    assert back[63, 63] == pytest.approx(0.0)
    assert 0 < back[32, 32] < 1


def test_boxes_follow_flips_and_crops():
    g = Geometry((100, 80), (Flip(1), Crop(10, 0, 60, 80), Pad(0, 4, 0, 16), Resize(128, 96)))
    assert g.box_to_source((0, 0, 64, 48)) == (10.0, 32.0, 42.0, 80.0)
    # A box reaching into the padding is clipped to what the input shows: source rows 70..74
    # lie under the bottom padding, but the crop removed them, so the box stops at row 70.
    assert g.box_to_source((100, 0, 128, 96)) == (60.0, 0.0, 70.0, 80.0)
    assert g.box_to_source((0, 0, 400, 96)) == (10.0, 0.0, 70.0, 80.0)
    assert g.box_to_source((100, 0, 128, 96), clip=False) == (60.0, -16.0, 74.0, 80.0)


def test_box_wholly_in_padding_after_a_crop_comes_back_empty():
    """The padding above a cropped image sits where cropped-away source rows were; a box there
    shows the model nothing of the source and must not turn into a box on those rows."""
    g = Geometry((100, 80), (Crop(30, 0, 40, 80), Pad(top=20, bottom=20)))
    top, left, bottom, right = g.box_to_source((2, 10, 18, 30))
    assert bottom <= top and (left, right) == (10.0, 30.0)
    assert g.box_to_source((10, 10, 30, 30)) == (30.0, 10.0, 40.0, 30.0)


def test_visible_excludes_padding_and_cropped_away_source():
    g = Geometry((100, 80), (Crop(10, 0, 60, 80), Pad(4, 6, 0, 0)))
    assert not g.visible([[2.0, 5.0]])[0]  # padding that sits where rows 6..9 would be
    assert g.visible([[4.5, 5.0]])[0]
    assert not g.visible([[64.5, 5.0]])[0]


def test_leading_map_axes_are_kept():
    g = Geometry((40, 30), (Flip(1), Resize(20, 15)))
    maps = np.random.default_rng(2).uniform(size=(2, 5, 4)).astype(np.float32)
    assert g.map_to_source(maps).shape == (2, 40, 30)


@pytest.mark.parametrize(
    "make", [lambda: Flip(2), lambda: Crop(0, 0, 0, 5), lambda: Pad(top=-1), lambda: Resize(0, 3)]
)
def test_impossible_steps_are_refused(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("geometry", CHAINS)
def test_area_average_onto_the_input_keeps_each_cells_share(geometry):
    """A mask area-averaged onto the input grid holds, per cell, the share of the cell's
    footprint that is mask: summing cell shares × cell areas gives back the visible mask."""
    rng = np.random.default_rng(1)
    mask = (rng.random((100, 80)) < 0.3).astype(np.float32)
    rows, cols = geometry.input_shape
    fine = geometry.area_to_input(mask, (rows, cols))
    np.testing.assert_allclose(fine, apply_chain(mask, geometry), atol=0.51)
    coarse = geometry.area_to_input(mask, (rows // 4, cols // 4))
    sizes = (rows / (rows // 4)) * (cols / (cols // 4))
    np.testing.assert_allclose(coarse.sum() * sizes, fine.sum(), rtol=1e-4)


def test_area_average_of_a_resize_is_the_block_mean():
    mask = np.random.default_rng(2).random((40, 32)).astype(np.float32)
    g = Geometry((40, 32), (Flip(1), Resize(10, 8)))
    expected = mask.reshape(10, 4, 8, 4).mean(axis=(1, 3))[:, ::-1]
    np.testing.assert_allclose(g.area_to_input(mask, (10, 8)), expected, atol=1e-6)
    np.testing.assert_allclose(g.area_to_input(mask, (5, 4)).mean(), mask.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="source grid"):
        g.area_to_input(mask[:-1], (10, 8))


def random_geometry(rng: np.random.Generator, source_shape=None) -> Geometry:
    """A source grid (random unless given) and a chain of the preprocessing's steps: flips,
    crops that may reach past the image (pads), pads and resizes, in random order and sizes."""
    rows, cols = source_shape or (int(n) for n in rng.integers(20, 160, size=2))
    geometry = Geometry((rows, cols))
    for _ in range(int(rng.integers(0, 5))):
        h, w = geometry.input_shape
        kind = rng.integers(4)
        if kind == 0:
            step = Flip(int(rng.integers(2)))
        elif kind == 1:
            top = int(rng.integers(-h // 4, h // 2 + 1))
            left = int(rng.integers(-w // 4, w // 2 + 1))
            step = Crop(top, left, int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1)))
        elif kind == 2:
            step = Pad(*(int(v) for v in rng.integers(0, 12, size=4)))
        else:
            step = Resize(int(rng.integers(8, 3 * h + 1)), int(rng.integers(8, 3 * w + 1)))
        geometry = geometry.then(step)
    return geometry


def reference_map_to_source(geometry: Geometry, m: np.ndarray) -> np.ndarray:
    """Bilinear resampling the obvious way: per source pixel centre, its position on the map
    (clamped to the outer cells' centres), the two cells around it and the weight of the
    second, 0 where the input does not show it; rows first, then columns, each a product
    with the whole (source, map) weight matrix."""
    weights = []
    for a in (0, 1):
        n_src, n_map, n_in = geometry.source_shape[a], m.shape[-2 + a], geometry.input_shape[a]
        centres = np.zeros((n_src, 2))
        centres[:, a] = np.arange(n_src) + 0.5
        x_in = geometry.to_input(centres)[:, a]
        other = 1 - a  # a point inside the input on the other axis, to ask visible()
        probe = np.zeros((n_src, 2))
        probe[:, a] = x_in
        probe[:, other] = sum(geometry._visible[other]) / 2
        inside = geometry.visible(probe)
        u = np.clip(x_in * (n_map / n_in) - 0.5, 0, n_map - 1)
        i0 = np.floor(u).astype(int)
        i1 = np.minimum(i0 + 1, n_map - 1)
        t = (u - i0).astype(np.float32)
        w = torch.zeros(n_src, n_map)
        rows = torch.arange(n_src)
        w.index_put_((rows, torch.from_numpy(i0)), torch.from_numpy((1 - t) * inside), True)
        w.index_put_((rows, torch.from_numpy(i1)), torch.from_numpy(t * inside), True)
        weights.append(w)
    x = torch.from_numpy(np.ascontiguousarray(m, np.float32))
    return ((weights[0] @ x) @ weights[1].T).numpy()


def test_map_to_source_and_its_strips_are_the_whole_products_floats():
    """`map_to_source`, and `MapResampler` a strip of rows at a time, give the bilinear
    values: the whole weight products' floats and float64 gathers', to fp32 rounding (the
    products over the band skip only exact zeros, but BLAS may order the two non-zero terms
    otherwise for another shape), on random chains and map sizes from a coarse grid to finer
    than the input."""
    rng = np.random.default_rng(7)
    for case in range(30):
        geometry = random_geometry(rng)
        h, w = geometry.input_shape
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        if case % 5 == 0:
            shape = (min(h, 300), min(w, 300))  # as fine as the input, or finer
        maps = rng.uniform(-0.5, 1.5, size=(2, *shape)).astype(np.float32)
        want = reference_map_to_source(geometry, maps)
        np.testing.assert_allclose(geometry.map_to_source(maps), want, rtol=0, atol=2.4e-7)
        resampler = geometry.resampler(shape, torch.device("cpu"))
        rows, cols = geometry.source_shape
        step = int(rng.integers(1, rows + 1))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            out = torch.empty(2, stop - start, cols)
            resampler.rows_into(torch.from_numpy(maps), start, stop, out)
            np.testing.assert_allclose(out.numpy(), want[:, start:stop], rtol=0, atol=2.4e-7)
        exact = _bilinear_f64(geometry, maps)
        np.testing.assert_allclose(want, exact, atol=1e-6)


def _bilinear_f64(geometry: Geometry, m: np.ndarray) -> np.ndarray:
    out = np.asarray(m, np.float64)
    for a in (0, 1):
        i0, i1, t, inside = geometry._sample_axis(a, out.shape[-2 + a])
        lo, hi = np.take(out, i0, axis=-2 + a), np.take(out, i1, axis=-2 + a)
        shape = [1] * out.ndim
        shape[-2 + a] = -1
        t64 = t.astype(np.float64).reshape(shape)
        out = np.where(inside.reshape(shape), lo * (1 - t64) + hi * t64, 0.0)
    return out
