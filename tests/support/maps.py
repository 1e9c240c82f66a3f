"""The ensemble's maps, uint8 levels round(p × 255): built from float maps as the ensemble
builds them, and compared with float maps or with another run's levels. Floats that agree
within `atol` round to the same level except where a rounding boundary (k + 0.5) / 255 lies
between them; there, and only there, the levels differ by one."""

from __future__ import annotations

import numpy as np

from models.results import map_levels


def malignant_fields(p: np.ndarray) -> dict[str, object]:
    """`ImagePrediction` fields for a malignancy map of probabilities `p`, as the ensemble
    hands them over: the levels, and the peak found in fp32 before quantising (the first
    maximum in row-major order)."""
    row, col = np.unravel_index(int(np.argmax(p)), p.shape)
    return {"malignant_map": map_levels(p), "malignant_peak": (int(row), int(col))}


def assert_levels_of(levels: np.ndarray, values: np.ndarray, atol: float) -> None:
    """`levels` are the levels of the float map `values`, up to `atol` of float noise: equal,
    but for pixels whose value lies within `atol` of a rounding boundary (one level off)."""
    assert levels.dtype == np.uint8 and levels.shape == values.shape
    diff = np.abs(levels.astype(np.int16) - map_levels(values).astype(np.int16))
    assert diff.max(initial=0) <= 1
    scaled = np.asarray(values, np.float64) * 255
    near_boundary = np.abs(scaled - np.floor(scaled) - 0.5) <= atol * 255
    off = diff > 0
    assert near_boundary[off].all(), f"{int((off & ~near_boundary).sum())} pixels off by a level"


def assert_levels_close(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Two runs' levels whose float maps agreed within `atol`: at most one level apart, on no
    more pixels than a boundary falls between such floats (about 255 · atol of them; twice
    that, and at least one pixel, as the margin)."""
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max(initial=0) <= 1
    assert int((diff > 0).sum()) <= max(1, 2 * 255 * atol * a.size)


def rounding_cases() -> np.ndarray:
    """float32 map values that test the levels' rounding: a fine ramp over [0, 1], every
    boundary between two levels ((k + 0.5) / 255) and the floats on either side of it."""
    boundaries = (np.arange(256, dtype=np.float32) + 0.5) / 255
    return np.concatenate(
        [
            np.linspace(0, 1, 200_001, dtype=np.float32),
            boundaries,
            np.nextafter(boundaries, 0),
            np.nextafter(boundaries, 1),
        ]
    )
