"""Mammography header facts: what a DICOM header says an instance is, without decoding pixels.

`describe` answers three ways, so the exam grouper can classify an instance from its header:

- it returns an `ImageDescription` with `screening_view` True: a For Presentation L/R CC/MLO
  with no view modifier, which the models analyse;
- it returns one with `screening_view` False and `not_screening_reason` set: a recognised
  mammography object that is not a screening view (For Processing, tomosynthesis, synthetic 2D,
  ML/LM/XCCL…, spot or magnification, implant-displaced, partial view, both breasts);
- it raises a `MammogramError` subclass: the header is broken (no laterality, a view nobody
  knows, values that contradict each other, not a mammogram at all) and the message says which
  tag holds what and how to fix it.

An `ImageDescription` is what the service stores for each received instance (`to_json`) and
reads back for view selection (`from_json`): one typed record from listener to exam grouper.
The window and rescale are recorded in `ImageDescription.voi` for those who render images; the
pixels the models get (`models.pixels`) carry neither.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom import uid as uids
from pydicom.uid import UID

from .mammogram import ImageKind, Laterality, MammogramError, View, view_key

# ---------------------------------------------------------------------------------------------
# Errors


class NotAMammogramError(MammogramError):
    """The object is not a mammography image (another SOP class or modality)."""


class MissingLateralityError(MammogramError):
    """No usable laterality in the header."""


class UnknownViewError(MammogramError):
    """The view is missing or is not one of the mammography views (CID 4014)."""


class ContradictoryHeaderError(MammogramError):
    """Two attributes of the header disagree."""


# ---------------------------------------------------------------------------------------------
# Codes (reference: integration-anchors §5)

MG_FOR_PRESENTATION = uids.DigitalMammographyXRayImageStorageForPresentation
MG_FOR_PROCESSING = uids.DigitalMammographyXRayImageStorageForProcessing
BREAST_TOMOSYNTHESIS = uids.BreastTomosynthesisImageStorage
BREAST_PROJECTION_FOR_PRESENTATION = uids.BreastProjectionXRayImageStorageForPresentation
BREAST_PROJECTION_FOR_PROCESSING = uids.BreastProjectionXRayImageStorageForProcessing
DX_FOR_PRESENTATION = uids.DigitalXRayImageStorageForPresentation
DX_FOR_PROCESSING = uids.DigitalXRayImageStorageForProcessing
CR = uids.ComputedRadiographyImageStorage

_SOP_KIND = {
    MG_FOR_PRESENTATION: ImageKind.FOR_PRESENTATION,
    MG_FOR_PROCESSING: ImageKind.FOR_PROCESSING,
    BREAST_TOMOSYNTHESIS: ImageKind.TOMOSYNTHESIS,
    BREAST_PROJECTION_FOR_PRESENTATION: ImageKind.TOMOSYNTHESIS,
    BREAST_PROJECTION_FOR_PROCESSING: ImageKind.TOMOSYNTHESIS,
}
# General X-ray classes that older mammography units use with Modality MG.
_GENERAL_XRAY_KIND = {
    DX_FOR_PRESENTATION: ImageKind.FOR_PRESENTATION,
    DX_FOR_PROCESSING: ImageKind.FOR_PROCESSING,
    CR: ImageKind.FOR_PRESENTATION,
}

VIEW_SCHEMES = frozenset({"SCT", "SRT", "SNM3", "99SDM"})
"""Coding schemes accepted for view codes; SRT and SNM3 are the legacy SNOMED designators."""

VIEW_CODES: dict[str, str] = {
    # CID 4014: SNOMED CT, then legacy SNOMED RT.
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10228": "LM",
    "399099002": "LMO", "R-10230": "LMO",
    "399196006": "FB", "R-10244": "FB",
    "399188001": "SIO", "R-102D0": "SIO",
    "441555000": "ISO", "R-40AAA": "ISO",
    "399192008": "XCCL", "R-1024A": "XCCL", "Y-X1770": "XCCL",
    "399101009": "XCCM", "R-1024B": "XCCM", "Y-X1771": "XCCM",
    "127457009": "SPECIMEN", "G-8310": "SPECIMEN",
}  # fmt: skip
"""View code value → ACR MQCM abbreviation."""

VIEW_POSITIONS = frozenset(
    {"CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "ISO", "XCCL", "XCCM", "SPECIMEN"}
)

VIEW_MODIFIERS: dict[str, str] = {
    # CID 4015, SNOMED CT.
    "399163009": "magnification",
    "399055006": "spot compression",
    "399209000": "implant displaced",
    "399161006": "cleavage",
    "399011000": "axillary tail",
    "399197002": "rolled lateral",
    "399226006": "rolled medial",
    "415670009": "rolled superior",
    "414493004": "rolled inferior",
    "399110001": "tangential",
    "442581004": "nipple in profile",
    "441752004": "anterior compression",
    "442593008": "infra-mammary fold",
    "442580003": "axillary tissue",
}
"""View modifier code value → meaning, as `Mammogram.view_modifiers` reports it."""

_SYNTHETIC_2D_WORDS = re.compile(r"C-?\s?VIEW|S-?VIEW|SYNTHE|GENERATED|INSIGHT\s?2D", re.I)

# ---------------------------------------------------------------------------------------------
# Header description


@dataclass(frozen=True)
class VoiInfo:
    """Display transforms recorded but not applied to the pixels the models get."""

    window_center: tuple[float, ...] = ()
    window_width: tuple[float, ...] = ()
    voi_lut_function: str = "LINEAR"
    has_voi_lut_sequence: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    presentation_lut_shape: str = ""


@dataclass(frozen=True)
class ImageDescription:
    """What the header says an instance is; no pixel decoding involved."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    kind: ImageKind
    laterality: Laterality | None
    """None for both breasts (B) or, on an object that is not analysed anyway, when absent."""
    view: View | None
    """CC or MLO; None for any other view (see `view_code`)."""
    view_code: str
    """The view's ACR abbreviation as read ("CC", "MLO", "ML", "XCCL", …), "" if none."""
    view_modifiers: tuple[str, ...]
    transfer_syntax_uid: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples_per_pixel: int
    number_of_frames: int
    photometric_interpretation: str
    pixel_spacing_mm: tuple[float, float] | None
    patient_orientation: tuple[str, str] | None
    voi: VoiInfo
    not_screening_reason: str | None = None
    """Why this is not a screening view (None when it is); for the grouper's skip record."""
    notes: tuple[str, ...] = field(default=())
    """How values were derived where the header was not straightforward."""
    acquisition: str = ""
    """Sortable acquisition date-time (YYYYMMDDHHMMSS…), "" when unknown; orders retakes."""
    instance_number: int | None = None

    @property
    def screening_view(self) -> bool:
        """For Presentation, L or R, CC or MLO, no modifier: what the models analyse."""
        return self.not_screening_reason is None

    @property
    def view_key(self) -> str:
        return view_key(self.laterality or "?", self.view or self.view_code or "?")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageDescription:
        """What `to_json` wrote; keys of fields this version does not have are dropped."""
        facts: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        facts = {k: v for k, v in facts.items() if k in known}
        pairs = ("pixel_spacing_mm", "patient_orientation")
        return cls(
            **{
                **facts,
                **{k: tuple(facts[k]) for k in pairs if facts.get(k) is not None},
                "kind": ImageKind(facts["kind"]),
                "laterality": _optional(Laterality, facts.get("laterality")),
                "view": _optional(View, facts.get("view")),
                "view_modifiers": tuple(facts.get("view_modifiers") or ()),
                "notes": tuple(facts.get("notes") or ()),
                "voi": VoiInfo(
                    **{
                        k: tuple(v) if isinstance(v, list) else v
                        for k, v in (facts.get("voi") or {}).items()
                    }
                ),
            }
        )


