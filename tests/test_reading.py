"""models.header and models.pixels: header classification and pixel decoding of mammograms.

Images come from `trainer.synth` (the `synth_exam_small` fixture); each test edits a copy of a
header to produce one situation a PACS sends. JPEG Lossless Process 14 SV1 has no Python
encoder, so that case is encoded with dcmtk's `dcmcjpeg` (skipped without it); every other
syntax is encoded by pydicom with its own RLE encoder, pylibjpeg-openjpeg or pyjpegls.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from models.header import (
    BREAST_TOMOSYNTHESIS,
    MG_FOR_PROCESSING,
    ContradictoryHeaderError,
    MissingLateralityError,
    NotAMammogramError,
    UnknownViewError,
    describe,
)
from models.mammogram import ImageKind, Laterality, View
from models.pixels import (
    ImplausibleDimensionsError,
    NotScreeningViewError,
    PixelDataLengthError,
    TruncatedPixelDataError,
    read_mammogram,
    read_mammogram_file,
)
from trainer.synth import encode, synth_exam

LOSSLESS = ["explicit", "implicit", "deflated", "rle", "jpeg2000", "jpegls", "jpeg-lossless"]


@pytest.fixture
def lcc(synth_exam_small) -> Dataset:
    """A fresh copy of the small exam's L-CC header and pixels, free to edit."""
    return copy.deepcopy(synth_exam_small.image("L-CC").dataset)


@pytest.fixture
def rmlo(synth_exam_small) -> Dataset:
    return copy.deepcopy(synth_exam_small.image("R-MLO").dataset)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _set_view(ds: Dataset, value: str, scheme: str, meaning: str, *modifiers: Dataset) -> None:
    item = _code(value, scheme, meaning)
    item.ViewModifierCodeSequence = Sequence(list(modifiers))
    ds.ViewCodeSequence = Sequence([item])


# --- pixels -----------------------------------------------------------------------------------


def _needs(syntax: str) -> None:
    if syntax == "jpeg-lossless" and shutil.which("dcmcjpeg") is None:
        pytest.skip("JPEG Lossless SV1 is encoded with dcmtk's dcmcjpeg, which is not installed")


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_every_lossless_syntax_decodes_to_the_stored_values(tmp_path, lcc, syntax):
    _needs(syntax)
    path = tmp_path / f"{syntax}.dcm"
    encode(lcc, syntax).save_as(path, enforce_file_format=True)
    m = read_mammogram_file(path)
    assert m.pixels.dtype == np.float32 and m.shape == (lcc.Rows, lcc.Columns)
    assert np.array_equal(m.pixels, lcc.pixel_array.astype(np.float32))
    assert (m.laterality, m.view, m.bits_stored) == (Laterality.LEFT, View.CC, 12)
    assert m.pixel_spacing_mm == (float(lcc.ImagerPixelSpacing[0]),) * 2
    assert m.patient_orientation == ("A", "R")
    assert m.sop_instance_uid == lcc.SOPInstanceUID


@pytest.mark.parametrize(("syntax", "tolerance"), [("jpeg2000-lossy", 200), ("jpegls-near", 2)])
def test_lossy_syntaxes_decode_close_to_the_original(tmp_path, lcc, syntax, tolerance):
    path = tmp_path / f"{syntax}.dcm"
    encode(lcc, syntax).save_as(path, enforce_file_format=True)
    m = read_mammogram_file(path)
    error = np.abs(m.pixels - lcc.pixel_array.astype(np.float32))
    assert error.max() <= tolerance and error.mean() < 15  # 15:1 J2K on a noisy image


