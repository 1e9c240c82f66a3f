"""The Mammography CAD SR templates (PS3.16 TID 4000 family) as highdicom `Template`s.

Each class is one template, written the way highdicom writes its own (`MeasurementReport` for
TID 1500, `AlgorithmIdentification` for TID 4019): typed values in, content items out, nothing
of this project's models inside (from `common` come only two codes shared with the TID 1500
builders, the shared `CodedConcept`s and the document helper), so the module could be offered
to highdicom nearly as it is. Only the rows a CAD algorithm that scores images needs are
parameters; rows left out are optional in the standard (TID 4000 is non-extensible: nothing
may be added). Codes may come as pydicom `Code`s or highdicom `CodedConcept`s; each concept
is built once (`common.concept`), as building them was most of a report's own cost.

`MammographyCADSR` wraps a `MammographyCADReport` into a Mammography CAD SR Storage instance.
highdicom has no public SR class for that SOP class (its public ones are Enhanced,
Comprehensive and Comprehensive 3D SR). The Mammography CAD SR IOD (PS3.3 A.35.5) has the same
modules as the Comprehensive SR IOD (A.35.3): it differs in its SOP Class UID and in admitting
only TID 4000 as content, which is what `MammographyCADReport` writes, and its value types and
relationships are a subset of Comprehensive SR's. So the document is built by the public
`highdicom.sr.ComprehensiveSR` (patient and study copied from the evidence, the evidence
sequences, equipment, flags; through `common.comprehensive_sr`, which spares it copying and
searching the tree) and handed back as a plain pydicom `Dataset` carrying the
Mammography CAD SR SOP Class UID, in the dataset and in its file meta. It is deliberately not
a `ComprehensiveSR` instance: highdicom's methods on it would assume the wrong IOD.
`tests/test_outputs_cad_sr.py` checks this boundary: no Comprehensive SR UID is left anywhere in
the document, and dciodvfy and PixelMed accept it as a Mammography CAD SR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DateContentItem,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    NumContentItem,
    ScoordContentItem,
    TextContentItem,
)
from highdicom.sr import RelationshipTypeValues as Rel
from highdicom.sr.templates import Template  # public; highdicom.sr does not re-export it
from pydicom.sr.coding import Code
from pydicom.uid import MammographyCADSRStorage

from .common import DCM_PROBABILITY_OF_CANCER, UCUM_PERCENT, comprehensive_sr, concept

REPORT = CodedConcept("111036", "DCM", "Mammography CAD Report")
ENGLISH = CodedConcept("en-US", "RFC5646", "English (United States)")
_IMAGE_LIBRARY = CodedConcept("111028", "DCM", "Image Library")
_LATERALITY = CodedConcept("111027", "DCM", "Image Laterality")
_VIEW = CodedConcept("111031", "DCM", "Image View")
_ORIENTATION_ROW = CodedConcept("111044", "DCM", "Patient Orientation Row")
_ORIENTATION_COL = CodedConcept("111043", "DCM", "Patient Orientation Column")
_STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
_H_SPACING = CodedConcept("111026", "DCM", "Horizontal Pixel Spacing")
_V_SPACING = CodedConcept("111066", "DCM", "Vertical Pixel Spacing")
_ROWS = CodedConcept("110910", "DCM", "Pixel Data Rows")
_COLUMNS = CodedConcept("110911", "DCM", "Pixel Data Columns")
_MM = CodedConcept("mm", "UCUM", "millimeter")
_PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")

_SUMMARY = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
_IMPRESSION = CodedConcept("111034", "DCM", "Individual Impression/Recommendation")
_RENDERING_INTENT = CodedConcept("111056", "DCM", "Rendering Intent")
_COMPOSITE_FEATURE = CodedConcept("111015", "DCM", "Composite Feature")
_COMPOSITE_TYPE = CodedConcept("111016", "DCM", "Composite Type")
_SCOPE = CodedConcept("111057", "DCM", "Scope of Feature")
_SINGLE_IMAGE_FINDING = CodedConcept("111059", "DCM", "Single Image Finding")
_ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")
_ALGORITHM_PARAMETERS = CodedConcept("111002", "DCM", "Algorithm Parameters")
_CENTER = CodedConcept("111010", "DCM", "Center")
_OUTLINE = CodedConcept("111041", "DCM", "Outline")
# highdicom's ContentSequence wants a concept name on every item; the TID 4020/4021 IMAGE
# items have none, so they carry this one while building and MammographyCADSR removes it.
_SOURCE = CodedConcept("260753009", "SCT", "Source")

_DETECTIONS = CodedConcept("111064", "DCM", "Summary of Detections")
_SUCCESSFUL_DETECTIONS = CodedConcept("111063", "DCM", "Successful Detections")
_DETECTION_PERFORMED = CodedConcept("111022", "DCM", "Detection Performed")
_ANALYSES = CodedConcept("111065", "DCM", "Summary of Analyses")
_SUCCESSFUL_ANALYSES = CodedConcept("111062", "DCM", "Successful Analyses")
_ANALYSIS_PERFORMED = CodedConcept("111004", "DCM", "Analysis Performed")
_SUCCEEDED = CodedConcept("111222", "DCM", "Succeeded")
_PROBABILITY_OF_CANCER = concept(DCM_PROBABILITY_OF_CANCER)
_PERCENT = concept(UCUM_PERCENT)


def image_reference(image: pydicom.Dataset, relationship_type: Rel) -> ImageContentItem:
    """An IMAGE item referencing `image` (its header suffices)."""
    return ImageContentItem(
        _SOURCE, image.SOPClassUID, image.SOPInstanceUID, relationship_type=relationship_type
    )


class CADAlgorithmIdentification(Template):
    """TID 4019 Algorithm Identification as the CAD templates include it: every row takes the
    including row's relationship (HAS PROPERTIES there; highdicom's `AlgorithmIdentification`
    fixes HAS CONCEPT MOD, which TID 4005/4006/4015/4016 do not admit)."""

    def __init__(
        self,
        name: str,
        version: str,
        parameters: Sequence[str] = (),
        relationship_type: Rel = Rel.HAS_PROPERTIES,
    ) -> None:
        rel = relationship_type
        super().__init__(
            [
                TextContentItem(_ALGORITHM_NAME, name, relationship_type=rel),
                TextContentItem(_ALGORITHM_VERSION, version, relationship_type=rel),
                *(
                    TextContentItem(_ALGORITHM_PARAMETERS, p, relationship_type=rel)
                    for p in parameters
                ),
            ]
        )


class ImageLibraryEntry(Template):
    """TID 4020 CAD Image Library Entry: one analysed image and its acquisition context.
    `pixel_spacing` is (row, column) in mm, as DICOM's Pixel Spacing."""

    def __init__(
        self,
        image: pydicom.Dataset,
        laterality: Code,
        view: Code,
        patient_orientation: tuple[str, str] | None = None,
        study_date: str | None = None,
        pixel_spacing: tuple[float, float] | None = None,
    ) -> None:
        ctx = Rel.HAS_ACQ_CONTEXT
        context = [
            CodeContentItem(_LATERALITY, concept(laterality), relationship_type=ctx),
            CodeContentItem(_VIEW, concept(view), relationship_type=ctx),
        ]
        if patient_orientation is not None:
            context += [
                TextContentItem(_ORIENTATION_ROW, patient_orientation[0], relationship_type=ctx),
                TextContentItem(_ORIENTATION_COL, patient_orientation[1], relationship_type=ctx),
            ]
        if study_date is not None:
            context.append(DateContentItem(_STUDY_DATE, study_date, relationship_type=ctx))
        if pixel_spacing is not None:
            context += [
                NumContentItem(_H_SPACING, pixel_spacing[1], _MM, relationship_type=ctx),
                NumContentItem(_V_SPACING, pixel_spacing[0], _MM, relationship_type=ctx),
            ]
        context += [
            NumContentItem(_ROWS, int(image.Rows), _PIXELS, relationship_type=ctx),
            NumContentItem(_COLUMNS, int(image.Columns), _PIXELS, relationship_type=ctx),
        ]
        item = image_reference(image, Rel.CONTAINS)
        item.ContentSequence = context
        super().__init__([item])


def _probability(percent: float) -> NumContentItem:
    return NumContentItem(
        _PROBABILITY_OF_CANCER, percent, _PERCENT, relationship_type=Rel.HAS_PROPERTIES
    )


def _intent(code: Code | CodedConcept) -> CodeContentItem:
    return CodeContentItem(_RENDERING_INTENT, concept(code), relationship_type=Rel.HAS_CONCEPT_MOD)


def _scoord(
    name: CodedConcept, graphic_type: str, data: np.ndarray, image: pydicom.Dataset, rel: Rel
) -> ScoordContentItem:
    """TID 4021 geometry: image coordinates (column, row), SELECTED FROM `image`."""
    item = ScoordContentItem(name, graphic_type, data, relationship_type=rel)
    item.ContentSequence = [image_reference(image, Rel.SELECTED_FROM)]
    return item


class SingleImageFinding(Template):
    """TID 4006 Mammography CAD Single Image Finding: a finding (CID 6014) on one image with
    its probability of cancer in percent, its centre (a POINT) and optionally its outline (a
    closed POLYLINE), both (column, row). `relationship_type` is CONTAINS under an individual
    impression (TID 4003) and INFERRED FROM under a composite feature (TID 4004)."""

    def __init__(
        self,
        finding: Code,
        rendering_intent: Code,
        algorithm: CADAlgorithmIdentification,
        image: pydicom.Dataset,
        center: np.ndarray,
        outline: np.ndarray | None = None,
        probability_of_cancer: float | None = None,
        relationship_type: Rel = Rel.INFERRED_FROM,
    ) -> None:
        props = Rel.HAS_PROPERTIES
        children = [_intent(rendering_intent), *algorithm]
        if probability_of_cancer is not None:
            children.append(_probability(probability_of_cancer))
        children.append(_scoord(_CENTER, "POINT", center, image, props))
        if outline is not None:
            children.append(_scoord(_OUTLINE, "POLYLINE", outline, image, props))
        item = CodeContentItem(
            _SINGLE_IMAGE_FINDING, concept(finding), relationship_type=relationship_type
        )
        item.ContentSequence = children
        super().__init__([item])


class CompositeFeature(Template):
    """TID 4004/4005 Mammography CAD Composite Feature: one feature seen on several images
    (`centers`: one POINT per image, with the image), inferred from their single image
    findings."""

    def __init__(
        self,
        feature: Code,
        rendering_intent: Code,
        composite_type: Code,
        scope: Code,
        algorithm: CADAlgorithmIdentification,
        centers: Sequence[tuple[np.ndarray, pydicom.Dataset]],
        findings: Sequence[SingleImageFinding],
        probability_of_cancer: float | None = None,
    ) -> None:
        props = Rel.HAS_PROPERTIES
        children = [
            _intent(rendering_intent),
            CodeContentItem(_COMPOSITE_TYPE, concept(composite_type), relationship_type=props),
            CodeContentItem(_SCOPE, concept(scope), relationship_type=props),
            *algorithm,
        ]
        if probability_of_cancer is not None:
            children.append(_probability(probability_of_cancer))
        children += [_scoord(_CENTER, "POINT", p, img, Rel.INFERRED_FROM) for p, img in centers]
        children += [item for finding in findings for item in finding]
        item = CodeContentItem(_COMPOSITE_FEATURE, concept(feature), relationship_type=Rel.CONTAINS)
        item.ContentSequence = children
        super().__init__([item])


class IndividualImpression(Template):
    """TID 4003 Mammography CAD Individual Impression/Recommendation: one composite feature,
    or one single image finding related with CONTAINS."""

    def __init__(
        self, rendering_intent: Code, feature: CompositeFeature | SingleImageFinding
    ) -> None:
        item = ContainerContentItem(_IMPRESSION, relationship_type=Rel.INFERRED_FROM)
        item.ContentSequence = [_intent(rendering_intent), *feature]
        super().__init__([item])