def describe(ds: Dataset) -> ImageDescription:
    """Classify an instance from its header (works on `dcmread(..., stop_before_pixels=True)`).

    Raises a `MammogramError` subclass when the header is broken; see the module docstring.
    """
    notes: list[str] = []
    sop_class = _text(ds, "SOPClassUID")
    kind = _kind(ds, sop_class, notes)
    laterality, laterality_code = _laterality(ds, kind, notes)
    view_code, modifiers = _view(ds, laterality_code, kind, notes)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    _check_presentation_lut(ds, photometric)

    view = View(view_code) if view_code in ("CC", "MLO") else None
    reason = _not_screening_reason(ds, kind, laterality_code, view_code, modifiers)
    return ImageDescription(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        sop_class_uid=sop_class,
        kind=kind,
        laterality=laterality,
        view=view,
        view_code=view_code,
        view_modifiers=modifiers,
        transfer_syntax_uid=_transfer_syntax(ds),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated")),
        pixel_representation=_int(ds, "PixelRepresentation"),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        number_of_frames=_int(ds, "NumberOfFrames", 1),
        photometric_interpretation=photometric,
        pixel_spacing_mm=_spacing(ds),
        patient_orientation=_orientation(ds),
        voi=_voi(ds),
        not_screening_reason=reason,
        notes=tuple(notes),
        acquisition=acquisition_time(ds)[:32],
        instance_number=_optional_int(ds, "InstanceNumber"),
    )


