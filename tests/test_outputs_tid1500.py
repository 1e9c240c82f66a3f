"""TID 1500 reports: the viewer-friendly one (TID 1410 groups only, "Original Source" for
Orthanc Stone) and the machine one (TID 1501 groups with breast, exam and benign scores)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from plugin.outputs import NOT_FOR_CLINICAL_USE, build_tid1500, build_tid1500_scores
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

SIDE = {"R": "24028007", "L": "7771000"}


def _groups(sr):
    measurements = only(children(sr, "126010"))
    return children(measurements, "125007")


def _site_laterality(group) -> str:
    site = only(children(group, "363698007"))
    assert code_value(site) == "76752008"  # Breast
    return code_value(only(children(site, "272741003")))


def test_viewer_report_structure(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small)
    sr = build_tid1500(prediction, sources)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive, not 3D (Stone)
    assert concept(sr) == "126000"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = _groups(sr)
    assert len(groups) == 4
    seen = set()
    for group in groups:
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        region = only(children(group, "111030"))
        assert region.GraphicType == "POLYLINE"
        xy = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert len(xy) == 5 and np.allclose(xy[0], xy[-1])
        image = only(region.ContentSequence)
        assert concept(image) == "111040"  # "Original Source", which Stone requires
        uid = referenced_uid(region)
        img = prediction.image(uid)
        seen.add(uid)
        prob = only(children(group, "111047"))
        assert num_value(prob) == pytest.approx(100 * img.malignant, abs=0.01)
        units = prob.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (units.CodeValue, units.CodingSchemeDesignator) == ("%", "UCUM")
        assert _site_laterality(group) == SIDE[str(img.laterality)]
        assert only(children(group, "111001")).TextValue == "test-gmic"
        assert only(children(group, "111002")).TextValue.startswith(NOT_FOR_CLINICAL_USE)
        # Breast/exam groups without a region break OHIF: none here.
    assert seen == {i.sop_instance_uid for i in prediction.images}
    assert sr.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == 4


def test_scores_report_has_image_breast_exam_and_benign(synth_exam_small):
    models = [model_info("m1", "1.0"), model_info("m2", "2.0", family="allconv")]
    prediction, sources = prediction_for(synth_exam_small, models=models)
    sr = build_tid1500_scores(prediction, sources)
    groups = _groups(sr)
    assert len(groups) == 4 + 2 + 1
    ids = [only(children(g, "112039")).TextValue for g in groups]
    assert ids[-1] == "exam AI scores" and "R breast AI scores" in ids
    exam = groups[-1]
    values = {concept(m): num_value(m) for m in children(exam) if m.ValueType == "NUM"}
    assert values["111047"] == pytest.approx(100 * prediction.malignant, abs=0.01)
    assert values["BENIGNPROB"] == pytest.approx(100 * prediction.benign, abs=0.01)
    image_group = groups[0]
    probs = children(image_group, "111047")
    assert len(probs) == 3  # ensemble + each member, the members named by their algorithm id
    names = {only(children(p, "111001")).TextValue for p in probs if children(p, "111001")}
    assert names == {"m1", "m2"}
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MAMMOAI"


def test_validators_accept(synth_exam_small, tmp_path):
    prediction, sources = prediction_for(synth_exam_small, drop=["L-CC"])
    for name, build in (("viewer", build_tid1500), ("scores", build_tid1500_scores)):
        path = tmp_path / f"{name}.dcm"
        build(prediction, sources).save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
        assert dsrdump_errors(path) == [], name


def test_highdicom_reads_both_reports_back_whole(synth_exam_small, tmp_path):
    """Built without highdicom's own parse of the tree (`common.comprehensive_sr`), so
    highdicom parses the written files here: its TID 1500 object with every group."""
    prediction, sources = prediction_for(synth_exam_small)
    for build, region_groups, image_groups in ((build_tid1500, 4, 0), (build_tid1500_scores, 0, 7)):
        path = tmp_path / f"{build.__name__}.dcm"
        build(prediction, sources).save_as(path, enforce_file_format=True)
        sr = hd.sr.srread(path)
        assert isinstance(sr, hd.sr.ComprehensiveSR)
        report = sr.content
        assert isinstance(report, hd.sr.MeasurementReport)
        regions = report.get_planar_roi_measurement_groups()
        assert len(regions) == region_groups
        assert len(report.get_image_measurement_groups()) == image_groups
        for group in regions:
            assert group.reference_type == hd.sr.CodedConcept("111030", "DCM", "Image Region")
            assert group.roi.value_type == hd.sr.ValueTypeValues.SCOORD
            (probability,) = group.get_measurements()
            assert probability.unit == hd.sr.CodedConcept("%", "UCUM", "percent")


@pytest.mark.slow
@pytest.mark.parametrize("build", [build_tid1500, build_tid1500_scores])
def test_pixelmed_finds_tid1500_without_errors(synth_exam_small, tmp_path, build):
    prediction, sources = prediction_for(synth_exam_small)
    path = tmp_path / "report.dcm"
    build(prediction, sources).save_as(path, enforce_file_format=True)
    report = pixelmed_report(path)
    assert "Found Root Template TID_1500" in report
    assert pixelmed_errors(report) == []
