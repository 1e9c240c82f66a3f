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
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from models.results import ExamPrediction, ImagePrediction

from . import heatmap, jpegls
from .common import (
    BREAST_CODE,
    DEFAULT_OPTIONS,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    check_on_source_grid,
    derive_uid,
    equipment,
    header_copy,
    patient_orientation,
    per_image,
    segment_algorithm,
    series_info,
)

MAX_FRACTIONAL_VALUE = 255
"""Not 256: highdicom accepts 256 and stores p = 1.0 as 0 in 8 bits (§3.2 f)."""

CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")
MALIGNANT = Code("86049000", "SCT", "Malignant neoplasm, primary")
BENIGN = Code("3898006", "SCT", "Neoplasm, benign")

_ENCODER = jpegls.register()
"""pydicom's JPEG-LS encoder plugin for the frames: one that releases the GIL."""


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
    """Segment 1 the malignant map; segment 2 the benign map when the models give one.

    highdicom takes fractional pixels only as floats in [0, 1], checks them with np.unique
    and rounds them back to 8 bits: at 3328x2560 with two segments that was most of the
    object's cost, for values that are 8-bit levels already. So highdicom builds the object
    around a placeholder, uncompressed, and pydicom's `Dataset.compress` then stores the
    levels in JPEG-LS (CharLS, through `jpegls`, without holding the GIL): the file is byte
    for byte the one highdicom writes from the fractions k/255 (tests/test_outputs_seg.py
    builds both). The placeholder is one pixel, on a source header that says one pixel:
    highdicom checks, casts and encodes whatever it is given, and a full-size one cost a
    third of the object's time for zeros that were thrown away."""
    plan = plan_seg(exam, img, source, instance_number, options)
    frames = len(plan.levels)
    arguments = {
        **plan.arguments,
        "source_images": [_one_pixel(plan.arguments["source_images"][0])],
    }
    seg = hd.seg.Segmentation(
        **arguments,
        pixel_array=np.zeros((1, 1, 1, frames), np.bool_),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    seg.Rows, seg.Columns = plan.levels[0].shape
    # What highdicom infers from fractional pixels: overlap is undefined between maps.
    seg.SegmentsOverlap = "UNDEFINED" if frames > 1 else "NO"
    pixels = np.stack(plan.levels) if frames > 1 else plan.levels[0]
    seg.compress(JPEGLSLossless, pixels, generate_instance_uid=False, encoding_plugin=_ENCODER)
    finish_seg(seg, plan)
    return seg


def _one_pixel(header: pydicom.Dataset) -> pydicom.Dataset:
    """`header` as if its image were one pixel; `header` itself is left as it is."""
    out = header_copy(header)
    out.add_new("Rows", "US", 1)
    out.add_new("Columns", "US", 1)
    return out


@dataclass(frozen=True)
class SegPlan:
    """What a SEG is built from: highdicom's arguments but the pixels and the transfer
    syntax, the maps as uint8 levels (a frame each), and what is set after highdicom."""

    arguments: dict[str, object]
    levels: list[np.ndarray]
    source: pydicom.Dataset
    dimension_uid: str


def plan_seg(
    exam: ExamPrediction,
    img: ImagePrediction,
    source: pydicom.Dataset,
    instance_number: int = 1,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> SegPlan:
    """The SEG of `img` up to its pixels; a map off the source grid is refused here."""
    meta = header_copy(source)
    if "FrameOfReferenceUID" in meta:
        del meta.FrameOfReferenceUID
    rows, cols = int(meta.Rows), int(meta.Columns)
    segments = [("AI malignant saliency", MALIGNANT, img.malignant_map)]
    if img.benign_map is not None:
        segments.append(("AI benign saliency", BENIGN, img.benign_map))
    check_on_source_grid(img, rows, cols)

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
    key = img.view_key
    description = f"AI saliency, {key}: probability of malignant (and benign) findings"
    if not exam.clinical_use:
        description = f"{NOT_FOR_CLINICAL_USE}. {description}"
    arguments = dict(
        source_images=[meta],
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
        omit_empty_frames=False,  # a frame per map, empty or not (the placeholder is empty)
        **equipment(exam, options),
    )
    return SegPlan(
        arguments=arguments,
        levels=[m for _, _, m in segments],
        source=source,
        dimension_uid=derive_uid(exam, "seg", "dimension", key, prefix=options.uid_prefix),
    )


def finish_seg(seg: hd.seg.Segmentation, plan: SegPlan) -> None:
    """What highdicom leaves out or draws at random, set on the built object."""
    if seg.MaximumFractionalValue != MAX_FRACTIONAL_VALUE:
        raise AssertionError("SEG MaximumFractionalValue must be 255")
    orientation = patient_orientation(plan.source)
    seg.PatientOrientation = list(orientation) if orientation else ""
    fix_dimension_organization(seg, plan.dimension_uid)
    share_pixel_measures(seg, plan.source)


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