def acquisition_time(ds: Dataset) -> str:
    """AcquisitionDateTime, else AcquisitionDate+Time, else ContentDate+Time; sortable."""
    if ds.get("AcquisitionDateTime"):
        return str(ds.AcquisitionDateTime).split("+")[0].split("-")[0]
    for date, time in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if ds.get(date):
            return f"{ds.get(date)}{str(ds.get(time) or '').ljust(6, '0')}"
    return ""


def _kind(ds: Dataset, sop_class: str, notes: list[str]) -> ImageKind:
    modality = _text(ds, "Modality").upper()
    if sop_class in _SOP_KIND:
        kind = _SOP_KIND[sop_class]
    elif sop_class in _GENERAL_XRAY_KIND and modality == "MG":
        kind = _GENERAL_XRAY_KIND[sop_class]
        notes.append(f"general X-ray SOP class {sop_class} with Modality MG read as mammography")
    else:
        name = UID(sop_class).name if sop_class else "no SOP Class UID"
        raise NotAMammogramError(
            f"SOP Class UID (0008,0016) is {sop_class or 'absent'} ({name}), Modality (0008,0060) "
            f"is {'MG' if modality == 'MG' else 'not MG'}: not a mammography image. Send Digital "
            "Mammography X-Ray Image Storage – For Presentation (1.2.840.10008.5.1.4.1.1.1.2) "
            "objects."
        )

    intent = _text(ds, "PresentationIntentType").upper()
    if intent:
        by_intent = {
            "FOR PRESENTATION": ImageKind.FOR_PRESENTATION,
            "FOR PROCESSING": ImageKind.FOR_PROCESSING,
        }.get(intent)
        if by_intent is None:
            raise ContradictoryHeaderError(
                "PresentationIntentType (0008,0068) is neither FOR PRESENTATION nor FOR "
                "PROCESSING. Fix the modality's export setting."
            )
        if sop_class == CR:
            kind = by_intent  # CR has no For Processing class; the intent decides
        elif kind in (ImageKind.FOR_PRESENTATION, ImageKind.FOR_PROCESSING) and by_intent != kind:
            raise ContradictoryHeaderError(
                f"SOP Class UID (0008,0016) {sop_class} says {kind.value.replace('_', ' ')} but "
                f"PresentationIntentType (0008,0068) says {intent}. Fix the modality's export "
                "setting so both agree."
            )
    if kind is not ImageKind.FOR_PRESENTATION:
        return kind

    image_type = [v.upper() for v in _values(ds, "ImageType")]
    description = _text(ds, "SeriesDescription")
    if "GENERATED_2D" in image_type:
        return ImageKind.SYNTHETIC_2D
    if word := _SYNTHETIC_2D_WORDS.search(description):
        # The vendor term matched (from our list), not the description: that is a header value.
        notes.append(f"synthetic 2D: SeriesDescription names {word.group(0)}")
        return ImageKind.SYNTHETIC_2D
    if any(v.startswith("TOMO") for v in image_type[2:]):
        return ImageKind.TOMOSYNTHESIS
    if image_type and image_type[0] == "DERIVED":
        notes.append("ImageType is DERIVED (some vendors mark processed For Presentation so)")
    return kind