@pytest.mark.parametrize("syntax", ["explicit", "jpegls"])
def test_monochrome1_is_inverted_to_match_monochrome2(syntax):
    m2 = synth_exam(4, rows=128, cols=104, photometric="MONOCHROME2").images[1].dataset
    m1 = synth_exam(4, rows=128, cols=104, photometric="MONOCHROME1").images[1].dataset
    a = read_mammogram(encode(m2, syntax))
    b = read_mammogram(encode(m1, syntax))
    assert not np.array_equal(m1.pixel_array, m2.pixel_array)
    assert np.array_equal(a.pixels, b.pixels)
    assert b.photometric_interpretation == "MONOCHROME1"


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_bits_above_bits_stored_are_ignored(lcc, photometric):
    assert lcc.BitsStored == 12
    stored = lcc.pixel_array.astype(np.float32)
    if photometric == "MONOCHROME1":
        lcc.PhotometricInterpretation, lcc.PresentationLUTShape = photometric, "INVERSE"
    lcc.PixelData = (lcc.pixel_array | 0xF000).astype("<u2").tobytes()  # e.g. overlay bits
    pixels = read_mammogram(lcc).pixels
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert np.array_equal(pixels, stored if photometric == "MONOCHROME2" else 4095 - stored)


def test_voi_and_rescale_are_recorded_not_applied(lcc):
    lcc.RescaleSlope, lcc.RescaleIntercept = "2", "-100"
    d = describe(lcc)
    assert d.voi.window_center == (float(lcc.WindowCenter),)
    assert (d.voi.rescale_slope, d.voi.rescale_intercept) == (2.0, -100.0)
    assert np.array_equal(read_mammogram(lcc).pixels, lcc.pixel_array.astype(np.float32))


def test_absurd_dimensions_are_rejected_before_decoding(lcc):
    lcc.Rows = 60000
    with pytest.raises(ImplausibleDimensionsError, match=r"Rows \(0028,0010\) 60000"):
        read_mammogram(lcc)


def test_pixel_data_longer_than_the_header_says_is_rejected(lcc):
    lcc.Rows = lcc.Rows // 2
    with pytest.raises(PixelDataLengthError, match="header does not describe the data"):
        read_mammogram(lcc)


def test_truncated_uncompressed_pixel_data(tmp_path, lcc):
    path = tmp_path / "cut.dcm"
    lcc.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10000])
    with pytest.raises(TruncatedPixelDataError, match="truncated"):
        read_mammogram_file(path)


