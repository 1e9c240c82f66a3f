"""Fractional SEG: read back with highdicom, values within 1/255, the 255 maximum (and the 256
wrap it avoids), the source grid, and dciodvfy."""

from __future__ import annotations

import copy
from dataclasses import replace

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.results import map_levels
from plugin.outputs import MAX_FRACTIONAL_VALUE, NOT_FOR_CLINICAL_USE, build_seg, build_segs
from plugin.outputs.common import OutputOptions
from plugin.outputs.seg import finish_seg, plan_seg
from tests.support.outputs_samples import dciodvfy_errors, model_info, prediction_for


@pytest.fixture(scope="module")
def segs(synth_exam_small, tmp_path_factory):
    prediction, sources = prediction_for(synth_exam_small)
    folder = tmp_path_factory.mktemp("seg")
    paths = []
    for n, seg in enumerate(build_segs(prediction, sources)):
        path = folder / f"seg{n}.dcm"
        seg.save_as(path, enforce_file_format=True)
        paths.append(path)
    return prediction, sources, paths


def _source_uid(seg: pydicom.Dataset) -> str:
    return str(
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    )


def test_read_back_matches_maps(segs):
    prediction, sources, paths = segs
    assert len(paths) == 4
    for path in paths:
        seg = hd.seg.segread(path)
        uid = _source_uid(seg)
        img, src = prediction.image(uid), sources[uid]
        assert seg.MaximumFractionalValue == MAX_FRACTIONAL_VALUE == 255
        assert seg.SegmentationFractionalType == "PROBABILITY"
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        assert list(seg.PatientOrientation) == list(src.PatientOrientation)
        assert "FrameOfReferenceUID" not in seg
        assert seg.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
        assert seg.StudyInstanceUID == src.StudyInstanceUID
        pixels = seg.get_pixels_by_source_instance([uid], rescale_fractional=True)[0]
        # Exactly the maps' 8-bit levels k as k/255.
        assert np.abs(pixels[..., 0] - img.malignant_map / 255).max() <= 1e-6
        assert np.abs(pixels[..., 1] - img.benign_map / 255).max() <= 1e-6
        # The peak stays where it was (8-bit plateaus can move it by a few pixels).
        decoded = np.unravel_index(np.argmax(pixels[..., 0]), pixels.shape[:2])
        truth = np.unravel_index(np.argmax(img.malignant_map), img.malignant_map.shape)
        assert np.hypot(*np.subtract(decoded, truth)) <= 5


def test_segments_are_coded_and_name_the_algorithm(segs):
    prediction, sources, paths = segs
    seg = pydicom.dcmread(paths[0])
    malignant, benign = seg.SegmentSequence
    assert malignant.SegmentedPropertyTypeCodeSequence[0].CodeValue == "86049000"
    assert benign.SegmentedPropertyTypeCodeSequence[0].CodeValue == "3898006"
    assert malignant.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert malignant.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = malignant.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("test-gmic", "1.0")
    assert NOT_FOR_CLINICAL_USE in algorithm.AlgorithmParameters
    region = malignant.AnatomicRegionSequence[0].CodeValue
    lat = prediction.image(_source_uid(seg)).laterality
    assert region == {"R": "73056007", "L": "80248007"}[lat]
    assert "Laterality" not in seg  # in the segment's anatomic region instead (validators)
    assert seg.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
    assert seg.Manufacturer == "mammo-ai-plugin"


def test_no_benign_segment_without_benign_map(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, benign=False)
    seg = build_segs(prediction, sources)[0]
    assert len(seg.SegmentSequence) == 1


def test_probability_one_is_stored_as_255_not_wrapped(synth_exam_small, tmp_path):
    """Regression: highdicom accepts max_fractional_value=256 and then stores p=1.0 as 0."""
    prediction, sources = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    img = prediction.images[0]
    ones = np.ones(img.malignant_map.shape, np.float32)
    ones[0, 0] = 0.5
    img = replace(img, malignant_map=map_levels(ones))
    path = tmp_path / "seg.dcm"
    build_seg(prediction, img, sources[img.sop_instance_uid]).save_as(path)
    raw = pydicom.dcmread(path).pixel_array
    frame = raw[0] if raw.ndim == 3 else raw
    assert frame[1, 1] == 255 and frame[0, 0] == 128
    read = hd.seg.segread(path).get_pixels_by_source_instance(
        [img.sop_instance_uid], rescale_fractional=True
    )[0]
    assert read[1, 1, 0] == 1.0


