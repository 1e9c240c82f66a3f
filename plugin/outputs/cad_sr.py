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

This module maps an `ExamPrediction` onto the templates; the templates themselves, and the
SOP instance built through highdicom's public API only, are in `cad_templates`.
"""

from __future__ import annotations

from collections.abc import Mapping

import pydicom
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom.sr.coding import Code

from models.results import BreastPrediction, ExamPrediction, ImagePrediction

from .cad_templates import (
    CADAlgorithmIdentification,
    CompositeFeature,
    ImageLibraryEntry,
    IndividualImpression,
    MammographyCADReport,
    MammographyCADSR,
    OverallImpression,
    SingleImageFinding,
    SummaryOfAnalyses,
    SummaryOfDetections,
)
from .common import (
    BREAST_CODE,
    DEFAULT_OPTIONS,
    VIEW_CODE,
    OutputKind,
    OutputOptions,
    algorithm_name,
    algorithm_parameters,
    algorithm_version,
    derive_uid,
    equipment,
    operating_point,
    ordered_images,
    patient_orientation,
    percent,
    series_info,
    source_for,
)

_ALL_OK_FINDINGS = Code("111242", "DCM", "All algorithms succeeded; with findings")
_ALL_OK_NONE = Code("111241", "DCM", "All algorithms succeeded; without findings")
PRESENTATION_REQUIRED = Code(
    "111150", "DCM", "Presentation Required: Rendering device is expected to present"
)
PRESENTATION_OPTIONAL = Code("111151", "DCM", "Presentation Optional: Rendering device may present")
NOT_FOR_PRESENTATION = Code(
    "111152", "DCM", "Not for Presentation: Rendering device expected not to present"
)
_SPATIALLY_RELATED = Code("111154", "DCM", "Target content items are related spatially")
_ON_MULTIPLE = Code("111158", "DCM", "Feature detected on multiple images")
# CID 6014; GMIC and the all-conv model give no lesion type, and PixelMed rejects a
# probability on "Selected region" and codes outside CID 6014 (dicom-outputs.md §1.1).
FINDING = Code("129793001", "SCT", "Mammography breast density")
_OVERALL_ANALYSIS = Code("111234", "DCM", "Overall Impression / Recommendation Analysis")


def build_cad_sr(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> MammographyCADSR:
    """The exam's CAD SR; `sources` needs only headers (SOPInstanceUID → dataset), which it
    reads and does not change."""
    headers = {i.sop_instance_uid: source_for(sources, i.sop_instance_uid) for i in exam.images}
    content = _ReportBuilder(exam, headers, operating_point(exam, options)).report()
    info = series_info(OutputKind.CAD_SR, exam)
    sr = MammographyCADSR(
        evidence=[headers[i.sop_instance_uid] for i in ordered_images(exam)],
        content=content,
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
    return sr


class _ReportBuilder:
    def __init__(
        self, exam: ExamPrediction, headers: Mapping[str, pydicom.Dataset], threshold: float | None
    ) -> None:
        self.exam = exam
        self.headers = headers
        self.threshold = threshold
        self.images = ordered_images(exam)

    def report(self) -> MammographyCADReport:
        headers = [self.headers[i.sop_instance_uid] for i in self.images]
        return MammographyCADReport(
            image_library=[self.library_entry(i) for i in self.images],
            overall_impression=self.overall_impression(),
            detections=SummaryOfDetections(FINDING, self.algorithm(), headers),
            analyses=SummaryOfAnalyses(_OVERALL_ANALYSIS, self.algorithm(), headers),
        )

    def intent(self, p: float) -> Code:
        if self.threshold is None:
            return PRESENTATION_OPTIONAL
        return PRESENTATION_REQUIRED if p >= self.threshold else NOT_FOR_PRESENTATION

    def library_entry(self, img: ImagePrediction) -> ImageLibraryEntry:
        ds = self.headers[img.sop_instance_uid]
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        return ImageLibraryEntry(
            ds,
            BREAST_CODE[img.laterality],
            VIEW_CODE[img.view],
            patient_orientation=patient_orientation(ds),
            study_date=ds.get("StudyDate") or None,
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        )

    def overall_impression(self) -> OverallImpression:
        intents = [self.intent(b.malignant) for b in self.exam.breasts]
        intents += [self.intent(i.malignant) for i in self.images]
        findings = any(code != NOT_FOR_PRESENTATION for code in intents)
        return OverallImpression(
            _ALL_OK_FINDINGS if findings else _ALL_OK_NONE,
            [self.impression(b) for b in self.exam.breasts],
        )

    def impression(self, breast: BreastPrediction) -> IndividualImpression:
        own = [i for i in self.images if i.sop_instance_uid in breast.sop_instance_uids]
        if len(own) > 1:
            feature = self.composite_feature(breast, own)
        else:
            feature = self.single_image_finding(own[0], Rel.CONTAINS)
        return IndividualImpression(self.intent(breast.malignant), feature)

    def composite_feature(
        self, breast: BreastPrediction, own: list[ImagePrediction]
    ) -> CompositeFeature:
        """The breast's score over its CC and MLO findings."""
        return CompositeFeature(
            FINDING,
            self.intent(breast.malignant),
            _SPATIALLY_RELATED,
            _ON_MULTIPLE,
            self.algorithm(),
            centers=[(i.region.center_xy(), self.headers[i.sop_instance_uid]) for i in own],
            findings=[self.single_image_finding(i) for i in own],
            probability_of_cancer=percent(breast.malignant),
        )

    def single_image_finding(
        self, img: ImagePrediction, rel: Rel = Rel.INFERRED_FROM
    ) -> SingleImageFinding:
        return SingleImageFinding(
            FINDING,
            self.intent(img.malignant),
            self.algorithm(),
            self.headers[img.sop_instance_uid],
            center=img.region.center_xy(),
            outline=img.region.outline_xy(),
            probability_of_cancer=percent(img.malignant),
            relationship_type=rel,
        )

    def algorithm(self) -> CADAlgorithmIdentification:
        """Name, version, and as parameters the members, the clinical-use label and the
        numeric precision the scores were computed at (bf16 scores differ from fp32)."""
        return CADAlgorithmIdentification(
            algorithm_name(self.exam),
            algorithm_version(self.exam),
            [f"{algorithm_parameters(self.exam)}; precision {self.exam.precision}"],
        )
