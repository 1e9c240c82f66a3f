"""What every result object shares: deterministic UIDs, series numbering, equipment and
algorithm identification, the "not for clinical use" label and coded concepts. The one region
per image that the SRs and the heat-map all draw is the prediction's own
(`ImagePrediction.region`).

Codes are spelled out here rather than taken from pydicom's dictionary: some of its meanings
carry zero-width spaces ("Impression/\\u200bRecommendation") that end up in the objects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from models.mammogram import SCREENING_VIEW_KEYS, Laterality, View
from models.results import ExamPrediction, ImagePrediction, ModelInfo

from .. import __version__

MANUFACTURER = "mammo-ai-plugin"
MODEL_NAME = "mammo-ai-plugin"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

T = TypeVar("T")
D = TypeVar("D", bound=pydicom.Dataset)


class OutputKind(StrEnum):
    CAD_SR = "cad_sr"
    """Mammography CAD SR (TID 4000): what mammography workstations read."""
    TID1500 = "tid1500"
    """Comprehensive SR, TID 1500 with TID 1410 groups only: boxes + scores OHIF/Stone draw."""
    TID1500_SCORES = "tid1500_scores"
    """Comprehensive SR with TID 1501 groups (image, breast, exam, benign scores) for
    machines; OHIF's SR viewport fails on such groups, hence a separate, optional object."""
    SEG = "seg"
    """Fractional (probability) SEG per source image: the saliency maps, lossless."""
    SC = "sc"
    """Secondary Capture heat-map per source image, scores burned in: any viewer shows it."""
    LABELMAP_SEG = "labelmap_seg"
    """Binary SEG per source image: the region at or above the display threshold, with the
    nominal plane geometry OHIF needs to overlay it (OHIF cannot show the fractional SEG)."""


@dataclass(frozen=True)
class SeriesInfo:
    number: int
    description: str


_SERIES: dict[OutputKind, SeriesInfo] = {
    OutputKind.CAD_SR: SeriesInfo(9001, "AI mammography CAD report"),
    OutputKind.TID1500: SeriesInfo(9002, "AI regions and scores"),
    OutputKind.TID1500_SCORES: SeriesInfo(9003, "AI scores (machine-readable)"),
    OutputKind.SEG: SeriesInfo(9004, "AI saliency maps (segmentation)"),
    OutputKind.SC: SeriesInfo(9005, "AI heat-map"),
    OutputKind.LABELMAP_SEG: SeriesInfo(9006, "AI region overlay"),
}


@dataclass(frozen=True)
class ResultObject:
    """A built result object and what it is, so that nothing downstream (file names,
    routing, the store) has to read its kind or source back from the data set."""

    kind: OutputKind
    dataset: pydicom.Dataset
    source_sop_instance_uid: str | None = None
    """The image a per-view object (SEG, SC, labelmap SEG) was made from; None for the
    exam-level SRs."""


@dataclass(frozen=True)
class OutputOptions:
    """Site choices that change the objects; the defaults need no configuration."""

    uid_prefix: str | None = None
    """The site's UID root ("1.2.3.", with the trailing dot); None uses pydicom's root."""
    operating_point: float | None = None
    """Overrides the models' operating point (probability, 0–1) for rendering intents."""


DEFAULT_OPTIONS = OutputOptions()


# -- coded concepts ---------------------------------------------------------------------------

SCT_RIGHT_BREAST = Code("73056007", "SCT", "Right breast")
SCT_LEFT_BREAST = Code("80248007", "SCT", "Left breast")
SCT_BREAST = Code("76752008", "SCT", "Breast")
SCT_LEFT = Code("7771000", "SCT", "Left")
SCT_RIGHT = Code("24028007", "SCT", "Right")
SCT_CC = Code("399162004", "SCT", "cranio-caudal")
SCT_MLO = Code("399368009", "SCT", "medio-lateral oblique")
DCM_PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
UCUM_PERCENT = Code("%", "UCUM", "percent")
DCM_AI = Code("123110", "DCM", "Artificial Intelligence")