def test_truncated_compressed_stream(tmp_path, lcc):
    encoded = encode(lcc, "jpegls")
    cut = copy.deepcopy(encoded)
    # Keep the item structure valid but drop the end of the codestream.
    from pydicom.encaps import encapsulate, generate_fragments

    fragment = b"".join(generate_fragments(encoded.PixelData))
    cut.PixelData = encapsulate([fragment[: len(fragment) // 2]])
    with pytest.raises(TruncatedPixelDataError, match="end-of-image marker"):
        read_mammogram(cut)

    path = tmp_path / "cut.dcm"
    encoded.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedPixelDataError, match="file is truncated"):
        read_mammogram_file(path)
    assert encoded.file_meta.TransferSyntaxUID == JPEGLSLossless


# --- laterality -------------------------------------------------------------------------------


def test_laterality_from_image_laterality(rmlo):
    d = describe(dcmread_header(rmlo))
    assert (d.laterality, d.view) == (Laterality.RIGHT, View.MLO)
    assert d.kind is ImageKind.FOR_PRESENTATION
    assert d.screening_view and d.notes == ()


def test_laterality_falls_back_to_series_laterality_with_a_note(lcc):
    del lcc.ImageLaterality
    lcc.Laterality = "L"
    d = describe(lcc)
    assert d.laterality is Laterality.LEFT
    assert any("from Laterality" in note for note in d.notes)


def test_missing_laterality(lcc):
    del lcc.ImageLaterality
    with pytest.raises(MissingLateralityError, match=r"ImageLaterality \(0020,0062\)"):
        describe(lcc)


def test_invalid_laterality_value(lcc):
    lcc.ImageLaterality = "X"
    with pytest.raises(MissingLateralityError, match="is not L, R or B") as info:
        describe(lcc)
    assert "'X'" not in str(info.value)  # names the attribute, never copies its value


def test_image_and_series_laterality_contradict(lcc):
    lcc.Laterality = "R"
    with pytest.raises(ContradictoryHeaderError, match="ImageLaterality .* = L, Laterality"):
        describe(lcc)


def test_view_position_naming_the_other_side_contradicts(lcc):
    del lcc.ViewCodeSequence
    lcc.ViewPosition = "RCC"
    with pytest.raises(ContradictoryHeaderError, match="names side R but the laterality is L"):
        describe(lcc)
    lcc.ViewPosition = "LCC"
    assert describe(lcc).view is View.CC


def test_both_breasts_is_recognised_not_screening(lcc):
    lcc.ImageLaterality = "B"
    d = describe(lcc)
    assert d.laterality is None and not d.screening_view
    assert "both breasts" in d.not_screening_reason


# --- view -------------------------------------------------------------------------------------


def test_view_from_legacy_srt_code(lcc):
    _set_view(lcc, "R-10226", "SRT", "medio-lateral oblique")
    lcc.ViewPosition = "MLO"
    assert describe(lcc).view is View.MLO


def test_view_from_code_meaning_when_the_code_is_a_vendor_one(lcc):
    _set_view(lcc, "VENDOR-7", "99ACME", "Cranio-caudal")
    assert describe(lcc).view is View.CC


def test_view_from_view_position_without_code_sequence(lcc):
    del lcc.ViewCodeSequence
    d = describe(lcc)
    assert d.view is View.CC and any("ViewPosition" in note for note in d.notes)


def test_code_and_view_position_contradict(lcc):
    lcc.ViewPosition = "MLO"
    with pytest.raises(ContradictoryHeaderError, match=r"says CC but ViewPosition .* says MLO"):
        describe(lcc)


def test_unknown_view_code(lcc):
    _set_view(lcc, "123456", "99ACME", "vendor special")
    with pytest.raises(UnknownViewError, match="CID 4014"):
        describe(lcc)


def test_unknown_view_position(lcc):
    del lcc.ViewCodeSequence
    lcc.ViewPosition = "WEIRD"
    with pytest.raises(UnknownViewError, match=r"ViewPosition \(0018,5101\) is not a mammography"):
        describe(lcc)


def test_missing_view(lcc):
    del lcc.ViewCodeSequence
    del lcc.ViewPosition
    with pytest.raises(UnknownViewError, match="no view"):
        describe(lcc)


@pytest.mark.parametrize(
    ("code", "position", "abbreviation"),
    [("399260004", "ML", "ML"), ("399192008", "XCCL", "XCCL"), ("399352003", "LM", "LM")],
)
def test_other_views_are_recognised_not_screening(lcc, code, position, abbreviation):
    _set_view(lcc, code, "SCT", "other")
    lcc.ViewPosition = position
    d = describe(lcc)
    assert d.view is None and d.view_code == abbreviation and not d.screening_view
    assert abbreviation in d.not_screening_reason
    with pytest.raises(NotScreeningViewError, match=abbreviation):
        read_mammogram(lcc)


@pytest.mark.parametrize(
    ("code", "meaning"),
    [("399055006", "spot compression"), ("399163009", "magnification"),
     ("399209000", "implant displaced")],
)  # fmt: skip
def test_view_modifiers_are_reported(lcc, code, meaning):
    _set_view(lcc, "399162004", "SCT", "cranio-caudal", _code(code, "SCT", meaning.title()))
    d = describe(lcc)
    assert d.view is View.CC and d.view_modifiers == (meaning,)
    assert not d.screening_view and meaning in d.not_screening_reason
    with pytest.raises(NotScreeningViewError):
        read_mammogram(lcc)
    m = read_mammogram(lcc, require_screening=False)
    assert m.view_modifiers == (meaning,)


def test_partial_view_is_not_screening(lcc):
    lcc.PartialView = "YES"
    assert "partial view" in describe(lcc).not_screening_reason


# --- kind -------------------------------------------------------------------------------------


def test_for_processing_is_recognised(lcc):
    lcc.SOPClassUID = MG_FOR_PROCESSING
    lcc.PresentationIntentType = "FOR PROCESSING"
    d = describe(lcc)
    assert d.kind is ImageKind.FOR_PROCESSING and "for processing" in d.not_screening_reason
    m = read_mammogram(lcc, require_screening=False)
    assert m.kind is ImageKind.FOR_PROCESSING


def test_for_processing_from_presentation_intent_on_a_cr_object(lcc):
    lcc.SOPClassUID = ComputedRadiographyImageStorage  # with Modality MG: older units
    lcc.PresentationIntentType = "FOR PROCESSING"
    assert describe(lcc).kind is ImageKind.FOR_PROCESSING


def test_presentation_intent_contradicting_the_sop_class(lcc):
    lcc.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(ContradictoryHeaderError, match="PresentationIntentType"):
        describe(lcc)


def test_tomosynthesis_with_frame_laterality(lcc):
    lcc.SOPClassUID = BREAST_TOMOSYNTHESIS
    del lcc.ImageLaterality
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    group = Dataset()
    group.FrameAnatomySequence = Sequence([anatomy])
    lcc.SharedFunctionalGroupsSequence = Sequence([group])
    lcc.NumberOfFrames = 50
    d = describe(lcc)
    assert d.kind is ImageKind.TOMOSYNTHESIS and d.laterality is Laterality.RIGHT
    with pytest.raises(NotScreeningViewError, match="tomosynthesis"):
        read_mammogram(lcc, require_screening=False)


def test_tomosynthesis_without_laterality_is_still_classified(lcc):
    lcc.SOPClassUID = BREAST_TOMOSYNTHESIS
    del lcc.ImageLaterality
    d = describe(lcc)
    assert d.kind is ImageKind.TOMOSYNTHESIS and d.laterality is None
    assert "no laterality in the header" in d.notes


def test_synthetic_2d_from_image_type(lcc):
    lcc.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
    d = describe(lcc)
    assert d.kind is ImageKind.SYNTHETIC_2D and "synthetic 2d" in d.not_screening_reason


def test_synthetic_2d_from_series_description(lcc):
    lcc.SeriesDescription = "L CC C-View"
    d = describe(lcc)
    assert d.kind is ImageKind.SYNTHETIC_2D and any("C-View" in n for n in d.notes)


def test_not_a_mammogram(lcc):
    lcc.SOPClassUID = SecondaryCaptureImageStorage
    lcc.Modality = "OT"
    with pytest.raises(NotAMammogramError, match="Secondary Capture"):
        describe(lcc)


def test_dx_class_with_modality_mg_is_read_with_a_note(lcc):
    lcc.SOPClassUID = DigitalXRayImageStorageForPresentation
    d = describe(lcc)
    assert d.screening_view and any("Modality MG" in n for n in d.notes)


def test_presentation_lut_contradicting_photometric(lcc):
    lcc.PresentationLUTShape = "INVERSE"
    with pytest.raises(ContradictoryHeaderError, match="MONOCHROME2 but PresentationLUTShape"):
        describe(lcc)


def test_describe_needs_no_pixels(tmp_path, lcc):
    path = tmp_path / "x.dcm"
    encode(lcc, "jpeg2000").save_as(path, enforce_file_format=True)
    header = dcmread(path, stop_before_pixels=True)
    d = describe(header)
    assert "PixelData" not in header
    assert (d.rows, d.columns, d.bits_stored) == (lcc.Rows, lcc.Columns, 12)
    assert d.transfer_syntax_uid == JPEG2000Lossless
    assert d.view_key == "L-CC"


def dcmread_header(ds: Dataset) -> Dataset:
    """The header as `dcmread(stop_before_pixels=True)` would give it."""
    header = copy.deepcopy(ds)
    del header.PixelData
    return header
