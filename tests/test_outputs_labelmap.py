"""The OHIF overlay SEG (`labelmap_seg`): a binary SEG per view of the region at or above the
display threshold, with the nominal plane geometry OHIF needs, valid for dciodvfy and
highdicom, registered with the worker's per-image isolation."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom

from plugin import isolation
from plugin.outputs import OutputKind, build_labelmap_segs, build_segs
from plugin.outputs.heatmap import DISPLAY_FLOOR
from tests.support.outputs_samples import dciodvfy_errors, model_info, prediction_for


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(buffer.getvalue()))


def test_region_at_the_threshold_on_the_source_grid(synth_exam_small, tmp_path):
    prediction, sources = prediction_for(synth_exam_small)
    segs = build_labelmap_segs(prediction, sources)
    assert len({s.SeriesInstanceUID for s in segs}) == 4  # OHIF shows a series' first SEG
    assert {int(s.SeriesNumber) for s in segs} == {9006}
    for seg in segs:
        src_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        img = prediction.image(src_uid.ReferencedSOPInstanceUID)
        read = hd.seg.segread(pydicom.filebase.DicomBytesIO(_bytes(seg)))
        assert read.SegmentationType == "BINARY"
        mask = read.get_pixels_by_source_instance(
            source_sop_instance_uids=[img.sop_instance_uid], segment_numbers=[1]
        )[0, ..., 0]
        expected = img.malignant_map >= np.ceil(0.5 * 255)  # level of the operating point
        assert mask.shape == img.malignant_map.shape
        assert (mask.astype(bool) == expected).all()
        assert "from 50%" in seg.SegmentSequence[0].SegmentLabel
        # Our heat-map's hot end (OHIF warns and picks a colour of its own without one).
        colour = hd.color.CIELabColor.from_dicom_value(
            seg.SegmentSequence[0].RecommendedDisplayCIELabValue
        )
        assert np.abs(np.subtract(colour.to_rgb(), (253, 231, 37))).max() <= 1
        # The nominal plane OHIF needs, in a frame of reference of the SEG's own.
        shared = seg.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
            1,
            0,
            0,
            0,
            1,
            0,
        ]
        measures = shared.PixelMeasuresSequence[0]
        source = sources[img.sop_instance_uid]
        assert [float(v) for v in measures.PixelSpacing] == list(source.ImagerPixelSpacing)
        frame = seg.PerFrameFunctionalGroupsSequence[0]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [0, 0, 0]
        assert seg.FrameOfReferenceUID != source.get("FrameOfReferenceUID")
        assert list(seg.PatientOrientation) == list(source.PatientOrientation)
        path = tmp_path / "labelmap.dcm"
        seg.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    positive = [s for s in segs if prediction.image(_source(s)).malignant > 0.5]
    assert positive and all(_roundtrip(s).pixel_array.any() for s in positive)


def test_threshold_is_the_display_floor_without_an_operating_point(synth_exam_small):
    prediction, sources = prediction_for(
        synth_exam_small, models=[model_info(operating_point=None)]
    )
    seg = build_labelmap_segs(prediction, sources)[0]
    assert f"from {100 * DISPLAY_FLOOR:.0f}%" in seg.SegmentSequence[0].SegmentLabel


def test_fractional_seg_shares_pixel_measures(synth_exam_small):
    """OHIF crashes opening a SEG without shared Pixel Measures; highdicom still reads it."""
    prediction, sources = prediction_for(synth_exam_small)
    seg = build_segs(prediction, sources)[0]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.4, 0.4]
    assert float(measures.SliceThickness) == 1.0  # nominal: the synthetic header has none
    hd.seg.segread(pydicom.filebase.DicomBytesIO(_bytes(seg)))


def test_the_worker_builds_every_kind(synth_exam_small):
    """The worker's per-image isolation knows every output kind."""
    prediction, sources = prediction_for(synth_exam_small)
    objects, failed = isolation.build_isolated(prediction, sources, list(OutputKind))
    assert failed == {}
    assert {o.kind for o in objects} == set(OutputKind)


def _source(seg: pydicom.Dataset) -> str:
    return seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
