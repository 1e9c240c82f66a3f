"""Mammography CAD SR (TID 4000): the golden tree walked with pydicom, rendering intents,
partial exams, labelling, and the validators as real peers."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, MammographyCADSRStorage

from plugin.outputs import NOT_FOR_CLINICAL_USE, OutputOptions, build_cad_sr
from tests.support.outputs_samples import (
    children,
    code_value,
    concept,
    dciodvfy_errors,
    dsrdump_errors,
    model_info,
    num_value,
    only,
    pixelmed_errors,
    pixelmed_report,
    prediction_for,
    referenced_uid,
)

REQUIRED, OPTIONAL, NOT_FOR_PRESENTATION = "111150", "111151", "111152"
LATERALITY_CODE = {"R": "73056007", "L": "80248007"}
VIEW_CODE = {"CC": "399162004", "MLO": "399368009"}


def _intent(item) -> str:
    return code_value(only(children(item, "111056", "HAS CONCEPT MOD")))


def _impressions(sr):
    summary = only(children(sr, "111017"))
    return summary, children(summary, "111034", "INFERRED FROM")


def _findings(impression):
    """(breast feature or None, [single image findings]) under an impression."""
    feature = children(impression, "111015", "CONTAINS")
    if feature:
        return feature[0], children(feature[0], "111059", "INFERRED FROM")
    return None, children(impression, "111059", "CONTAINS")


def test_golden_tree(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    sr = build_cad_sr(prediction, sources)

    assert sr.SOPClassUID == MammographyCADSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert concept(sr) == "111036"
    assert [concept(c) for c in sr.ContentSequence] == [
        "121049",
        "111028",
        "111017",
        "111064",
        "111065",
    ]
    assert sr.StudyInstanceUID == synth_exam_small.study_instance_uid
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

    # Image library: four unnamed IMAGE entries whose context matches their source.
    library = only(children(sr, "111028"))
    entries = library.ContentSequence
    assert len(entries) == 4
    for entry in entries:
        assert entry.ValueType == "IMAGE" and "ConceptNameCodeSequence" not in entry
        uid = entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        src = sources[uid]
        assert code_value(only(children(entry, "111027"))) == LATERALITY_CODE[src.ImageLaterality]
        view = prediction.image(uid).view
        assert code_value(only(children(entry, "111031"))) == VIEW_CODE[view]
        assert num_value(only(children(entry, "110910"))) == src.Rows
        assert num_value(only(children(entry, "110911"))) == src.Columns
        row = only(children(entry, "111044")).TextValue
        assert row == src.PatientOrientation[0]

    # One impression per breast: a composite feature with the breast score over its CC and
    # MLO findings, each with the image score, centre and closed outline on its own image.
    summary, impressions = _impressions(sr)
    assert len(impressions) == 2
    for impression, breast in zip(impressions, prediction.breasts, strict=True):
        feature, findings = _findings(impression)
        assert feature is not None and len(findings) == 2
        assert code_value(feature) == "129793001"
        prob = only(children(feature, "111047", "HAS PROPERTIES"))
        assert num_value(prob) == pytest.approx(100 * breast.malignant, abs=0.01)
        assert prob.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
        assert only(children(feature, "111001")).TextValue == "test-gmic"
        centers = children(feature, "111010", "INFERRED FROM")
        assert {referenced_uid(c) for c in centers} == set(breast.sop_instance_uids)
        for finding in findings:
            center = only(children(finding, "111010", "HAS PROPERTIES"))
            uid = referenced_uid(center)
            img = prediction.image(uid)
            assert uid in breast.sop_instance_uids
            p = only(children(finding, "111047", "HAS PROPERTIES"))
            assert num_value(p) == pytest.approx(100 * img.malignant, abs=0.01)
            outline = only(children(finding, "111041", "HAS PROPERTIES"))
            assert outline.GraphicType == "POLYLINE" and referenced_uid(outline) == uid
            xy = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
            assert len(xy) == 5 and np.allclose(xy[0], xy[-1])
            top, left, bottom, right = img.rois[0].box
            assert xy[:, 0].min() == pytest.approx(left, abs=0.01)
            assert xy[:, 1].max() == pytest.approx(bottom, abs=0.01)
            cx, cy = np.asarray(center.GraphicData, dtype=float)
            assert (cy, cx) == pytest.approx(img.rois[0].center, abs=0.01)

    for name, performed in (("111064", "111022"), ("111065", "111004")):
        item = only(children(sr, name))
        assert code_value(item) == "111222"  # Succeeded
        done = only(children(only(item.ContentSequence), performed))
        refs = [c for c in done.ContentSequence if c.ValueType == "IMAGE"]
        assert len(refs) == 4


def test_built_by_public_comprehensive_sr_and_relabelled(synth_exam_small, tmp_path):
    """The boundary with highdicom (see plugin/outputs/cad_templates.py): its public
    ComprehensiveSR builds the document and we relabel it; fails loudly if highdicom ever
    writes the SOP class somewhere we do not relabel."""
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    sr = build_cad_sr(prediction, sources)
    assert not isinstance(sr, hd.SOPClass)  # not a highdicom object with the wrong IOD
    assert sr.file_meta.MediaStorageSOPClassUID == MammographyCADSRStorage
    path = tmp_path / "cad.dcm"
    sr.save_as(path, enforce_file_format=True)
    written = path.read_bytes()
    assert ComprehensiveSRStorage.encode() not in written
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == back.file_meta.MediaStorageSOPClassUID == MammographyCADSRStorage
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID


def test_rendering_intent_follows_operating_point(synth_exam_small):
    scores = {"R-CC": 0.8, "R-MLO": 0.6, "L-CC": 0.1, "L-MLO": 0.2}
    prediction, sources = prediction_for(
        synth_exam_small, scores=scores, models=[model_info(operating_point=0.5)]
    )
    summary, impressions = _impressions(build_cad_sr(prediction, sources))
    assert code_value(summary) == "111242"  # with findings
    intents = {}
    for impression in impressions:
        feature, findings = _findings(impression)
        lat = prediction.image(referenced_uid(only(children(findings[0], "111010")))).laterality
        intents[str(lat)] = (_intent(impression), _intent(feature))
        for finding in findings:
            img = prediction.image(referenced_uid(only(children(finding, "111010"))))
            expected = REQUIRED if img.malignant >= 0.5 else NOT_FOR_PRESENTATION
            assert _intent(finding) == expected
    assert intents == {"R": (REQUIRED, REQUIRED), "L": (NOT_FOR_PRESENTATION,) * 2}

    low = {k: 0.05 for k in scores}
    prediction, sources = prediction_for(synth_exam_small, scores=low)
    summary, impressions = _impressions(build_cad_sr(prediction, sources))
    assert code_value(summary) == "111241"  # without findings
    assert {_intent(i) for i in impressions} == {NOT_FOR_PRESENTATION}

    # A site override beats the model's operating point.
    summary, impressions = _impressions(
        build_cad_sr(prediction, sources, OutputOptions(operating_point=0.01))
    )
    assert {_intent(i) for i in impressions} == {REQUIRED}


def test_without_operating_point_everything_is_optional(synth_exam_small):
    models = [model_info("a", operating_point=0.5), model_info("b", operating_point=None)]
    prediction, sources = prediction_for(synth_exam_small, models=models)
    summary, impressions = _impressions(build_cad_sr(prediction, sources))
    assert code_value(summary) == "111242"
    for impression in impressions:
        feature, findings = _findings(impression)
        assert {_intent(impression), _intent(feature)} | {_intent(f) for f in findings} == {
            OPTIONAL
        }


def test_partial_exam(synth_exam_small, tmp_path):
    prediction, sources = prediction_for(synth_exam_small, drop=["L-MLO"])
    sr = build_cad_sr(prediction, sources)
    assert sr.CompletionFlag == "PARTIAL"
    assert "L-MLO" in sr.CompletionFlagDescription
    assert len(only(children(sr, "111028")).ContentSequence) == 3
    _, impressions = _impressions(sr)
    by_side = {}
    for impression in impressions:
        feature, findings = _findings(impression)
        uid = referenced_uid(only(children(findings[0], "111010")))
        by_side[str(prediction.image(uid).laterality)] = (feature, findings)
    assert by_side["R"][0] is not None and len(by_side["R"][1]) == 2
    # One image left: its finding sits directly under the impression (no composite).
    assert by_side["L"][0] is None and len(by_side["L"][1]) == 1
    path = tmp_path / "partial.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert dsrdump_errors(path) == []


def test_outline_from_saliency_peak_without_rois(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, rois=False)
    img = next(i for i in prediction.images if i.malignant >= 0.5)
    region = img.region
    assert region.origin == "saliency"
    peak = np.unravel_index(np.argmax(img.malignant_map), img.malignant_map.shape)
    top, left, bottom, right = region.box
    assert top <= peak[0] < bottom and left <= peak[1] < right
    # The half-maximum blob of a Gaussian spans about 2.35 sigma.
    sigma = img.malignant_map.shape[0] / 40
    assert bottom - top == pytest.approx(2.35 * sigma, rel=0.2)


def test_not_for_clinical_use_label(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small)
    sr = build_cad_sr(prediction, sources)
    assert sr.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
    _, impressions = _impressions(sr)
    feature, _ = _findings(impressions[0])
    assert only(children(feature, "111002")).TextValue.startswith(NOT_FOR_CLINICAL_USE)

    assert only(children(feature, "111002")).TextValue.endswith("; precision fp32")

    validated, sources = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    validated = dataclasses.replace(validated, precision="bf16")
    sr = build_cad_sr(validated, sources)
    assert NOT_FOR_CLINICAL_USE not in sr.SeriesDescription
    _, impressions = _impressions(sr)
    feature, _ = _findings(impressions[0])
    assert NOT_FOR_CLINICAL_USE not in only(children(feature, "111002")).TextValue
    assert only(children(feature, "111002")).TextValue.endswith("; precision bf16")


def test_dciodvfy_and_dsrdump_accept(synth_exam_small, tmp_path):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    path = tmp_path / "cad.dcm"
    build_cad_sr(prediction, sources).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert dsrdump_errors(path) == []


@pytest.mark.slow
def test_pixelmed_finds_tid4000_without_errors(synth_exam_small, tmp_path):
    """PixelMed is the only validator here that checks the TID 4000 template rules."""
    # Partial and without an operating point: exercises the single-image impression and the
    # "Presentation Optional" branch along with the composite features.
    prediction, sources = prediction_for(
        synth_exam_small, drop=["R-MLO"], models=[model_info(operating_point=None)]
    )
    path = tmp_path / "cad.dcm"
    build_cad_sr(prediction, sources).save_as(path, enforce_file_format=True)
    report = pixelmed_report(path)
    assert "Found Root Template TID_4000" in report
    assert pixelmed_errors(report) == []
    assert "Content Item not in template" not in report