def _laterality(ds: Dataset, kind: ImageKind, notes: list[str]) -> tuple[Laterality | None, str]:
    """(Laterality or None, the code read: "L", "R", "B" or "")."""
    sources = [
        ("ImageLaterality", "(0020,0062)", _text(ds, "ImageLaterality").upper()),
        ("FrameLaterality", "(0020,9072)", _frame_laterality(ds)),
        ("Laterality", "(0020,0060)", _text(ds, "Laterality").upper()),
    ]
    found = [(name, tag, value) for name, tag, value in sources if value]
    for name, tag, value in found:
        if value not in ("L", "R", "B"):
            raise MissingLateralityError(
                f"{name} {tag} is not L, R or B. Correct the laterality at the modality or in "
                "the PACS."
            )
    values = {value for _, _, value in found}
    if len(values) > 1:
        listed = ", ".join(f"{name} {tag} = {value}" for name, tag, value in found)
        raise ContradictoryHeaderError(
            f"laterality disagrees: {listed}. Check which breast this image shows and correct "
            "the header."
        )
    if not found:
        if kind is ImageKind.FOR_PRESENTATION:
            raise MissingLateralityError(
                "no laterality: ImageLaterality (0020,0062), FrameLaterality and Laterality "
                "(0020,0060) are all absent or empty. Set ImageLaterality to L or R at the "
                "modality or in the PACS."
            )
        notes.append("no laterality in the header")
        return None, ""
    name, _, value = found[0]
    if name != "ImageLaterality":
        notes.append(f"laterality from {name}; ImageLaterality absent")
    return (Laterality(value) if value in ("L", "R") else None), value


def _frame_laterality(ds: Dataset) -> str:
    """FrameLaterality of an enhanced (tomosynthesis) object, from the shared groups."""
    for group in _items(ds, "SharedFunctionalGroupsSequence"):
        for anatomy in _items(group, "FrameAnatomySequence"):
            value = _text(anatomy, "FrameLaterality").upper()
            if value:
                return value
    return ""


def _view(
    ds: Dataset, laterality: str, kind: ImageKind, notes: list[str]
) -> tuple[str, tuple[str, ...]]:
    """(view abbreviation, modifier meanings) from ViewCodeSequence, else ViewPosition."""
    coded, modifiers = "", ()
    items = _items(ds, "ViewCodeSequence")
    if items:
        coded = _coded_view(items[0])
        modifiers = tuple(_modifier(m) for m in _items(items[0], "ViewModifierCodeSequence"))
    # Some modalities put the modifiers beside the view item instead of inside it.
    modifiers += tuple(_modifier(m) for m in _items(ds, "ViewModifierCodeSequence"))

    position_raw = _text(ds, "ViewPosition").upper()
    position = _view_position(position_raw, laterality)
    if coded and position and coded != position:
        raise ContradictoryHeaderError(
            f"ViewCodeSequence (0054,0220) says {coded} but ViewPosition (0018,5101) says "
            f"{position}. Correct the view at the modality or in the PACS."
        )
    view = coded or position
    if not view:
        if kind is not ImageKind.FOR_PRESENTATION:
            notes.append("no view in the header")
            return "", modifiers
        if position_raw:
            raise UnknownViewError(
                "ViewPosition (0018,5101) is not a mammography view "
                f"({', '.join(sorted(VIEW_POSITIONS))}), and there is no ViewCodeSequence "
                "(0054,0220). Map the vendor's view names to ACR MQCM codes."
            )
        raise UnknownViewError(
            "no view: ViewCodeSequence (0054,0220) and ViewPosition (0018,5101) are both absent "
            "or empty. Set the view (e.g. CC or MLO) at the modality or in the PACS."
        )
    if not coded:
        notes.append("view from ViewPosition; ViewCodeSequence absent")
    return view, tuple(dict.fromkeys(modifiers))


def _coded_view(item: Dataset) -> str:
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue")
    scheme = _text(item, "CodingSchemeDesignator").upper()
    meaning = _text(item, "CodeMeaning")
    if scheme in VIEW_SCHEMES and value in VIEW_CODES:
        return VIEW_CODES[value]
    by_meaning = _meaning_to_view(meaning)
    if by_meaning:
        return by_meaning
    raise UnknownViewError(
        "ViewCodeSequence (0054,0220) holds a code that is not a mammography view from CID "
        "4014. Use the SNOMED CT code, e.g. (399162004, SCT, "
        "cranio-caudal) or (399368009, SCT, medio-lateral oblique)."
    )


_MEANINGS = {
    "cranio-caudal": "CC",
    "medio-lateral oblique": "MLO",
    "medio-lateral": "ML",
    "latero-medial": "LM",
    "latero-medial oblique": "LMO",
    "caudo-cranial (from below)": "FB",
    "superolateral to inferomedial oblique": "SIO",
    "inferomedial to superolateral oblique": "ISO",
    "cranio-caudal exaggerated laterally": "XCCL",
    "cranio-caudal exaggerated medially": "XCCM",
    "tissue specimen from breast": "SPECIMEN",
}


