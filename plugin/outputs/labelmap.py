"""Binary SEG per source image, the region where the malignant saliency reaches the display
threshold (the models' operating point, else the display floor): the heat-map OHIF draws.

OHIF 3.13 refuses fractional SEGs ("Fractional segmentations are not yet supported", OHIF
issue #1346) and does not draw the Label Map Segmentation class; a binary SEG it overlays on
the mammogram in colour, provided the SEG has plane geometry, which a projection image lacks.
So this SEG carries a nominal one: the identity orientation at the origin, in a frame of
reference of its own (derived like every UID here), with the source's pixel spacing; OHIF
pairs the frame with its mammogram through the frame's source image reference. The object
validates with dciodvfy; the fractional SEG (`seg`) stays the lossless archive of the maps.
Each view's SEG is a series of its own, as OHIF shows only the first SEG of a series.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from models.results import ExamPrediction, ImagePrediction

from . import heatmap
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
from .seg import CATEGORY, MALIGNANT, fix_dimension_organization, pixel_spacing, slice_thickness

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_HOT = heatmap.VIRIDIS[-1]
"""The region's colour, the hot end of our heat-map scale (without a Recommended Display
CIELab Value, OHIF warns "default color was used" and picks one)."""


def build_labelmap_segs(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> list[hd.seg.Segmentation]:
    """One binary SEG per image, in hanging order (R-CC, L-CC, R-MLO, L-MLO)."""
    return per_image(exam, sources, build_labelmap_seg, options)


def build_labelmap_seg(
    exam: ExamPrediction,
    img: ImagePrediction,
    source: pydicom.Dataset,
    instance_number: int = 1,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> hd.seg.Segmentation:
    key = img.view_key
    meta = header_copy(source)
    rows, cols = int(meta.Rows), int(meta.Columns)
    check_on_source_grid(img, rows, cols)
    spacing = pixel_spacing(source)
    if spacing is None:
        raise ValueError(
            f"the source image of {key} has neither Pixel Spacing nor Imager Pixel Spacing; "
            "a labelmap SEG needs one (leave `labelmap_seg` out of this destination's outputs)"
        )
    threshold = heatmap.display_threshold(exam, options)
    hot = heatmap.is_shown(img.malignant_map, threshold)
    # The nominal geometry, on the SEG's copy of the source header only.
    meta.FrameOfReferenceUID = derive_uid(
        exam, "labelmap_seg", "frame-of-reference", key, prefix=options.uid_prefix
    )
    meta.ImagePositionPatient = [0.0, 0.0, 0.0]
    meta.ImageOrientationPatient = list(_IDENTITY)
    meta.PixelSpacing = spacing
    meta.SliceThickness = slice_thickness(source)
    label = f"AI region, saliency from {100 * threshold:.0f}%"
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=CATEGORY,
        segmented_property_type=MALIGNANT,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=segment_algorithm(exam, threshold),
        anatomic_regions=[BREAST_CODE[img.laterality]],
        display_color=hd.color.CIELabColor.from_rgb(*_HOT),
    )
    info = series_info(OutputKind.LABELMAP_SEG, exam)
    content = f"AI region of {key}: malignant saliency at or above {100 * threshold:.0f}%"
    if not exam.clinical_use:
        content = f"{NOT_FOR_CLINICAL_USE}. {content}"
    seg = hd.seg.Segmentation(
        source_images=[meta],
        pixel_array=hot[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        # A series per view: OHIF 3.13 shows only the first SEG of a series.
        series_instance_uid=derive_uid(
            exam, "labelmap_seg", "series", key, prefix=options.uid_prefix
        ),
        series_number=info.number,
        series_description=f"{info.description} {key}"[:64],
        sop_instance_uid=derive_uid(
            exam, "labelmap_seg", "instance", key, prefix=options.uid_prefix
        ),
        instance_number=instance_number,
        device_serial_number="0",
        content_description=content[:64],
        content_label="AI_REGION",
        transfer_syntax_uid=ExplicitVRLittleEndian,  # bit-packed: 1 MB for 3328x2560
        omit_empty_frames=False,
        **equipment(exam, options),
    )
    orientation = patient_orientation(source)
    seg.PatientOrientation = list(orientation) if orientation else ""
    fix_dimension_organization(
        seg, derive_uid(exam, "labelmap_seg", "dimension", key, prefix=options.uid_prefix)
    )
    return seg