def test_map_off_the_source_grid_is_refused(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small)
    img = prediction.images[0]
    small = replace(img, malignant_map=img.malignant_map[::2, ::2], benign_map=None)
    with pytest.raises(ValueError, match="source grid"):
        build_seg(prediction, small, sources[img.sop_instance_uid])


def test_the_source_keeps_its_grid(synth_exam_small):
    """build_seg hands highdicom a one-pixel copy of the source's header: the source itself
    must not see it, and the SEG has the source's grid."""
    prediction, sources = prediction_for(synth_exam_small)
    img = prediction.images[0]
    source = sources[img.sop_instance_uid]
    seg = build_seg(prediction, img, source)
    assert (source.Rows, source.Columns) == img.malignant_map.shape == (seg.Rows, seg.Columns)


def test_source_without_frame_of_reference_or_orientation(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small)
    img = prediction.images[0]
    src = copy.deepcopy(sources[img.sop_instance_uid])
    del src.PatientOrientation
    seg = build_seg(prediction, img, src, options=OutputOptions())
    assert seg.PatientOrientation == ""


def test_dciodvfy_accepts(segs):
    _, _, paths = segs
    for path in paths[:2]:
        assert dciodvfy_errors(path) == []


def test_stores_the_ensembles_levels_as_they_are(synth_exam_small):
    """The ensemble hands over uint8 levels round(p * 255); the SEG stores every one of them,
    0 to 255, unchanged."""
    prediction, sources = prediction_for(synth_exam_small)
    img = next(i for i in prediction.images if i.malignant > 0.5)
    every = img.malignant_map.copy()
    every[:4, :256] = np.arange(256, dtype=np.uint8)
    seg = build_seg(prediction, replace(img, malignant_map=every), sources[img.sop_instance_uid])
    stored = pydicom.dcmread(_saved(seg)).pixel_array
    assert np.array_equal(stored[0], every) and np.array_equal(stored[1], img.benign_map)


def _saved(ds: pydicom.Dataset) -> pydicom.filebase.DicomBytesIO:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


_CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


@pytest.mark.parametrize("benign", [True, False], ids=["two segments", "one segment"])
def test_file_is_the_one_highdicom_writes_from_the_fractions(synth_exam_small, benign):
    """build_seg skips highdicom's float check and rounding (a placeholder, then pydicom's
    compress of the levels); the file must be byte for byte the one highdicom builds from the
    fractions k/255 itself, but for the clock readings."""
    prediction, sources = prediction_for(synth_exam_small, benign=benign)
    img = prediction.images[0]
    source = sources[img.sop_instance_uid]
    fast = build_seg(prediction, img, source)
    plan = plan_seg(prediction, img, source)
    fractions = np.stack(plan.levels, axis=-1)[None].astype(np.float32) / np.float32(255)
    reference = hd.seg.Segmentation(
        **plan.arguments, pixel_array=fractions, transfer_syntax_uid=pydicom.uid.JPEGLSLossless
    )
    finish_seg(reference, plan)
    _same_clock(fast, reference, _CLOCK)
    for ours, theirs in zip(
        fast.ContributingEquipmentSequence, reference.ContributingEquipmentSequence, strict=True
    ):
        _same_clock(ours, theirs, ("ContributionDateTime",))
    assert _saved(fast).getvalue() == _saved(reference).getvalue()
    # The object in memory reads back too (highdicom's frame lookup after pydicom's compress).
    read = fast.get_pixels_by_source_instance([img.sop_instance_uid], rescale_fractional=False)
    assert np.array_equal(np.moveaxis(read[0], -1, 0), np.stack(plan.levels))


def _same_clock(ours: pydicom.Dataset, theirs: pydicom.Dataset, keywords: tuple[str, ...]) -> None:
    """Copy our clock readings onto `theirs` (present where ours are, absent where not)."""
    for keyword in keywords:
        if keyword in ours:
            setattr(theirs, keyword, ours[keyword].value)
        elif keyword in theirs:
            delattr(theirs, keyword)
