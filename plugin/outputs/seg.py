"""Fractional SEG (probability) per source image: the saliency maps, archived losslessly on the
exact source grid (dicom-outputs.md §3.1–3.2).

A 2D mammogram has no patient coordinate system, so highdicom takes one source image per SEG
and the SEG's grid is the source's. The source's FrameOfReferenceUID is dropped (with it,
dciodvfy demands a slice thickness a projection image does not have); PatientOrientation is set
by hand (highdicom omits it for 2D sources); laterality goes into the segments' anatomic region
rather than the series, where the validators disagree. JPEG-LS lossless: Orthanc's GDCM plugin
aborts on JPEG 2000 SEGs.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import JPEGLSLossless

from models.results import ExamPrediction, ImagePrediction

from . import heatmap
from .common import (
    BREAST_CODE,
    DEFAULT_OPTIONS,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    derive_uid,
    equipment,
    header_copy,
    patient_orientation,
    per_image,
    segment_algorithm,
    series_info,
    view_key,
)

MAX_FRACTIONAL_VALUE = 255
"""Not 256: highdicom accepts 256 and stores p = 1.0 as 0 in 8 bits (§3.2 f)."""

CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")
MALIGNANT = Code("86049000", "SCT", "Malignant neoplasm, primary")
BENIGN = Code("3898006", "SCT", "Neoplasm, benign")


def build_segs(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> list[hd.seg.Segmentation]:
    """One SEG per image, in hanging order (R-CC, L-CC, R-MLO, L-MLO)."""
    return per_image(exam, sources, build_seg, options)


def build_seg(
    exam: ExamPrediction,
    img: ImagePrediction,
    source: pydicom.Dataset,
    instance_number: int = 1,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> hd.seg.Segmentation:
    """Segment 1 the malignant map; segment 2 the benign map when the models give one."""
    meta = header_copy(source)
    if "FrameOfReferenceUID" in meta:
        del meta.FrameOfReferenceUID
    rows, cols = int(meta.Rows), int(meta.Columns)
    segments = [("AI malignant saliency", MALIGNANT, img.malignant_map)]
    if img.benign_map is not None:
        segments.append(("AI benign saliency", BENIGN, img.benign_map))
    for _, _, m in segments:
        if m.shape != (rows, cols):
            raise ValueError(
                f"saliency map of {view_key(img)} is {m.shape[0]}x{m.shape[1]} but its source "
                f"image is {rows}x{cols}; maps must be on the source grid (Geometry.map_to_source)"
            )
    pixels = fractions([m for _, _, m in segments])

    algorithm = segment_algorithm(exam, heatmap.display_threshold(exam, options))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=CATEGORY,
            segmented_property_type=finding,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[BREAST_CODE[img.laterality]],
        )
        for number, (label, finding, _) in enumerate(segments, start=1)
    ]

    info = series_info(OutputKind.SEG, exam)
    key = view_key(img)
    description = f"AI saliency, {key}: probability of malignant (and benign) findings"
    if not exam.clinical_use:
        description = f"{NOT_FOR_CLINICAL_USE}. {description}"
    seg = hd.seg.Segmentation(
        source_images=[meta],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(exam, "seg", "series", prefix=options.uid_prefix),
        series_number=info.number,
        series_description=info.description,
        sop_instance_uid=derive_uid(exam, "seg", "instance", key, prefix=options.uid_prefix),
        instance_number=instance_number,
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_description=description[:64],
        content_label="AI_SALIENCY",
        transfer_syntax_uid=JPEGLSLossless,
        omit_empty_frames=False,
        **equipment(exam, options),
    )
    if seg.MaximumFractionalValue != MAX_FRACTIONAL_VALUE:
        raise AssertionError("SEG MaximumFractionalValue must be 255")
    orientation = patient_orientation(source)
    seg.PatientOrientation = list(orientation) if orientation else ""
    fix_dimension_organization(
        seg, derive_uid(exam, "seg", "dimension", key, prefix=options.uid_prefix)
    )
    share_pixel_measures(seg, source)
    return seg


_FRACTION_OF_LEVEL = np.arange(256, dtype=np.float32) / np.float32(MAX_FRACTIONAL_VALUE)
"""k/255 as float32: highdicom's round(x * 255) gives k back for every k."""


def fractions(maps: list[np.ndarray]) -> np.ndarray:
    """(1, rows, cols, segments) float32 k/255 for highdicom: each map's 8-bit level (maps in
    [0, 1] or uint8 levels alike, by `heatmap.levels`) looked up as the fraction the SEG
    stores, so a float map and its levels give the same object. highdicom takes fractional
    pixels only as floats, and its np.unique check runs fast over the 256 snapped values."""
    pixels = np.empty((1, *maps[0].shape, len(maps)), dtype=np.float32)
    for i, m in enumerate(maps):
        pixels[0, ..., i] = _FRACTION_OF_LEVEL[heatmap.levels(m)]
    return pixels


def share_pixel_measures(seg: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """The source's pixel spacing as the shared Pixel Measures functional group. highdicom
    leaves the shared groups empty for a source without Pixel Spacing (MG has Imager Pixel
    Spacing), and OHIF 3.13 crashes opening a SEG without them ("Cannot destructure property
    'PixelMeasuresSequence'")."""
    spacing = pixel_spacing(source)
    if spacing is None:
        return
    measures = pydicom.Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = slice_thickness(source)
    groups = seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()]
    groups[0].PixelMeasuresSequence = [measures]  # beside what highdicom shares already
    seg.SharedFunctionalGroupsSequence = groups


def pixel_spacing(source: pydicom.Dataset) -> list[float] | None:
    """Pixel Spacing, else Imager Pixel Spacing (row, column; mm), else None."""
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    try:
        values = [float(v) for v in spacing] if spacing else []
    except (TypeError, ValueError):
        return None
    return values if len(values) == 2 and all(v > 0 for v in values) else None


def slice_thickness(source: pydicom.Dataset) -> float:
    """A projection image has no slice: the compressed breast thickness where the header
    gives it, else a nominal 1 mm, since readers (highdicom's segread) need the attribute
    once Pixel Measures are there."""
    try:
        thickness = float(source.get("BodyPartThickness") or 0)
    except (TypeError, ValueError):
        thickness = 0.0
    return thickness if thickness > 0 else 1.0


def fix_dimension_organization(seg: hd.seg.Segmentation, uid: str) -> None:
    """highdicom draws a random DimensionOrganizationUID; a re-run must give the same one."""
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid
