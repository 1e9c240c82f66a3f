"""Mammography CAD SR (TID 4000): the object mammography workstations read.

The tree is the one in reference/dicom-outputs.md §1.2, checked against PixelMed's TID 4000
rules: an image library; per breast an individual impression whose composite feature carries
the breast's probability of cancer; under it, per image, a single-image finding with the
image's probability, centre and outline; then the detection and analysis summaries. The
template is non-extensible, so nothing else goes in (benign scores live in the TID 1500 SRs).

Rendering intent follows the operating point: "Presentation Required" at or above it, "Not for
Presentation" below, so every score is stored without the workstation drawing weak ones. With
no operating point (an uncalibrated model) every item is "Presentation Optional": the data are
there, and whether to draw them is left to the workstation, because we have no threshold that
would justify either demanding or suppressing a mark. The findings summary then reads "with
findings" whenever anything may be presented.

A partial exam (missing views) is not a failed CAD run: the algorithms succeeded on every image
they were given, and TID 4015/4016 only admit "Partially Succeeded" with a "Failed Detections"
entry that references the failed image, which a missing view does not have. So the summaries
read "Succeeded" and the document says partial where the SR IOD provides for it: Completion
Flag PARTIAL with a Completion Flag Description naming the missing views. A breast with one
image gets its single-image finding directly under the impression (a composite feature needs
two targets).
"""

from __future__ import annotations

from collections.abc import Mapping

import pydicom
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    DateContentItem,
    ImageContentItem,
    NumContentItem,
    ScoordContentItem,
    TextContentItem,
)
from highdicom.sr import RelationshipTypeValues as Rel
from highdicom.sr.sop import _SR  # private: highdicom has no TID 4000 class; tests guard it
from pydicom.sr.coding import Code

from models.results import BreastPrediction, ExamPrediction, ImagePrediction

from .common import (
    BREAST_CODE,
    DCM_PROBABILITY_OF_CANCER,
    DEFAULT_OPTIONS,
    UCUM_PERCENT,
    VIEW_CODE,
    OutputKind,
    OutputOptions,
    algorithm_name,
    algorithm_parameters,
    algorithm_version,
    derive_uid,
    equipment,
    header_copy,
    operating_point,
    ordered_images,
    patient_orientation,
    percent,
    region_for,
    series_info,
    source_for,
)

MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"

_REPORT = Code("111036", "DCM", "Mammography CAD Report")
_LANGUAGE = Code("121049", "DCM", "Language of Content Item and Descendants")
_ENGLISH = Code("en-US", "RFC5646", "English (United States)")
_IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
_LATERALITY = Code("111027", "DCM", "Image Laterality")
_VIEW = Code("111031", "DCM", "Image View")
_ORIENTATION_ROW = Code("111044", "DCM", "Patient Orientation Row")
_ORIENTATION_COL = Code("111043", "DCM", "Patient Orientation Column")
_STUDY_DATE = Code("111060", "DCM", "Study Date")
_H_SPACING = Code("111026", "DCM", "Horizontal Pixel Spacing")
_V_SPACING = Code("111066", "DCM", "Vertical Pixel Spacing")
_ROWS = Code("110910", "DCM", "Pixel Data Rows")
_COLUMNS = Code("110911", "DCM", "Pixel Data Columns")
_MM = Code("mm", "UCUM", "millimeter")
_PIXELS = Code("{pixels}", "UCUM", "pixels")

_SUMMARY = Code("111017", "DCM", "CAD Processing and Findings Summary")
_ALL_OK_FINDINGS = Code("111242", "DCM", "All algorithms succeeded; with findings")
_ALL_OK_NONE = Code("111241", "DCM", "All algorithms succeeded; without findings")
_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
_RENDERING_INTENT = Code("111056", "DCM", "Rendering Intent")
PRESENTATION_REQUIRED = Code(
    "111150", "DCM", "Presentation Required: Rendering device is expected to present"
)
PRESENTATION_OPTIONAL = Code("111151", "DCM", "Presentation Optional: Rendering device may present")
NOT_FOR_PRESENTATION = Code(
    "111152", "DCM", "Not for Presentation: Rendering device expected not to present"
)
_COMPOSITE_FEATURE = Code("111015", "DCM", "Composite Feature")
_COMPOSITE_TYPE = Code("111016", "DCM", "Composite Type")
_SPATIALLY_RELATED = Code("111154", "DCM", "Target content items are related spatially")
_SCOPE = Code("111057", "DCM", "Scope of Feature")
_ON_MULTIPLE = Code("111158", "DCM", "Feature detected on multiple images")
_SINGLE_IMAGE_FINDING = Code("111059", "DCM", "Single Image Finding")
# CID 6014; GMIC and the all-conv model give no lesion type, and PixelMed rejects a
# probability on "Selected region" and codes outside CID 6014 (dicom-outputs.md §1.1).
FINDING = Code("129793001", "SCT", "Mammography breast density")
_ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_CENTER = Code("111010", "DCM", "Center")
_OUTLINE = Code("111041", "DCM", "Outline")
_SOURCE = Code("260753009", "SCT", "Source")  # removed from IMAGE items after building

_DETECTIONS = Code("111064", "DCM", "Summary of Detections")
_SUCCESSFUL_DETECTIONS = Code("111063", "DCM", "Successful Detections")
_DETECTION_PERFORMED = Code("111022", "DCM", "Detection Performed")
_ANALYSES = Code("111065", "DCM", "Summary of Analyses")
_SUCCESSFUL_ANALYSES = Code("111062", "DCM", "Successful Analyses")
_ANALYSIS_PERFORMED = Code("111004", "DCM", "Analysis Performed")
_OVERALL_ANALYSIS = Code("111234", "DCM", "Overall Impression / Recommendation Analysis")
_SUCCEEDED = Code("111222", "DCM", "Succeeded")


class MammographyCADSR(_SR):
    """Mammography CAD SR Storage document around a TID 4000 content tree."""

    def __init__(self, evidence, content, **kwargs) -> None:
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=MAMMOGRAPHY_CAD_SR, **kwargs
        )


