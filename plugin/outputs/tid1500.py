"""TID 1500 Measurement Reports in Comprehensive SR (dicom-outputs.md §2).

`build_tid1500` is the viewer-friendly report: per image one TID 1410 group with a closed
outline and the probability of cancer, which OHIF draws and Orthanc Stone reads (Stone needs
Comprehensive SR, TID 1410 only, and the region's image named "Original Source").

`build_tid1500_scores` is for machines: TID 1501 groups per image, breast and exam with the
malignant and benign probabilities and each member model's score. OHIF's SR viewport fails on
TID 1501 groups (no region), which is why these never share a document with the viewer's.

Both are plain pydicom datasets made by `common.comprehensive_sr` (highdicom's public
`ComprehensiveSR` without its copy and searches of the tree);
`highdicom.sr.ComprehensiveSR.from_dataset` reads one back as highdicom's object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from models.mammogram import Laterality
from models.results import ExamPrediction, ModelInfo

from .common import (
    DCM_PROBABILITY_OF_CANCER,
    DEFAULT_OPTIONS,
    MANUFACTURER,
    MODEL_NAME,
    SCT_BREAST,
    SIDE_CODE,
    UCUM_PERCENT,
    OutputKind,
    OutputOptions,
    algorithm_name,
    comprehensive_sr,
    concept,
    derive_uid,
    ensemble_device_uid,
    equipment,
    ordered_images,
    percent,
    series_info,
    source_for,
    sr_algorithm,
)

_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")  # CID 100 (PixelMed-clean)
_ORIGINAL_SOURCE = Code("111040", "DCM", "Original Source")
_BOTH_SIDES = Code("51440002", "SCT", "Right and left")
_DEVICE = Code("121007", "DCM", "Device")

PRIVATE_SCHEME = "99MAMMOAI"
PROBABILITY_OF_BENIGN = Code("BENIGNPROB", PRIVATE_SCHEME, "Probability of benign finding")
"""No standard concept exists for a benign probability; declared in CodingSchemeIdentification."""


def build_tid1500(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> pydicom.Dataset:
    """Per image: closed outline + probability of cancer, breast site with laterality."""
    headers = _headers(exam, sources)
    groups = []
    for img in ordered_images(exam):
        ds = headers[img.sop_instance_uid]
        key = img.view_key
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derive_uid(exam, "tid1500", "tracking", key, prefix=options.uid_prefix),
                    identifier=f"{key} AI region",
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=img.region.outline_xy(),
                    source_image=_original_source(ds),
                ),
                algorithm_id=sr_algorithm(exam),
                finding_sites=[_site(img.laterality)],
                measurements=[_probability(img.malignant)],
            )
        )
    report = _report(exam, headers, groups, options)
    return _document(exam, headers, report, OutputKind.TID1500, options)


def build_tid1500_scores(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> pydicom.Dataset:
    """Image, breast and exam scores (malignant, benign, per member) as TID 1501 groups."""
    headers = _headers(exam, sources)
    members = {m.name: m for m in exam.models}

    def group(key: str, site: hd.sr.FindingSite, uids: Sequence[str], measurements):
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(exam, "scores", "tracking", key, prefix=options.uid_prefix),
                identifier=f"{key} AI scores",
            ),
            algorithm_id=sr_algorithm(exam),
            finding_sites=[site],
            measurements=measurements,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup.from_source_image(headers[u]) for u in uids
            ],
        )

    def regions(uids: Sequence[str]) -> list[hd.sr.CoordinatesForMeasurement]:
        """The score's image regions (INFERRED FROM): what it was derived from, and what
        keeps OHIF 3.13 from crashing on a measurement group without coordinates."""
        return [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=exam.image(u).region.outline_xy(),
                source_image=hd.sr.SourceImageForRegion.from_source_image(headers[u]),
            )
            for u in uids
        ]

    groups = []
    for img in ordered_images(exam):
        measurements = [
            _probability(img.malignant, regions=regions([img.sop_instance_uid])),
            *_benign(img.benign),
        ]
        measurements += [
            _probability(p, _member_algorithm(members[name]))
            for name, p in sorted(img.per_model.items())
            if name in members and len(members) > 1
        ]
        groups.append(
            group(img.view_key, _site(img.laterality), [img.sop_instance_uid], measurements)
        )
    for breast in exam.breasts:
        groups.append(
            group(
                f"{breast.laterality} breast",
                _site(breast.laterality),
                breast.sop_instance_uids,
                [
                    _probability(breast.malignant, regions=regions(breast.sop_instance_uids)),
                    *_benign(breast.benign),
                ],
            )
        )
    groups.append(
        group(
            "exam",
            hd.sr.FindingSite(concept(SCT_BREAST), laterality=concept(_BOTH_SIDES)),
            [i.sop_instance_uid for i in ordered_images(exam)],
            [
                _probability(
                    exam.malignant,
                    regions=regions([i.sop_instance_uid for i in ordered_images(exam)]),
                ),
                *_benign(exam.benign),
            ],
        )
    )
    report = _report(exam, headers, groups, options)
    return _document(
        exam,
        headers,
        report,
        OutputKind.TID1500_SCORES,
        options,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                PRIVATE_SCHEME,
                name="mammo-ai-plugin private concepts",
                responsible_organization=MANUFACTURER,
            )
        ],
    )


def _headers(exam: ExamPrediction, sources: Mapping[str, pydicom.Dataset]):
    """The evidence: the sources themselves, only read (a header copy without the pixel data
    would give the same document; highdicom copies attributes, not pixels, from evidence)."""
    return {i.sop_instance_uid: source_for(sources, i.sop_instance_uid) for i in exam.images}


def _report(exam, headers, groups, options: OutputOptions) -> hd.sr.MeasurementReport:
    observer = hd.sr.ObserverContext(
        observer_type=concept(_DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ensemble_device_uid(exam, options),
            name=algorithm_name(exam),
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=concept(_IMAGING_PROCEDURE),
        imaging_measurements=groups,
        referenced_images=[headers[i.sop_instance_uid] for i in ordered_images(exam)],
    )


def _document(exam, headers, report, kind: OutputKind, options: OutputOptions, **extra):
    info = series_info(kind, exam)
    return comprehensive_sr(
        [headers[i.sop_instance_uid] for i in ordered_images(exam)],
        report,
        series_instance_uid=derive_uid(exam, kind.value, "series", prefix=options.uid_prefix),
        series_number=info.number,
        series_description=info.description,
        sop_instance_uid=derive_uid(exam, kind.value, "instance", prefix=options.uid_prefix),
        instance_number=1,
        is_complete=not exam.partial,
        **equipment(exam, options),
        **extra,
    )


def _site(laterality: Laterality) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(concept(SCT_BREAST), laterality=concept(SIDE_CODE[laterality]))


def _probability(
    p: float,
    algorithm: hd.sr.AlgorithmIdentification | None = None,
    regions: Sequence[hd.sr.CoordinatesForMeasurement] | None = None,
):
    return hd.sr.Measurement(
        concept(DCM_PROBABILITY_OF_CANCER),
        percent(p),
        concept(UCUM_PERCENT),
        algorithm_id=algorithm,
        referenced_coordinates=regions or None,
    )


def _benign(p: float | None) -> list[hd.sr.Measurement]:
    if p is None:
        return []
    return [hd.sr.Measurement(concept(PROBABILITY_OF_BENIGN), percent(p), concept(UCUM_PERCENT))]


def _member_algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _original_source(image: pydicom.Dataset) -> hd.sr.SourceImageForRegion:
    """The region's image named "Original Source", the only name under which Orthanc Stone
    reads a region (highdicom writes "Source"; PixelMed's TID 1500 rules accept both)."""
    source = hd.sr.SourceImageForRegion.from_source_image(image)
    source.ConceptNameCodeSequence = [concept(_ORIGINAL_SOURCE)]
    return source