class OverallImpression(Template):
    """TID 4001 Mammography CAD Overall Impression/Recommendation: the CAD Processing and
    Findings Summary (CID 6047) inferred from the individual impressions."""

    def __init__(self, summary: Code, impressions: Sequence[IndividualImpression]) -> None:
        item = CodeContentItem(_SUMMARY, concept(summary), relationship_type=Rel.CONTAINS)
        item.ContentSequence = [i for imp in impressions for i in imp]
        super().__init__([item])


class _SuccessfulProcessing(Template):
    """TID 4015/4016 for an algorithm that succeeded on every image: the summary reads
    "Succeeded" and one performed item names the algorithm and the images."""

    name: CodedConcept
    container: CodedConcept
    performed: CodedConcept

    def __init__(
        self,
        value: Code,
        algorithm: CADAlgorithmIdentification,
        images: Sequence[pydicom.Dataset],
    ) -> None:
        done = CodeContentItem(self.performed, concept(value), relationship_type=Rel.CONTAINS)
        done.ContentSequence = [
            *algorithm,
            *(image_reference(i, Rel.HAS_PROPERTIES) for i in images),
        ]
        successful = ContainerContentItem(self.container, relationship_type=Rel.INFERRED_FROM)
        successful.ContentSequence = [done]
        item = CodeContentItem(self.name, _SUCCEEDED, relationship_type=Rel.CONTAINS)
        item.ContentSequence = [successful]
        super().__init__([item])


class SummaryOfDetections(_SuccessfulProcessing):
    """TID 4000 row 6 with TID 4015 CAD Detections Performed: `value` from CID 6014."""

    name, container, performed = _DETECTIONS, _SUCCESSFUL_DETECTIONS, _DETECTION_PERFORMED


class SummaryOfAnalyses(_SuccessfulProcessing):
    """TID 4000 row 8 with TID 4016 CAD Analyses Performed: `value` from CID 6043."""

    name, container, performed = _ANALYSES, _SUCCESSFUL_ANALYSES, _ANALYSIS_PERFORMED


class MammographyCADReport(Template):
    """TID 4000 Mammography CAD Document Root: language, image library, the overall
    impression and the detection and analysis summaries, in the template's order."""

    def __init__(
        self,
        image_library: Sequence[ImageLibraryEntry],
        overall_impression: OverallImpression,
        detections: SummaryOfDetections,
        analyses: SummaryOfAnalyses,
        language: Code | CodedConcept = ENGLISH,
    ) -> None:
        library = ContainerContentItem(_IMAGE_LIBRARY, relationship_type=Rel.CONTAINS)
        library.ContentSequence = [i for e in image_library for i in e]
        root = ContainerContentItem(REPORT, template_id="4000")
        root.ContentSequence = [
            *LanguageOfContentItemAndDescendants(concept(language)),
            library,
            *overall_impression,
            *detections,
            *analyses,
        ]
        super().__init__([root], is_root=True)


class MammographyCADSR(pydicom.Dataset):
    """A Mammography CAD SR Storage instance around a `MammographyCADReport`; the keyword
    arguments are `highdicom.sr.ComprehensiveSR`'s (see the module docstring for why)."""

    def __init__(
        self, evidence: Sequence[pydicom.Dataset], content: MammographyCADReport, **kwargs: Any
    ) -> None:
        document = comprehensive_sr(evidence, content, **kwargs)
        super().__init__(document)
        self.preamble = document.preamble
        self.file_meta = document.file_meta
        self.SOPClassUID = MammographyCADSRStorage
        self.file_meta.MediaStorageSOPClassUID = MammographyCADSRStorage
        _unname_images(self.ContentSequence)


def _unname_images(items: pydicom.Sequence) -> None:
    """TID 4020/4021 IMAGE items have no concept name (see `_SOURCE`)."""
    for item in items:
        if item.ValueType == "IMAGE" and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
        if "ContentSequence" in item:
            _unname_images(item.ContentSequence)