def _meaning_to_view(meaning: str) -> str:
    key = re.sub(r"[\s_]+", " ", meaning.strip().lower()).replace("craniocaudal", "cranio-caudal")
    key = key.replace("mediolateral", "medio-lateral").replace("lateromedial", "latero-medial")
    return _MEANINGS.get(key, "")


def _view_position(raw: str, laterality: str) -> str:
    """ViewPosition as an ACR abbreviation; accepts vendor forms like "RCC" or "L MLO" when the
    embedded side matches the header's laterality."""
    text = raw.replace(" ", "").replace("_", "").replace("-", "")
    if text in VIEW_POSITIONS:
        return text
    if text[:1] in ("L", "R") and text[1:] in VIEW_POSITIONS:
        if laterality and text[0] != laterality:
            raise ContradictoryHeaderError(
                f"ViewPosition (0018,5101) names side {text[0]} but the laterality is "
                f"{laterality}. Check which breast this image shows and correct the header."
            )
        return text[1:]
    return ""


def _modifier(item: Dataset) -> str:
    """The modifier's name; an unknown code is named as such (its text is a header value,
    which must not reach reasons and logs)."""
    return VIEW_MODIFIERS.get(_text(item, "CodeValue")) or "unrecognised view modifier"


def _not_screening_reason(
    ds: Dataset, kind: ImageKind, laterality: str, view: str, modifiers: tuple[str, ...]
) -> str | None:
    if kind is not ImageKind.FOR_PRESENTATION:
        return f"{kind.value.replace('_', ' ')} image"
    if laterality == "B":
        return "laterality B (both breasts, e.g. a cleavage view)"
    if view not in ("CC", "MLO"):
        return f"{view} view (not CC or MLO)"
    if modifiers:
        return f"view modifier: {', '.join(modifiers)}"
    if _text(ds, "PartialView").upper() == "YES":
        return "partial view (PartialView YES: a tile of a large breast)"
    if _int(ds, "NumberOfFrames", 1) > 1:
        return f"{_int(ds, 'NumberOfFrames', 1)} frames (not a single 2D image)"
    return None


def _check_presentation_lut(ds: Dataset, photometric: str) -> None:
    shape = _text(ds, "PresentationLUTShape").upper()
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        raise ContradictoryHeaderError(
            "PhotometricInterpretation (0028,0004) is MONOCHROME2 but PresentationLUTShape "
            "(2050,0020) is INVERSE; in mammography INVERSE goes with MONOCHROME1 only. Fix the "
            "modality's export so the two agree."
        )
    if photometric == "MONOCHROME1" and shape == "IDENTITY":
        raise ContradictoryHeaderError(
            "PhotometricInterpretation (0028,0004) is MONOCHROME1 but PresentationLUTShape "
            "(2050,0020) is IDENTITY; in mammography MONOCHROME1 goes with INVERSE. Fix the "
            "modality's export so the two agree."
        )


# ---------------------------------------------------------------------------------------------
# Small header helpers


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute that may be absent, empty or malformed (then None)."""
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _optional(kind: type[Any], value: str | None) -> Any:
    return None if value is None else kind(value)


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    return list(value) if value else []


def _floats(values: Iterable[object]) -> tuple[float, ...]:
    out = []
    for v in values:
        try:
            out.append(float(v))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return tuple(out)


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _floats(_values(ds, keyword))
        if len(values) == 2 and all(v > 0 for v in values):
            return values[0], values[1]
    return None


def _orientation(ds: Dataset) -> tuple[str, str] | None:
    values = _values(ds, "PatientOrientation")
    return (values[0], values[1]) if len(values) == 2 else None


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(value) if value else str(pydicom.uid.ImplicitVRLittleEndian)


def _voi(ds: Dataset) -> VoiInfo:
    return VoiInfo(
        window_center=_floats(_values(ds, "WindowCenter")),
        window_width=_floats(_values(ds, "WindowWidth")),
        voi_lut_function=_text(ds, "VOILUTFunction").upper() or "LINEAR",
        has_voi_lut_sequence="VOILUTSequence" in ds,
        rescale_slope=(_floats(_values(ds, "RescaleSlope")) or (1.0,))[0],
        rescale_intercept=(_floats(_values(ds, "RescaleIntercept")) or (0.0,))[0],
        presentation_lut_shape=_text(ds, "PresentationLUTShape").upper(),
    )