def build_cad_sr(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> MammographyCADSR:
    """The exam's CAD SR; `sources` needs only headers (SOPInstanceUID → dataset)."""
    headers = {
        i.sop_instance_uid: header_copy(source_for(sources, i.sop_instance_uid))
        for i in exam.images
    }
    builder = _TreeBuilder(exam, headers, operating_point(exam, options))
    root = ContainerContentItem(name=_REPORT, template_id="4000")
    root.ContentSequence = ContentSequence(builder.root_items())
    info = series_info(OutputKind.CAD_SR, exam)
    images = ordered_images(exam)
    sr = MammographyCADSR(
        evidence=[headers[i.sop_instance_uid] for i in images],
        content=root,
        series_instance_uid=derive_uid(exam, "cad_sr", "series", prefix=options.uid_prefix),
        series_number=info.number,
        series_description=info.description,
        sop_instance_uid=derive_uid(exam, "cad_sr", "instance", prefix=options.uid_prefix),
        instance_number=1,
        is_complete=not exam.partial,
        **equipment(exam, options),
    )
    if exam.partial:
        sr.CompletionFlagDescription = "Partial exam: no image analysed for " + ", ".join(
            exam.missing_views
        )
    _unname_images(sr)
    return sr


class _TreeBuilder:
    def __init__(
        self, exam: ExamPrediction, headers: Mapping[str, pydicom.Dataset], threshold: float | None
    ) -> None:
        self.exam = exam
        self.headers = headers
        self.threshold = threshold
        self.images = ordered_images(exam)
        self.regions = {i.sop_instance_uid: region_for(i) for i in self.images}

    def intent(self, p: float) -> Code:
        if self.threshold is None:
            return PRESENTATION_OPTIONAL
        return PRESENTATION_REQUIRED if p >= self.threshold else NOT_FOR_PRESENTATION

    def root_items(self) -> list:
        return [
            CodeContentItem(_LANGUAGE, _ENGLISH, relationship_type=Rel.HAS_CONCEPT_MOD),
            self.image_library(),
            self.findings_summary(),
            self.summary(_DETECTIONS, _SUCCESSFUL_DETECTIONS, _DETECTION_PERFORMED, FINDING),
            self.summary(_ANALYSES, _SUCCESSFUL_ANALYSES, _ANALYSIS_PERFORMED, _OVERALL_ANALYSIS),
        ]

    # -- TID 4020 ------------------------------------------------------------------------

    def image_library(self) -> ContainerContentItem:
        library = ContainerContentItem(_IMAGE_LIBRARY, relationship_type=Rel.CONTAINS)
        library.ContentSequence = ContentSequence([self.library_entry(i) for i in self.images])
        return library

    def library_entry(self, img: ImagePrediction) -> ImageContentItem:
        ds = self.headers[img.sop_instance_uid]
        item = self.image_ref(img, Rel.CONTAINS)
        ctx = Rel.HAS_ACQ_CONTEXT
        context = [
            CodeContentItem(_LATERALITY, BREAST_CODE[img.laterality], relationship_type=ctx),
            CodeContentItem(_VIEW, VIEW_CODE[img.view], relationship_type=ctx),
        ]
        orientation = patient_orientation(ds)
        if orientation is not None:
            context += [
                TextContentItem(_ORIENTATION_ROW, orientation[0], relationship_type=ctx),
                TextContentItem(_ORIENTATION_COL, orientation[1], relationship_type=ctx),
            ]
        if ds.get("StudyDate"):
            context.append(DateContentItem(_STUDY_DATE, ds.StudyDate, relationship_type=ctx))
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        if spacing:
            context += [
                NumContentItem(_H_SPACING, float(spacing[1]), _MM, relationship_type=ctx),
                NumContentItem(_V_SPACING, float(spacing[0]), _MM, relationship_type=ctx),
            ]
        context += [
            NumContentItem(_ROWS, int(ds.Rows), _PIXELS, relationship_type=ctx),
            NumContentItem(_COLUMNS, int(ds.Columns), _PIXELS, relationship_type=ctx),
        ]
        item.ContentSequence = ContentSequence(context)
        return item

    def image_ref(self, img: ImagePrediction, rel: Rel) -> ImageContentItem:
        ds = self.headers[img.sop_instance_uid]
        return ImageContentItem(_SOURCE, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type=rel)

    # -- TID 4001 / 4003 / 4004 / 4006 -----------------------------------------------------

    def findings_summary(self) -> CodeContentItem:
        impressions = [self.impression(b) for b in self.exam.breasts]
        intents = [self.intent(b.malignant) for b in self.exam.breasts]
        intents += [self.intent(i.malignant) for i in self.images]
        findings = any(code != NOT_FOR_PRESENTATION for code in intents)
        value = _ALL_OK_FINDINGS if findings else _ALL_OK_NONE
        summary = CodeContentItem(_SUMMARY, value, relationship_type=Rel.CONTAINS)
        summary.ContentSequence = ContentSequence(impressions)
        return summary

    def impression(self, breast: BreastPrediction) -> ContainerContentItem:
        own = [i for i in self.images if i.sop_instance_uid in breast.sop_instance_uids]
        if len(own) > 1:
            feature = self.composite_feature(breast, own)
        else:
            feature = self.single_image_finding(own[0], Rel.CONTAINS)
        item = ContainerContentItem(_IMPRESSION, relationship_type=Rel.INFERRED_FROM)
        item.ContentSequence = ContentSequence(
            [
                CodeContentItem(
                    _RENDERING_INTENT,
                    self.intent(breast.malignant),
                    relationship_type=Rel.HAS_CONCEPT_MOD,
                ),
                feature,
            ]
        )
        return item

    def composite_feature(
        self, breast: BreastPrediction, own: list[ImagePrediction]
    ) -> CodeContentItem:
        """TID 4004: the breast's score over its CC and MLO findings."""
        props = Rel.HAS_PROPERTIES
        children = [
            CodeContentItem(
                _RENDERING_INTENT,
                self.intent(breast.malignant),
                relationship_type=Rel.HAS_CONCEPT_MOD,
            ),
            CodeContentItem(_COMPOSITE_TYPE, _SPATIALLY_RELATED, relationship_type=props),
            CodeContentItem(_SCOPE, _ON_MULTIPLE, relationship_type=props),
            *self.algorithm(props),
            self.probability(breast.malignant),
            *(self.point(_CENTER, i, Rel.INFERRED_FROM) for i in own),
            *(self.single_image_finding(i) for i in own),
        ]
        feature = CodeContentItem(_COMPOSITE_FEATURE, FINDING, relationship_type=Rel.CONTAINS)
        feature.ContentSequence = ContentSequence(children)
        return feature

    def single_image_finding(
        self, img: ImagePrediction, rel: Rel = Rel.INFERRED_FROM
    ) -> CodeContentItem:
        props = Rel.HAS_PROPERTIES
        children = [
            CodeContentItem(
                _RENDERING_INTENT, self.intent(img.malignant), relationship_type=Rel.HAS_CONCEPT_MOD
            ),
            *self.algorithm(props),
            self.probability(img.malignant),
            self.point(_CENTER, img, props),
            self.outline(img),
        ]
        finding = CodeContentItem(_SINGLE_IMAGE_FINDING, FINDING, relationship_type=rel)
        finding.ContentSequence = ContentSequence(children)
        return finding

    def algorithm(self, rel: Rel) -> list[TextContentItem]:
        """TID 4019: name, version, and as parameters the members, the clinical-use label and
        the numeric precision the scores were computed at (bf16 scores differ from fp32)."""
        parameters = f"{algorithm_parameters(self.exam)}; precision {self.exam.precision}"
        return [
            TextContentItem(_ALGORITHM_NAME, algorithm_name(self.exam), relationship_type=rel),
            TextContentItem(
                _ALGORITHM_VERSION, algorithm_version(self.exam), relationship_type=rel
            ),
            TextContentItem(_ALGORITHM_PARAMETERS, parameters, relationship_type=rel),
        ]

    def probability(self, p: float) -> NumContentItem:
        return NumContentItem(
            DCM_PROBABILITY_OF_CANCER,
            percent(p),
            UCUM_PERCENT,
            relationship_type=Rel.HAS_PROPERTIES,
        )

    def point(self, name: Code, img: ImagePrediction, rel: Rel) -> ScoordContentItem:
        region = self.regions[img.sop_instance_uid]
        return self.scoord(name, "POINT", region.center_xy(), img, rel)

    def outline(self, img: ImagePrediction) -> ScoordContentItem:
        region = self.regions[img.sop_instance_uid]
        return self.scoord(_OUTLINE, "POLYLINE", region.outline_xy(), img, Rel.HAS_PROPERTIES)

    def scoord(self, name, graphic_type, data, img, rel) -> ScoordContentItem:
        item = ScoordContentItem(name, graphic_type, data, relationship_type=rel)
        item.ContentSequence = ContentSequence([self.image_ref(img, Rel.SELECTED_FROM)])
        return item

    # -- TID 4015 / 4016 -------------------------------------------------------------------

    def summary(self, name: Code, container: Code, performed: Code, value: Code) -> CodeContentItem:
        done = CodeContentItem(performed, value, relationship_type=Rel.CONTAINS)
        done.ContentSequence = ContentSequence(
            [
                *self.algorithm(Rel.HAS_PROPERTIES),
                *(self.image_ref(i, Rel.HAS_PROPERTIES) for i in self.images),
            ]
        )
        successful = ContainerContentItem(container, relationship_type=Rel.INFERRED_FROM)
        successful.ContentSequence = ContentSequence([done])
        item = CodeContentItem(name, _SUCCEEDED, relationship_type=Rel.CONTAINS)
        item.ContentSequence = ContentSequence([successful])
        return item


def _unname_images(sr: pydicom.Dataset) -> None:
    """TID 4020/4021 IMAGE items have no concept name; highdicom insists on one while
    building, so it is removed from the finished document."""

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "IMAGE" and "ConceptNameCodeSequence" in item:
                del item.ConceptNameCodeSequence
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
