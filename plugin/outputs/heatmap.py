"""How a probability map is shown over a mammogram: one rule for the SC heat-map, the Orthanc
overlay viewer (orthanc/viewer/viewer.js carries the same numbers) and the OHIF objects.

- Values below the display threshold are transparent, so air and normal tissue keep their grey
  values and only hot spots are coloured: the threshold is the models' operating point when
  they have one, else `DISPLAY_FLOOR`.
- Colour by absolute value (a colour means the same probability on every image) from viridis:
  perceptually uniform, readable with colour-vision deficiencies, its bright yellow end the hot
  end.
- Opacity ramps from `ALPHA_LOW` at the threshold to `ALPHA_HIGH` at 1, so the tissue under
  the colour stays visible.

Everything is a lookup table over 8-bit levels: no per-pixel Python, and a 13-megapixel image
costs a few array passes.
"""

from __future__ import annotations

import functools

import numpy as np

from models.results import ExamPrediction

from .common import OutputOptions, operating_point

DISPLAY_FLOOR = 0.2
"""Threshold for models without an operating point: saliency under 20 % is not a hot spot."""
ALPHA_LOW, ALPHA_HIGH = 0.35, 0.75
VIRIDIS = (
    (68, 1, 84),
    (71, 45, 123),
    (59, 82, 139),
    (44, 114, 142),
    (33, 145, 140),
    (40, 174, 128),
    (94, 201, 98),
    (173, 220, 48),
    (253, 231, 37),
)
"""matplotlib's viridis at 0, 1/8, …, 1; linear between these is within 2 levels of it."""


def display_threshold(exam: ExamPrediction, options: OutputOptions) -> float:
    """The map value from which colour shows."""
    point = operating_point(exam, options)
    return DISPLAY_FLOOR if point is None else float(min(max(point, 0.0), 1.0))


def first_shown_level(threshold: float) -> int:
    """The lowest 8-bit level (value × 255, rounded) that is coloured."""
    return int(np.ceil(threshold * 255 - 1e-6))


def colours() -> np.ndarray:
    """(256, 3) float32: the colour of each 8-bit level."""
    at = np.linspace(0.0, 1.0, len(VIRIDIS))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.array(VIRIDIS, dtype=np.float32)
    return np.stack([np.interp(levels, at, table[:, c]) for c in range(3)], -1).astype(np.float32)


def opacities(threshold: float) -> np.ndarray:
    """(256,) float32: the opacity of each 8-bit level, 0 below the threshold."""
    levels = np.arange(256, dtype=np.float32) / 255
    first = first_shown_level(threshold)
    span = max(1.0 - first / 255, 1e-6)
    ramp = ALPHA_LOW + (ALPHA_HIGH - ALPHA_LOW) * np.clip((levels - first / 255) / span, 0, 1)
    return np.where(np.arange(256) >= first, ramp, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=16)
def blend_table(threshold: float) -> np.ndarray:
    """(65536, 3) uint8, read-only: the displayed colour for index grey × 256 + level."""
    alpha = opacities(threshold)[None, :, None]
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    mixed = grey * (1 - alpha) + colours()[None, :, :] * alpha
    table = np.round(mixed).astype(np.uint8).reshape(65536, 3)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=16)
def _blend_words(threshold: float) -> np.ndarray:
    """(65536,) uint32, read-only: `blend_table` with each colour as the first three bytes
    of a word (RGBX), so that a lookup moves one word rather than three bytes."""
    table = np.zeros((65536, 4), np.uint8)
    table[:, :3] = blend_table(threshold)
    words = table.view(np.uint32).reshape(65536)
    words.flags.writeable = False
    return words


def is_shown(levels: np.ndarray, threshold: float) -> np.ndarray:
    """bool: where a map's 8-bit levels (`ImagePrediction.malignant_map`) may be coloured."""
    return levels >= first_shown_level(threshold)


_BLEND_ROWS = 64
"""Rows per lookup: their indices (uint16, which numpy widens to intp for each take) stay in
cache."""


def overlay(grey: np.ndarray, levels: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, cols, 3) uint8: `grey` (uint8) with a map's 8-bit `levels` coloured where they
    reach the threshold. Every pixel is one lookup in the blend table (below the threshold
    it gives the grey back): 3x faster than blending only the coloured box.

    The result is the RGB view of a 4-byte-per-pixel (RGBX) image: looking up a 4-byte word
    per pixel takes half the time of 3 bytes, and the JPEG encoder reads the RGBX image as
    it is (`jpeg.encode`)."""
    words = _blend_words(threshold)
    rows, cols = grey.shape
    rgbx = np.empty((rows, cols), np.uint32)
    index = np.empty((_BLEND_ROWS, cols), np.uint16)
    for top in range(0, rows, _BLEND_ROWS):
        block = slice(top, top + _BLEND_ROWS)
        at = index[: len(grey[block])]
        np.left_shift(grey[block], 8, out=at, dtype=np.uint16)
        np.bitwise_or(at, levels[block], out=at)
        np.take(words, at, out=rgbx[block], mode="clip")
    return rgbx.view(np.uint8).reshape(rows, cols, 4)[..., :3]


def legend(width: int, height: int, threshold: float) -> np.ndarray:
    """(height, width, 3) uint8 colour bar from 0 to 1; below the threshold a dark grey (it
    is transparent on the image)."""
    level = np.round(np.linspace(0, 255, max(width, 1))).astype(np.int64)
    row = colours()[level]
    row[level < first_shown_level(threshold)] = (60, 60, 60)
    return np.repeat(np.round(row).astype(np.uint8)[None], max(height, 1), axis=0)