BREAST_CODE = {Laterality.RIGHT: SCT_RIGHT_BREAST, Laterality.LEFT: SCT_LEFT_BREAST}
SIDE_CODE = {Laterality.RIGHT: SCT_RIGHT, Laterality.LEFT: SCT_LEFT}
VIEW_CODE = {View.CC: SCT_CC, View.MLO: SCT_MLO}
BREAST_NAME = {Laterality.RIGHT: "right breast", Laterality.LEFT: "left breast"}


def concept(code: Code | hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    """highdicom's `CodedConcept` for `code`, built once per code and then shared: a report
    names a few dozen concepts hundreds of times, and building one costs about as much as the
    content item that carries it. Shared by every document, so never modify one."""
    if isinstance(code, hd.sr.CodedConcept):
        return code
    return _concept(*code)


@functools.cache
def _concept(value: str, scheme: str, meaning: str, version: str | None) -> hd.sr.CodedConcept:
    # Keyed by all four fields: pydicom's Code equality ignores the meaning.
    return hd.sr.CodedConcept(value, scheme, meaning, version)


# -- identity -----------------------------------------------------------------------------------


def derive_uid(exam: ExamPrediction, *purpose: str, prefix: str | None = None) -> UID:
    """A UID fixed by the exam's input instances, the model names and versions, and what the
    UID is for: re-running the same exam with the same models yields the same objects."""
    sources = sorted(img.sop_instance_uid for img in exam.images)
    models = [f"{m.name}\x00{m.version}" for m in exam.models]
    entropy = [MANUFACTURER, exam.study_instance_uid, *sources, *models, *purpose]
    return generate_uid(prefix=prefix or pydicom.uid.PYDICOM_ROOT_UID, entropy_srcs=entropy)


def series_info(kind: OutputKind, exam: ExamPrediction) -> SeriesInfo:
    info = _SERIES[kind]
    if exam.clinical_use:
        return info
    return SeriesInfo(info.number, f"{NOT_FOR_CLINICAL_USE} - {info.description}")


IHE_PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")
"""IHE AI Results (AIR) Purpose of Reference for an algorithm that contributed to an object."""


def equipment(exam: ExamPrediction, options: OutputOptions = DEFAULT_OPTIONS) -> dict[str, object]:
    """General Equipment attributes naming this software (keyword arguments of highdicom's
    SOP classes), and IHE AIR Contributing Equipment: one item per algorithm."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": __version__,
        "contributing_equipment": contributing_algorithms(exam, options),
    }


def contributing_algorithms(
    exam: ExamPrediction, options: OutputOptions = DEFAULT_OPTIONS
) -> list[hd.ContributingEquipment]:
    """Per IHE AIR, each ensemble member and then the ensemble itself as a "Processing
    Algorithm", with a Device UID that names the exact model: derived from the model file's
    sha256, so a retrained model gets a new one even under an unchanged name and version."""
    items = []
    count = len(exam.models)
    for n, m in enumerate(exam.models, start=1):
        use = "validated for clinical use" if m.clinical_use else NOT_FOR_CLINICAL_USE.lower()
        items.append(
            _algorithm_item(
                model_name=_limit(m.name, 64),
                versions=[_limit(m.version, 64)],
                description=_limit(f"{m.family} model, ensemble member {n} of {count}; {use}", 64),
                device_uid=model_device_uid(m, options),
            )
        )
    items.append(
        _algorithm_item(
            model_name=_limit(f"{MODEL_NAME} ensemble", 64),
            versions=[__version__],
            description=_limit(f"mean of {count} member probabilities and maps", 64),
            device_uid=ensemble_device_uid(exam, options),
        )
    )
    return items


def ensemble_device_uid(exam: ExamPrediction, options: OutputOptions = DEFAULT_OPTIONS) -> UID:
    """The ensemble's AIR Device UID (also the SR observer device): its members' Device
    UIDs and this software's version, which implements the combination."""
    members = [model_device_uid(m, options) for m in exam.models]
    return _uid(["ensemble", __version__, *members], options)


def model_device_uid(model: ModelInfo, options: OutputOptions = DEFAULT_OPTIONS) -> UID:
    """The member's AIR Device UID: from its file's content hash (name, family and version
    only for a model that was not loaded from a file)."""
    if model.file_sha256:
        return _uid(["model file", model.file_sha256], options)
    return _uid(["model", model.family, model.name, model.version], options)


def _uid(entropy: list[str], options: OutputOptions) -> UID:
    prefix = options.uid_prefix or pydicom.uid.PYDICOM_ROOT_UID
    return generate_uid(prefix=prefix, entropy_srcs=[MANUFACTURER, "device", *entropy])


def _algorithm_item(
    *, model_name: str, versions: list[str], description: str, device_uid: UID
) -> hd.ContributingEquipment:
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
        manufacturer_model_name=model_name,
        software_versions=versions,
        contribution_description=description,
    )
    # highdicom admits only CID 7005 purposes and has no Device UID argument; both are
    # plain attributes of SOP Common's Contributing Equipment Sequence.
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(IHE_PROCESSING_ALGORITHM)]
    item.DeviceUID = device_uid
    return item


