"""Secondary Capture heat-map per view: the one output every PACS and viewer shows
(dicom-outputs.md §5, integration-anchors G7).

The mammogram is windowed as its header says (VOI LUT or window, MONOCHROME1 and an inverse
presentation LUT shown dark-on-light the usual way round; a header the window cannot be taken
from falls back to a percentile window, never to an error), the malignant saliency map is
blended over it by the rule of `heatmap` (transparent below the operating point or display
floor, viridis above), the region the SRs mark is outlined where it shows breast, and a label
sized with the image carries "NOT FOR CLINICAL USE" where it applies, the image score large
enough to read on a PACS thumbnail, the breast and exam scores, the colour scale, model names
and versions. JPEG baseline, so the lossy-compression attributes are set; laterality and view
are copied so hanging protocols pair the heat-map with its source.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from models.results import ExamPrediction, ImagePrediction

from .. import __version__
from . import heatmap, jpeg
from .common import (
    BREAST_NAME,
    DEFAULT_OPTIONS,
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    algorithm_name,
    algorithm_version,
    check_on_source_grid,
    derive_uid,
    equipment,
    patient_orientation,
    per_image,
    series_info,
)

_OUTLINE_RGB = (255, 64, 64)
"""Red: a hue viridis never takes, so the outline reads over any heat."""
_WARNING_RGB = (255, 220, 0)
_BREAST_LEVEL = 12
"""Display levels above this (of 255) count as breast when placing the outline and label."""


def build_scs(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> list[hd.sc.SCImage]:
    """One heat-map per image, in hanging order; `sources` must carry pixel data."""
    return per_image(exam, sources, build_sc, options)


def build_sc(
    exam: ExamPrediction,
    img: ImagePrediction,
    source: pydicom.Dataset,
    instance_number: int = 1,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> hd.sc.SCImage:
    if "PixelData" not in source:
        raise ValueError(
            f"the source image of {img.view_key} has no pixel data; the heat-map needs the "
            "full dataset, not a header read with stop_before_pixels"
        )
    grey = display_image(source)
    check_on_source_grid(img, *grey.shape)
    rgb = render(exam, img, grey, heatmap.display_threshold(exam, options))
    info = series_info(OutputKind.SC, exam)
    orientation = patient_orientation(source)
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=jpeg.PLACEHOLDER,  # `jpeg.store` gives it the heat-map's grid and frame
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid(exam, "sc", "series", prefix=options.uid_prefix),
        series_number=info.number,
        sop_instance_uid=derive_uid(
            exam, "sc", "instance", img.view_key, prefix=options.uid_prefix
        ),
        instance_number=instance_number,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        # highdicom accepts single letters only ("FR" of an MLO fails): the source's value
        # replaces this placeholder below.
        patient_orientation=("A", "R"),
        transfer_syntax_uid=ExplicitVRLittleEndian,  # JPEG baseline below (`jpeg.store`)
        series_description=info.description,
        **equipment(exam, options),
    )
    jpeg.store(sc, rgb)
    # Type 2C: an unknown orientation stays empty rather than invented.
    sc.PatientOrientation = list(orientation) if orientation else ""
    sc.BurnedInAnnotation = "YES"
    # Image-level laterality only: the series holds both breasts, and General Series
    # Laterality must be absent when ImageLaterality is present.
    sc.ImageLaterality = str(img.laterality)
    if "ViewCodeSequence" in source:
        sc.ViewCodeSequence = _view_codes(source.ViewCodeSequence)
    sc.ViewPosition = str(img.view)
    sc.DerivationDescription = "AI heat-map over the windowed mammogram, scores burned in"
    sc.SourceImageSequence = [_reference(source)]
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionMethod = "ISO_10918_1"
    sc.LossyImageCompressionRatio = _ratio(rgb, sc)
    return sc


def _view_codes(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    """The source's view code; an empty modifier sequence is an error in the SC IOD's macro."""
    out = []
    for item in items:
        copy = pydicom.Dataset(item)
        if "ViewModifierCodeSequence" in copy and not copy.ViewModifierCodeSequence:
            del copy.ViewModifierCodeSequence
        out.append(copy)
    return out


def _reference(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _ratio(rgb: np.ndarray, sc: pydicom.Dataset) -> str:
    compressed = sum(len(f) for f in pydicom.encaps.generate_frames(sc.PixelData))
    return f"{rgb.nbytes / max(compressed, 1):.2f}"[:16]


# -- pixels ---------------------------------------------------------------------------------------

_HEADER_FAULTS = (ArithmeticError, LookupError, TypeError, ValueError, AttributeError)
"""What pydicom raises on a VOI or modality LUT it cannot apply (WindowWidth 0, a bad
VOILUTFunction, a short LUT, an unparseable number): the image is then windowed without it."""


def display_image(ds: pydicom.Dataset) -> np.ndarray:
    """(rows, cols) uint8, dark = low density as on a reading monitor: modality LUT, then the
    first VOI LUT or window, else (absent or unusable) a 0.5–99.5 percentile window;
    MONOCHROME1 or an INVERSE presentation LUT inverts. Integer images go through one lookup
    table built over their value range."""
    pixels = ds.pixel_array
    if pixels.ndim != 2:
        raise ValueError(
            f"the heat-map needs a single-frame grayscale image, got pixel array {pixels.shape}"
        )
    step = max(1, max(pixels.shape) // 512)
    sample = pixels[::step, ::step]
    if pixels.dtype.kind in "ui" and pixels.size:
        low, high = min(int(pixels.min()), 0), int(pixels.max())
        if high - low < 1 << 20:
            table = _display(ds, np.arange(low, high + 1, dtype=np.float64), sample)
            return _look_up(table, pixels - low if low else pixels)
    return _display(ds, pixels.astype(np.float64), sample)


_LOOKUP_ROWS = 32
"""Rows per np.take: numpy widens the indices to int64 first, and a block's worth of them
stays in cache (a whole 3328x2560 image's would be 68 MB): about 2x faster than one take."""


def _look_up(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`table[indices]` for a 2D image of indices within the table, block by block ("clip"
    only spares the bounds check that buffers `out`)."""
    out = np.empty(indices.shape, dtype=table.dtype)
    for top in range(0, indices.shape[0], _LOOKUP_ROWS):
        rows = slice(top, top + _LOOKUP_ROWS)
        np.take(table, indices[rows], out=out[rows], mode="clip")
    return out


def _display(ds: pydicom.Dataset, values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        values, sample = _modality(ds, values), _modality(ds, sample.astype(np.float64))
        windowed = _voi(ds, values, sample)
        if windowed is None:
            finite = sample[np.isfinite(sample)]
            low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
            windowed = (values, float(low), float(high) if high > low else float(low) + 1.0)
        out, low, high = windowed
        grey = np.nan_to_num(np.clip((out - low) / (high - low), 0.0, 1.0))
    inverse = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    if ds.get("PresentationLUTShape") == "INVERSE":
        inverse = True
    if inverse:
        grey = 1.0 - grey
    return np.round(grey * 255).astype(np.uint8)


def _modality(ds: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    except _HEADER_FAULTS:
        return values
    usable = out.shape == values.shape and np.isfinite(out).all()
    # A slope of 0 (or a LUT of one value) would flatten the image: take the stored values.
    if not usable or (values.size and np.ptp(out) == 0 < np.ptp(values)):
        return values
    return out


def _voi(
    ds: pydicom.Dataset, values: np.ndarray, sample: np.ndarray
) -> tuple[np.ndarray, float, float] | None:
    """The VOI output and its range (the extremes mapped through it), or None when the header
    has none, pydicom cannot apply it, or it flattens the image's own values (under 1 % of
    the output range between their 0.5 and 99.5 percentiles)."""
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if "VOILUTSequence" not in ds and not has_window:
        return None
    if "VOILUTSequence" in ds and np.array_equal(values, np.round(values)):
        values, sample = values.astype(np.int64), sample.astype(np.int64)  # LUT indices
    try:
        out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        extremes = np.array([values.min() - 1e6, values.max() + 1e6])
        low, high = sorted(float(v) for v in apply_voi_lut(extremes, ds, index=0))
        spread = np.percentile(apply_voi_lut(sample, ds, index=0), [0.5, 99.5])
    except _HEADER_FAULTS:
        return None
    if out.shape != values.shape or not (np.isfinite([low, high]).all() and high > low):
        return None
    if not np.isfinite(spread).all() or spread[1] - spread[0] < (high - low) / 100:
        return None
    return out, low, high


def render(exam: ExamPrediction, img: ImagePrediction, grey: np.ndarray, threshold: float):
    """The heat-map image: overlay, outline where it shows breast, then the label."""
    rgb = heatmap.overlay(grey, img.malignant_map, threshold)
    region = img.region
    if region.origin != "image" and _shows_breast(grey, region.box):
        _outline(rgb, region.box)
    _paste_label(rgb, grey, exam, img, threshold)
    return rgb


def _shows_breast(grey: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """At least a fifth of the box is breast: a box in the air or over the label is left out."""
    top, left, bottom, right = (int(round(v)) for v in box)
    inside = grey[top:bottom, left:right]
    step = max(1, max(inside.shape, default=1) // 256)
    return inside.size > 0 and (inside[::step, ::step] > _BREAST_LEVEL).mean() >= 0.2


def _outline(rgb: np.ndarray, box: tuple[float, float, float, float]) -> None:
    rows, cols = rgb.shape[:2]
    width = max(2, round(min(rows, cols) / 400))
    top, left, bottom, right = (int(round(v)) for v in box)
    top, left = max(0, min(top, rows - 1)), max(0, min(left, cols - 1))
    bottom, right = max(top + 1, min(bottom, rows)), max(left + 1, min(right, cols))
    for edge in (
        np.s_[top : top + width, left:right],
        np.s_[max(top, bottom - width) : bottom, left:right],
        np.s_[top:bottom, left : left + width],
        np.s_[top:bottom, max(left, right - width) : right],
    ):
        rgb[edge] = _OUTLINE_RGB


# -- the label --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    text: str
    large: bool = False
    colour: tuple[int, int, int] = (255, 255, 255)


def caption(exam: ExamPrediction, img: ImagePrediction) -> list[Line]:
    """The label's lines: the warning and the image score large, the rest small."""
    breast = next((b for b in exam.breasts if b.laterality == img.laterality), None)
    lines = []
    if not exam.clinical_use:
        lines.append(Line(NOT_FOR_CLINICAL_USE, True, _WARNING_RGB))
    lines.append(Line(f"{img.view_key}  AI P(cancer) {100 * img.malignant:.1f}%", True))
    if breast is not None:
        side = BREAST_NAME[img.laterality].capitalize()
        lines.append(
            Line(f"{side} {100 * breast.malignant:.1f}%   Exam {100 * exam.malignant:.1f}%")
        )
    else:
        lines.append(Line(f"Exam {100 * exam.malignant:.1f}%"))
    if exam.partial:
        lines.append(
            Line("Partial exam, missing " + ", ".join(exam.missing_views), False, _WARNING_RGB)
        )
    lines.append(Line(f"Model {algorithm_name(exam)} {algorithm_version(exam)}"))
    lines.append(Line(f"{MANUFACTURER} {__version__}"))
    return lines


def label_sizes(rows: int, cols: int) -> tuple[int, int]:
    """Large and small text heights in pixels: with the image (a 3328-row mammogram gets 111
    and 62), so the large lines still read when a PACS shrinks it to a thumbnail."""
    large = max(14, round(rows / 30))
    return large, max(10, round(large * 0.56))


def _paste_label(
    rgb: np.ndarray, grey: np.ndarray, exam: ExamPrediction, img: ImagePrediction, threshold: float
) -> None:
    """Top corner with less breast under it, on an opaque black box; never wider than 60 %
    of the image (the text shrinks instead)."""
    rows, cols = grey.shape
    lines = caption(exam, img)
    large, small = label_sizes(rows, cols)
    width = _label_width(lines, large, small)
    if width > 0.6 * cols:
        shrink = 0.6 * cols / width
        large, small = max(8, int(large * shrink)), max(7, int(small * shrink))
    label = _label_image(lines, large, small, threshold)
    h, w = min(label.shape[0], rows), min(label.shape[1], cols)
    step = max(1, max(h, w) // 128)
    left_cover = (grey[:h:step, :w:step] > _BREAST_LEVEL).mean()
    right_cover = (grey[:h:step, cols - w :: step] > _BREAST_LEVEL).mean()
    x0 = 0 if left_cover <= right_cover else cols - w
    rgb[:h, x0 : x0 + w] = label[:h, :w]


def _bar_width(lines: list[Line], large: int, small: int) -> int:
    """The widest text line's width, at least ten small letters: the colour scale's width."""
    widths = [_words_width(line.text, large if line.large else small) for line in lines]
    return max(int(max(widths)), 10 * small)


def _padding(small: int) -> int:
    """Space around the label's contents, in pixels."""
    return max(4, small // 2)


def _label_width(lines: list[Line], large: int, small: int) -> int:
    """The label's width at these text sizes, measured without drawing it."""
    return _bar_width(lines, large, small) + 2 * _padding(small)


def _label_image(lines: list[Line], large: int, small: int, threshold: float) -> np.ndarray:
    """The label as an RGB array: text lines, then the colour scale with its threshold."""
    pad, gap = _padding(small), max(2, small // 4)
    bar_w = _bar_width(lines, large, small)
    bar_h = max(6, small // 2)
    heights = [large if line.large else small for line in lines]
    width = bar_w + 2 * pad
    height = pad + sum(h + gap for h in heights) + bar_h + gap + small + pad
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    y = pad
    for line, h in zip(lines, heights, strict=True):
        _draw_words(canvas, (pad, y), line.text, h, line.colour)
        y += h + gap
    scale = heatmap.legend(bar_w, bar_h, threshold)
    out = np.asarray(canvas).copy()
    out[y : y + bar_h, pad : pad + bar_w] = scale
    canvas = Image.fromarray(out)
    tick = pad + round(threshold * (bar_w - 1))
    ImageDraw.Draw(canvas).line(
        [(tick, y - gap), (tick, y + bar_h)], fill=(255, 255, 255), width=max(1, small // 8)
    )
    text_y = y + bar_h + gap
    _draw_words(canvas, (pad, text_y), "0", small, (200, 200, 200))
    shown = f"colour from {100 * threshold:.0f}%"
    shown_w = _words_width(shown, small)
    x = min(max(pad, tick - shown_w / 2), width - pad - shown_w)
    _draw_words(canvas, (x, text_y), shown, small, (200, 200, 200))
    return np.asarray(canvas)


# -- text: Pillow's built-in font, each word rendered once -----------------------------------
#
# Pillow holds the GIL while FreeType renders, about 15 ms a label at 3328x2560, and most of a
# label's words (the warning, model names, versions, the scale's text) are the same on every
# heat-map. So a word's coverage is rendered once per size and sub-pixel start and then pasted
# with its colour: Pillow's `paste(colour, box, mask)` blends as `ImageDraw.text` does, and the
# pixels are the same (tests/test_outputs_sc.py).


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_PROBE = ImageDraw.Draw(Image.new("RGB", (1, 1)))
"""Measures text as a drawing on an RGB image does."""


@functools.lru_cache(maxsize=4096)
def _word_length(word: str, size: int) -> float:
    return _PROBE.textlength(word, font=_font(size))


def _word_gap(size: int) -> float:
    """Space between words: Pillow's built-in font sets a space narrower than the gap
    between some letters, which made "NOT FOR CLINICAL USE" read as one word."""
    return 0.45 * size


def _words_width(text: str, size: int) -> float:
    words = text.split(" ")
    return sum(_word_length(w, size) for w in words) + _word_gap(size) * (len(words) - 1)


_MARGIN = 256
"""Room around a word's coverage image for glyphs that reach left of or above their origin."""


@functools.lru_cache(maxsize=256)
def _word_coverage(word: str, size: int, start: tuple[float, float]):
    """How `ImageDraw.text` covers pixels with `word` from a position whose fractional parts
    are `start` (FreeType places glyphs to the sub-pixel): an "L" image of the coverage,
    cropped to it, and its corner relative to the position's integer parts; None for no ink.
    Drawn with ink 255 on 0, so each pixel is the coverage itself."""
    font = _font(size)
    right, bottom = font.getbbox(word)[2:]
    coverage = Image.new("L", (int(right) + 2 * _MARGIN, int(bottom) + 2 * _MARGIN), 0)
    ImageDraw.Draw(coverage).text((_MARGIN + start[0], _MARGIN + start[1]), word, 255, font)
    box = coverage.getbbox()
    if box is None:
        return None
    return coverage.crop(box), box[0] - _MARGIN, box[1] - _MARGIN


def _draw_words(canvas: Image.Image, at: tuple[float, float], text: str, size: int, fill) -> None:
    x, y = at
    for word in text.split(" "):
        drawn = _word_coverage(word, size, (math.modf(x)[0], math.modf(y)[0])) if word else None
        if drawn is not None:
            coverage, left, top = drawn
            canvas.paste(fill, (int(x) + left, int(y) + top), coverage)
        x += _word_length(word, size) + _word_gap(size)
