"""Digital Mammography X-Ray Image (For Presentation) datasets around synthetic pixels, and their
encodings.

The header carries what a real screening image does and what `dciodvfy` asks for: patient and
study identity, ImageLaterality, ViewCodeSequence with ViewPosition, PatientOrientation in the
standard mammography convention, ImagerPixelSpacing, a VOI window, and the DX/MG acquisition
attributes.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from models.mammogram import Laterality, View

MG_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation

# CID 4014 (SNOMED CT) codes for the two screening views, as modern modalities send them.
_VIEW_CODES = {
    View.CC: ("399162004", "cranio-caudal"),
    View.MLO: ("399368009", "medio-lateral oblique"),
}
_BREAST = ("76752008", "Breast")

# Row direction \ column direction of the displayed image (PS3.3 C.8.11.7 convention): the chest
# wall is on the image's left for a left breast (rows run towards Anterior) and on its right for
# a right breast (rows run towards Posterior); CC puts lateral at the top, MLO the axilla.
PATIENT_ORIENTATION = {
    (Laterality.LEFT, View.CC): ("A", "R"),
    (Laterality.LEFT, View.MLO): ("A", "FR"),
    (Laterality.RIGHT, View.CC): ("P", "L"),
    (Laterality.RIGHT, View.MLO): ("P", "FL"),
}

SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg2000-lossy": JPEG2000,
    "jpegls": JPEGLSLossless,
    "jpegls-near": JPEGLSNearLossless,
    "jpeg-lossless": JPEGLosslessSV1,
}
"""Short names for the transfer syntaxes `encode` can write. "jpeg-lossless" (Process 14 SV1)
has no Python encoder; it runs dcmtk's `dcmcjpeg`."""

_LOSSY = (JPEG2000, JPEGLSNearLossless)


@dataclass(frozen=True)
class Identity:
    """Who and which study an image belongs to (all synthetic)."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str


def mammogram_dataset(
    stored: np.ndarray,
    *,
    identity: Identity,
    sop_instance_uid: str,
    instance_number: int,
    laterality: Laterality,
    view: View,
    bits_stored: int,
    photometric: str,
    spacing_mm: float,
    window: tuple[float, float],
) -> Dataset:
    """A For Presentation MG dataset, Explicit VR Little Endian, around `stored` (uint16 values
    as they go on the wire, already inverted for MONOCHROME1). `window` is (centre, width) in
    stored values."""
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    rows, cols = stored.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    for what in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{what}Date", identity.study_date)
        setattr(ds, f"{what}Time", identity.study_time)
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "mammo-ai-plugin"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Screening mammography (synthetic)"
    ds.SeriesDescription = f"{laterality}{view}"
    ds.ManufacturerModelName = "trainer synth"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.SoftwareVersions = "trainer synth 1"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.ViewPosition = str(view)
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = list(PATIENT_ORIENTATION[(laterality, view)])
    ds.ImageLaterality = str(laterality)
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.WindowCenter = f"{window[0]:.1f}"
    ds.WindowWidth = f"{window[1]:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    ds.AnatomicRegionSequence = Sequence([_code(*_BREAST)])
    view_item = _code(*_VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def encode(ds: Dataset, syntax: str | UID) -> Dataset:
    """A copy of uncompressed `ds` in another transfer syntax (a name from `SYNTAXES` or a UID).

    Lossless codecs keep the values exactly; lossy ones mark LossyImageCompression. The SOP
    Instance UID is kept, so labels follow the image whatever its encoding (a synthetic image
    exists in one encoding at a time).
    """
    uid = UID(SYNTAXES.get(str(syntax), str(syntax)))
    if uid not in SYNTAXES.values():
        names = ", ".join(SYNTAXES)
        raise ValueError(f"cannot encode transfer syntax {syntax!r}; use one of {names}")
    out = copy.deepcopy(ds)
    if not uid.is_compressed:
        out.file_meta.TransferSyntaxUID = uid
        return out
    if uid == JPEGLosslessSV1:
        return _dcmcjpeg(out)
    options: dict[str, object] = {}
    if uid == JPEG2000:
        options["j2k_cr"] = [15]
    if uid == JPEGLSNearLossless:
        options["jls_error"] = 2
    out.compress(uid, encoding_plugin=_plugin(uid), generate_instance_uid=False, **options)
    if uid in _LOSSY:
        out.LossyImageCompression = "01"
        out.LossyImageCompressionMethod = "ISO_15444_1" if uid == JPEG2000 else "ISO_14495_1"
    return out


def _plugin(uid: UID) -> str:
    return {RLELossless: "pydicom", JPEG2000Lossless: "pylibjpeg", JPEG2000: "pylibjpeg"}.get(
        uid, "pyjpegls"
    )


def _dcmcjpeg(ds: Dataset) -> Dataset:
    """JPEG Lossless Process 14 SV1 through dcmtk: no Python package encodes it."""
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        raise RuntimeError("JPEG lossless (Process 14 SV1) needs dcmtk's dcmcjpeg on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.dcm"), Path(tmp, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        subprocess.run([tool, "+e1", str(src), str(dst)], check=True, capture_output=True)
        return dcmread(dst)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item