def algorithm_name(exam: ExamPrediction) -> str:
    return _limit(" + ".join(m.name for m in exam.models), 64, f"ensemble of {len(exam.models)}")


def algorithm_version(exam: ExamPrediction) -> str:
    return _limit(" + ".join(m.version for m in exam.models), 64, __version__)


def algorithm_parameters(exam: ExamPrediction) -> str:
    """Every member, and the clinical-use label where it applies (TID 4019 Algorithm
    Parameters is the one free-text slot the non-extensible CAD SR template offers)."""
    members = "; ".join(_describe_model(m) for m in exam.models)
    text = f"ensemble of {len(exam.models)} model(s): {members}; {MANUFACTURER} {__version__}"
    return text if exam.clinical_use else f"{NOT_FOR_CLINICAL_USE}. {text}"


def _describe_model(m: ModelInfo) -> str:
    op = "none" if m.operating_point is None else f"{m.operating_point:.4g}"
    use = "validated for clinical use" if m.clinical_use else "not validated for clinical use"
    return f"{m.name} {m.version} ({m.family}, operating point {op}, {use})"


def segment_algorithm(
    exam: ExamPrediction, display_threshold: float | None = None
) -> hd.AlgorithmIdentificationSequence:
    """The segments' algorithm; `display_threshold` (the map value from which a viewer colours)
    is written first in Algorithm Parameters, "display_threshold=0.5,models=…", where the
    Orthanc overlay viewer reads it."""
    parameters = (
        {} if display_threshold is None else {"display_threshold": f"{display_threshold:.4g}"}
    )
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(exam),
        family=DCM_AI,
        version=algorithm_version(exam),
        source=MANUFACTURER,
        parameters={**parameters, "models": algorithm_parameters(exam)},
    )


def sr_algorithm(exam: ExamPrediction) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(exam),
        version=algorithm_version(exam),
        parameters=[algorithm_parameters(exam)],
    )


def _limit(text: str, n: int, fallback: str | None = None) -> str:
    if len(text) <= n:
        return text
    return fallback if fallback is not None else text[: n - 1] + "…"


# -- rendering threshold --------------------------------------------------------------------


def operating_point(exam: ExamPrediction, options: OutputOptions) -> float | None:
    """The malignancy threshold for "present this finding": the site's override, else the
    members' mean operating point (the ensemble averages their probabilities), else None when
    any member has none, since a threshold invented for an uncalibrated member means
    nothing."""
    if options.operating_point is not None:
        return options.operating_point
    points = [m.operating_point for m in exam.models]
    if not points or any(p is None for p in points):
        return None
    return float(np.mean(points))


