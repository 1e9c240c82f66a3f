"""Secondary Capture heat-map per view: the one output every PACS and viewer shows
(dicom-outputs.md §5, integration-anchors G7).

The mammogram is windowed as its header says (VOI LUT or window, MONOCHROME1 and an inverse
presentation LUT shown dark-on-light the usual way round), the malignant saliency map is
blended over it in colour, the region the SRs mark is outlined, and the scores, model names
and versions (and "NOT FOR CLINICAL USE" where it applies) are burned in with Pillow's
built-in font. JPEG baseline, so the lossy-compression attributes are set; laterality and
view are copied so hanging protocols pair the heat-map with its source.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEGBaseline8Bit

from models.results import ExamPrediction, ImagePrediction

from .. import __version__
from .common import (
    BREAST_NAME,
    DEFAULT_OPTIONS,
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    algorithm_name,
    algorithm_version,
    derive_uid,
    equipment,
    patient_orientation,
    per_image,
    region_for,
    series_info,
    view_key,
)

_ALPHA = 0.6
"""Opacity of the heat-map where the map reads 1; it scales with the map value."""
_FLOOR = 0.05
"""Map values below this stay transparent, so normal tissue reads as the plain mammogram."""
# A perceptually ordered ramp (dark blue → cyan → yellow → red) for the overlay.
_RAMP_AT = np.array([0.0, 0.35, 0.65, 1.0])
_RAMP_RGB = np.array([[40, 40, 220], [0, 220, 220], [255, 230, 0], [255, 0, 0]], dtype=np.float32)
_OUTLINE_RGB = (255, 64, 64)


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
            f"the source image of {view_key(img)} has no pixel data; the heat-map needs the "
            "full dataset, not a header read with stop_before_pixels"
        )
    gray = display_image(source)
    if gray.shape != img.malignant_map.shape:
        raise ValueError(
            f"saliency map of {view_key(img)} is {img.malignant_map.shape} but its source image "
            f"is {gray.shape}; maps must be on the source grid"
        )
    rgb = _render(exam, img, gray)
    info = series_info(OutputKind.SC, exam)
    orientation = patient_orientation(source)
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.YBR_FULL_422,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid(exam, "sc", "series", prefix=options.uid_prefix),
        series_number=info.number,
        sop_instance_uid=derive_uid(
            exam, "sc", "instance", view_key(img), prefix=options.uid_prefix
        ),
        instance_number=instance_number,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        # highdicom accepts single letters only ("FR" of an MLO fails): the source's value
        # replaces this placeholder below.
        patient_orientation=("A", "R"),
        transfer_syntax_uid=JPEGBaseline8Bit,
        series_description=info.description,
        **equipment(exam, options),
    )
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


def display_image(ds: pydicom.Dataset) -> np.ndarray:
    """(rows, cols) float32 in [0, 1], dark = low density as on a reading monitor: modality
    LUT, then the first VOI LUT or window, else a percentile window; MONOCHROME1 or an
    INVERSE presentation LUT inverts."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if has_voi:
        out = apply_voi_lut(values, ds, index=0).astype(np.float32)
        # The VOI output range: map the extremes through the same transform.
        extremes = np.array([values.min() - 1e6, values.max() + 1e6], dtype=np.float32)
        lo, hi = sorted(apply_voi_lut(extremes, ds, index=0).astype(np.float64))
    if not has_voi or hi <= lo:
        out = values
        sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
        lo, hi = np.percentile(sample, [0.5, 99.5]).astype(np.float64)
        hi = hi if hi > lo else lo + 1.0
    gray = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    inverse = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    if ds.get("PresentationLUTShape") == "INVERSE" and not inverse:
        inverse = True
    return (1.0 - gray if inverse else gray).astype(np.float32)


def _lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """Colour and opacity for each 8-bit map level (a lookup beats per-pixel interpolation
    on 13-megapixel images)."""
    levels = np.linspace(0.0, 1.0, 256)
    colours = np.stack([np.interp(levels, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], -1)
    alpha = np.where(levels >= _FLOOR, _ALPHA * levels, 0.0)
    return colours.astype(np.float32), alpha.astype(np.float32)


_COLOURS, _OPACITY = _lookup_tables()


def _render(exam: ExamPrediction, img: ImagePrediction, gray: np.ndarray) -> np.ndarray:
    level = np.round(np.clip(np.nan_to_num(img.malignant_map), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=-1)
    covered = _OPACITY[level] > 0  # blend only where the map shows
    alpha = _OPACITY[level[covered]][:, None]
    blended = rgb[covered] * (1.0 - alpha) + _COLOURS[level[covered]] * alpha
    rgb[covered] = np.round(blended).astype(np.uint8)
    canvas = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    rows, cols = gray.shape
    region = region_for(img)
    top, left, bottom, right = region.box
    width = max(1, round(min(rows, cols) / 400))
    draw.rectangle(
        [left, top, max(left, right - 1), max(top, bottom - 1)], outline=_OUTLINE_RGB, width=width
    )
    _burn_text(draw, _caption(exam, img), gray, exam.clinical_use)
    return np.asarray(canvas)


def _caption(exam: ExamPrediction, img: ImagePrediction) -> list[str]:
    breast = next((b for b in exam.breasts if b.laterality == img.laterality), None)
    lines = [f"AI heat-map  {view_key(img)}"]
    if not exam.clinical_use:
        lines.insert(0, NOT_FOR_CLINICAL_USE)
    lines.append(f"Image P(cancer) {100 * img.malignant:.1f}%")
    if breast is not None:
        lines.append(f"{BREAST_NAME[img.laterality].capitalize()} {100 * breast.malignant:.1f}%")
    lines.append(f"Exam {100 * exam.malignant:.1f}%")
    if exam.partial:
        lines.append("Partial exam, missing " + ", ".join(exam.missing_views))
    lines.append(f"Model {algorithm_name(exam)} {algorithm_version(exam)}")
    lines.append(f"{MANUFACTURER} {__version__}")
    return lines


def _burn_text(draw: ImageDraw.ImageDraw, lines: list[str], gray: np.ndarray, clinical: bool):
    """Top corner away from the chest wall (the emptier half), on a dark box for contrast."""
    rows, cols = gray.shape
    size = max(10, round(rows / 70))
    font = ImageFont.load_default(size=size)
    widths = [draw.textlength(line, font=font) for line in lines]
    pad = size // 3
    box_w = int(max(widths)) + 2 * pad
    box_h = len(lines) * (size + pad) + pad
    left_half = gray[:, : cols // 2].mean()
    right_half = gray[:, cols // 2 :].mean()
    x0 = 0 if left_half <= right_half else max(0, cols - box_w)
    draw.rectangle([x0, 0, x0 + box_w, box_h], fill=(0, 0, 0))
    y = pad
    for line in lines:
        colour = (255, 220, 0) if line == NOT_FOR_CLINICAL_USE and not clinical else (255, 255, 255)
        draw.text((x0 + pad, y), line, fill=colour, font=font)
        y += size + pad