# -- sources ------------------------------------------------------------------------------------


def source_for(sources: Mapping[str, pydicom.Dataset], sop_instance_uid: str) -> pydicom.Dataset:
    try:
        return sources[sop_instance_uid]
    except KeyError:
        raise ValueError(
            "the source image of a prediction is missing from `sources` (keyed by "
            "SOPInstanceUID); pass every analysed image's dataset"
        ) from None


def header_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source's header without pixel data (what SR evidence and SEG sources need)."""
    out = pydicom.Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            continue
        out.add(elem)
    out.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    return out


def comprehensive_sr(
    evidence: Sequence[pydicom.Dataset], content: hd.sr.ContentSequence, **kwargs: Any
) -> pydicom.Dataset:
    """A Comprehensive SR document around `content` (one root container, e.g. a `Template`)
    built by highdicom's public `ComprehensiveSR` (`kwargs` are its arguments), returned as a
    plain pydicom `Dataset` whose content tree is `content`'s own, not a copy.

    Given a whole tree, `ComprehensiveSR` deep-copies it, parses the copy back into content
    items and searches the tree three times (SCOORD3D items, IMAGE and COMPOSITE references):
    most of the time a report takes, to check what our builders guarantee (no SCOORD3D in a
    Comprehensive SR; only evidence referenced). Of `content` the document keeps the root's
    attributes, and the evidence sequences depend on `evidence` alone (every instance is
    recorded, referenced or not). So `ComprehensiveSR` gets the root without its children and
    the tree joins the document afterwards: the same document, byte for byte (tests check).
    It is a plain `Dataset` because a `ComprehensiveSR`'s `content` would hold the bare root;
    `highdicom.sr.ComprehensiveSR.from_dataset` gives the full object back where one is wanted.
    """
    (root,) = content
    bare = pydicom.Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            bare.add(elem)
    bare.ContentSequence = []  # ComprehensiveSR searches it
    document = hd.sr.ComprehensiveSR(evidence=evidence, content=bare, **kwargs)
    sr = pydicom.Dataset(document)
    sr.preamble = document.preamble
    sr.file_meta = document.file_meta
    sr.ContentSequence = root.ContentSequence
    return sr


def per_image(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    build: Callable[[ExamPrediction, ImagePrediction, pydicom.Dataset, int, T], D],
    options: T,
) -> list[D]:
    """`build(exam, image, source, instance_number, options)` for each image in hanging
    order, numbered from 1: the per-view objects (SEG, SC) of one exam."""
    return [
        build(exam, img, source_for(sources, img.sop_instance_uid), n, options)
        for n, img in enumerate(ordered_images(exam), start=1)
    ]


def patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(value):
        return None
    return (str(value[0]), str(value[1]))


def check_on_source_grid(img: ImagePrediction, rows: int, cols: int) -> None:
    """Maps must lie on their source image's grid (`Geometry.map_to_source`); both maps share
    one shape (`ImagePrediction` checks)."""
    if img.malignant_map is None:
        raise ValueError(
            f"the prediction of {img.view_key} has no maps (ImagePrediction.without_maps); "
            "per-view objects are built from the ensemble's prediction itself"
        )
    if img.malignant_map.shape != (rows, cols):
        m_rows, m_cols = img.malignant_map.shape
        raise ValueError(
            f"saliency map of {img.view_key} is {m_rows}x{m_cols} but its source image is "
            f"{rows}x{cols}; maps must be on the source grid (Geometry.map_to_source)"
        )


def ordered_images(exam: ExamPrediction) -> list[ImagePrediction]:
    """R-CC, L-CC, R-MLO, L-MLO: the hanging order readers expect."""
    return sorted(exam.images, key=lambda i: SCREENING_VIEW_KEYS.index(i.view_key))


def percent(p: float) -> float:
    return round(100.0 * float(p), 2)
