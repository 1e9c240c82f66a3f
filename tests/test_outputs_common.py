"""build_outputs as the worker calls it: typed result objects (kind, data set, source image),
deterministic UIDs, study/series placement, equipment, algorithm identification and the "not
for clinical use" label on every object."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.results import map_levels
from plugin import __version__
from plugin.outputs import (
    DEFAULT_KINDS,
    EXAM_LEVEL,
    NOT_FOR_CLINICAL_USE,
    PER_IMAGE,
    OutputKind,
    OutputOptions,
    build_outputs,
)
from plugin.outputs.common import (
    DCM_PROBABILITY_OF_CANCER,
    UCUM_PERCENT,
    comprehensive_sr,
    derive_uid,
    equipment,
    model_device_uid,
    ordered_images,
)
from tests.support.maps import malignant_fields
from tests.support.outputs_samples import model_info, prediction_for

ALL = list(OutputKind)


def _uids(objects) -> list[tuple[str, str]]:
    return [(o.dataset.SeriesInstanceUID, o.dataset.SOPInstanceUID) for o in objects]


def _datasets(objects) -> list:
    return [o.dataset for o in objects]


def _referenced_source(ds) -> str | None:
    """The one image a per-view object references, as a viewer reads it."""
    if "SourceImageSequence" in ds:
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    if "ReferencedSeriesSequence" in ds:
        series = ds.ReferencedSeriesSequence[0]
        return str(series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    return None


@pytest.fixture(scope="module")
def objects(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    return prediction, sources, build_outputs(prediction, sources, ALL)


def test_every_kind_in_order_in_the_source_study(objects, synth_exam_small):
    prediction, sources, objs = objects
    kinds = [o.kind for o in objs]
    built = _datasets(objs)
    assert (
        kinds
        == [OutputKind.CAD_SR, OutputKind.TID1500, OutputKind.TID1500_SCORES]
        + [OutputKind.SEG] * 4
        + [OutputKind.SC] * 4
        + [OutputKind.LABELMAP_SEG] * 4
    )
    assert {o.StudyInstanceUID for o in built} == {synth_exam_small.study_instance_uid}
    source_series = {s.SeriesInstanceUID for s in sources.values()}
    series_by_kind = {}
    for o, kind in zip(built, kinds, strict=True):
        series_by_kind.setdefault(kind, set()).add((o.SeriesInstanceUID, int(o.SeriesNumber)))
        assert o.SeriesInstanceUID not in source_series
        assert o.PatientID == synth_exam_small.patient_id
    # One series per kind; the OHIF overlay SEGs one per view (OHIF shows a series' first).
    assert len(series_by_kind.pop(OutputKind.LABELMAP_SEG)) == 4
    assert all(len(v) == 1 for v in series_by_kind.values())
    numbers = [next(iter(v))[1] for v in series_by_kind.values()]
    assert len(set(numbers)) == len(numbers)
    assert len({o.SOPInstanceUID for o in built}) == len(built)
    # Each object carries its source image, the one its data set references; the SRs none.
    for o in objs:
        assert o.source_sop_instance_uid == _referenced_source(o.dataset), o.kind
    assert {
        o.source_sop_instance_uid for o in objs if o.kind in (OutputKind.SEG, OutputKind.SC)
    } == set(sources)
    # The hanging order is R-CC, L-CC, R-MLO, L-MLO.
    for kind in (OutputKind.SEG, OutputKind.SC, OutputKind.LABELMAP_SEG):
        order = [prediction.image(o.source_sop_instance_uid) for o in objs if o.kind is kind]
        assert [f"{i.laterality}-{i.view}" for i in order] == ["R-CC", "L-CC", "R-MLO", "L-MLO"]
    assert [o.source_sop_instance_uid for o in objs[:3]] == [None, None, None]


def test_equipment_and_label(objects):
    _, _, built = objects
    for o in _datasets(built):
        assert o.Manufacturer == "mammo-ai-plugin"
        assert o.ManufacturerModelName == "mammo-ai-plugin"
        assert o["SoftwareVersions"].VM == 1 and o.SoftwareVersions == __version__
        assert o.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)


def _algorithms(ds) -> list:
    """IHE AIR: the Contributing Equipment items that name a processing algorithm."""
    return [
        e
        for e in ds.ContributingEquipmentSequence
        if (
            e.PurposeOfReferenceCodeSequence[0].CodeValue,
            e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
        )
        == ("1630", "99IHE")
    ]


def test_ihe_air_one_contributing_item_per_algorithm_in_every_object(synth_exam_small):
    members = [
        replace(model_info(), file_sha256=hashlib.sha256(b"gmic weights").hexdigest()),
        replace(
            model_info("test-allconv", "2.3", family="allconv"),
            file_sha256=hashlib.sha256(b"allconv weights").hexdigest(),
        ),
    ]
    prediction, sources = prediction_for(synth_exam_small, models=members, rois=True)
    objs = build_outputs(prediction, sources, ALL)
    built = _datasets(objs)
    items = [_algorithms(o) for o in built]
    first = [(e.ManufacturerModelName, e.DeviceUID) for e in items[0]]
    for o, algorithms in zip(built, items, strict=True):
        # Each member, then the ensemble; the same items (and Device UIDs) in every object.
        assert [(e.ManufacturerModelName, e.DeviceUID) for e in algorithms] == first, o.Modality
        for e in algorithms:
            assert e.Manufacturer == "mammo-ai-plugin"
            assert e.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
            assert e.ContributionDescription
    gmic, allconv, ensemble = items[0]
    assert (gmic.ManufacturerModelName, gmic.SoftwareVersions) == ("test-gmic", "1.0")
    assert (allconv.ManufacturerModelName, allconv.SoftwareVersions) == ("test-allconv", "2.3")
    assert "member 2 of 2" in allconv.ContributionDescription
    assert ensemble.ManufacturerModelName == "mammo-ai-plugin ensemble"
    assert ensemble.SoftwareVersions == __version__
    assert len({gmic.DeviceUID, allconv.DeviceUID, ensemble.DeviceUID}) == 3
    # The TID 1500 observer device is the ensemble.
    tid1500 = next(o.dataset for o in objs if o.kind is OutputKind.TID1500)
    uids = [e.value for e in tid1500.iterall() if e.keyword == "UID" and e.tag.group == 0x0040]
    assert str(ensemble.DeviceUID) in [str(u) for u in uids]

    # Retrained (new file content, same name and version): new member and ensemble UIDs; the
    # untouched member keeps its own.
    retrained = [replace(members[0], file_sha256=hashlib.sha256(b"retrained").hexdigest())]
    again, _ = prediction_for(synth_exam_small, models=retrained + members[1:], rois=True)
    new_gmic, new_allconv, new_ensemble = _algorithms(
        build_outputs(again, sources, [OutputKind.CAD_SR])[0].dataset
    )
    assert new_gmic.DeviceUID != gmic.DeviceUID
    assert new_allconv.DeviceUID == allconv.DeviceUID
    assert new_ensemble.DeviceUID != ensemble.DeviceUID


def test_device_uid_is_the_model_files_content_hash(tmp_path):
    """What the service loads: Ensemble reports each member's file hash."""
    weights = (
        Path(__file__).resolve().parents[1] / "models" / "weights" / "demo-allconv.safetensors"
    )
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(weights, copy)
    (info,) = Ensemble(EnsembleSpec((MemberSpec(copy),), device="cpu")).models
    assert info.file_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    # Same content under another path: the same Device UID.
    (original,) = Ensemble(EnsembleSpec((MemberSpec(weights),), device="cpu")).models
    assert model_device_uid(info) == model_device_uid(original)


def test_rerun_gives_identical_uids(objects):
    prediction, sources, built = objects
    again = build_outputs(prediction, sources, ALL)
    assert _uids(again) == _uids(built)
    seg, again_seg = built[3].dataset, again[3].dataset
    assert (
        seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
        == again_seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )


def test_uids_change_with_model_version_inputs_and_prefix(synth_exam_small, objects):
    _, _, built = objects
    kinds = [OutputKind.CAD_SR, OutputKind.SEG]
    newer, sources = prediction_for(synth_exam_small, models=[model_info(version="1.1")])
    changed = build_outputs(newer, sources, kinds)
    old = {o.SOPInstanceUID for o in _datasets(built)}
    assert not old & {o.SOPInstanceUID for o in _datasets(changed)}
    partial, fewer = prediction_for(synth_exam_small, drop=["R-MLO"])
    assert not old & {o.SOPInstanceUID for o in _datasets(build_outputs(partial, fewer, kinds))}
    prefixed = _datasets(build_outputs(newer, sources, kinds, OutputOptions(uid_prefix="1.2.3.4.")))
    assert all(o.SOPInstanceUID.startswith("1.2.3.4.") for o in prefixed)
    # Every UID the plugin makes is under the site's root (nested ones name the sources).
    ours = [o.SeriesInstanceUID for o in prefixed] + [
        e.value for o in prefixed for e in o.iterall() if e.keyword == "DimensionOrganizationUID"
    ]
    assert len(ours) > len(prefixed)
    assert all(str(uid).startswith("1.2.3.4.") for uid in ours)


def test_validated_models_are_not_labelled(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    for o in _datasets(build_outputs(prediction, sources, DEFAULT_KINDS)):
        assert NOT_FOR_CLINICAL_USE not in o.SeriesDescription


def test_unknown_kind_and_missing_source_are_refused(objects):
    prediction, sources, _ = objects
    with pytest.raises(ValueError):
        build_outputs(prediction, sources, ["gsps"])
    partial = dict(list(sources.items())[:2])
    with pytest.raises(ValueError, match="missing from `sources`"):
        build_outputs(prediction, partial, [OutputKind.CAD_SR])


def test_region_centres_on_the_fp32_peak_and_spans_the_half_maximum_levels(synth_exam_small):
    """Without ROIs the region is the saliency peak's: the ensemble's fp32 peak, though an
    earlier pixel rounds to the same top level, and the blob of levels at least half the
    peak's level around it; a map that rounds to 0 everywhere marks the whole image."""
    prediction, _ = prediction_for(synth_exam_small, rois=False)
    img = prediction.images[0]
    rows, cols = img.malignant_map.shape
    values = np.zeros((rows, cols), np.float32)
    values[5, 5] = 0.999  # level 255, first in row-major order
    values[100:110, 200:230] = 0.6  # level 153: half the peak's level, rounded up, is 128
    values[104, 210] = 1.0  # the fp32 peak, level 255
    values[110:112, 200:230] = 127 / 255  # next to the blob, below half: not in it
    # As the ensemble hands it over: the levels, with the peak it found in fp32.
    region = replace(img, **malignant_fields(values), rois=()).region
    assert region.origin == "saliency"
    assert region.center == (104.5, 210.5)
    assert region.box == (100.0, 200.0, 110.0, 230.0)
    faint = np.full((rows, cols), 0.4 / 255, np.float32)  # rounds to level 0
    region = replace(img, **malignant_fields(faint), rois=()).region
    assert region.origin == "image" and region.box == (0.0, 0.0, float(rows), float(cols))


@pytest.mark.parametrize("rois", [True, False], ids=["roi-regions", "saliency-regions"])
def test_the_srs_are_the_same_from_the_prediction_without_maps(synth_exam_small, rois):
    """The exam-level SRs read scores, ROIs and each image's region, never a map: built from
    `without_maps` (what the pipeline hands the SRs' process) they are the same documents,
    byte for byte, whether the regions came from ROIs or from the maps' blobs. The lean
    prediction pickles without the maps, and what needs maps says why it has none."""
    prediction, sources = prediction_for(synth_exam_small, rois=rois)
    lean = prediction.without_maps()
    assert all(i.malignant_map is None and i.benign_map is None for i in lean.images)
    assert [i.region for i in lean.images] == [i.region for i in prediction.images]
    assert {i.region.origin for i in lean.images} <= ({"roi"} if rois else {"saliency", "image"})
    maps = sum(i.malignant_map.nbytes + i.benign_map.nbytes for i in prediction.images)
    assert len(pickle.dumps(lean)) < len(pickle.dumps(prediction)) - maps
    for kind, build in EXAM_LEVEL.items():
        assert _written(build(lean, sources, OutputOptions())) == _written(
            build(prediction, sources, OutputOptions())
        ), kind
    img = lean.images[0]
    for build in PER_IMAGE.values():
        with pytest.raises(ValueError, match=r"has no maps \(ImagePrediction.without_maps\)"):
            build(lean, img, sources[img.sop_instance_uid], 1, OutputOptions())
    with pytest.raises(TypeError, match=r"maps were left out \(without_maps\) cannot be rebuilt"):
        replace(img, malignant=0.5)


def test_a_float_map_is_refused_with_what_to_do(synth_exam_small):
    """A prediction's maps are uint8 levels only (one representation from the ensemble to
    every output); probabilities are turned into them by the ensemble's rule, map_levels."""
    prediction, _ = prediction_for(synth_exam_small)
    img = prediction.images[0]
    p = img.malignant_map / np.float32(255)
    for field in ("malignant_map", "benign_map"):
        what = rf"{field} must be uint8 levels .*models\.results\.map_levels\(p\)"
        with pytest.raises(TypeError, match=what):
            replace(img, **{field: p})
    with pytest.raises(ValueError, match="benign_map must be .rows, cols. on the source grid"):
        replace(img, benign_map=img.benign_map[:-1])
    levels = replace(img, malignant_map=map_levels(p), benign_map=map_levels(p))
    assert np.array_equal(levels.malignant_map, img.malignant_map)


def _written(ds: pydicom.Dataset) -> bytes:
    """The file's bytes, the creation times highdicom stamps (now) set to one value."""
    for keyword in ("InstanceCreation", "Content"):
        setattr(ds, f"{keyword}Date", "20260101")
        setattr(ds, f"{keyword}Time", "120000")
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20260101120000"
    with pydicom.filebase.DicomBytesIO() as buffer:
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


def test_comprehensive_sr_is_highdicoms_document_without_copying_the_tree(synth_exam_small):
    """`comprehensive_sr` hands highdicom's ComprehensiveSR the bare root (it would copy and
    search a whole tree) and attaches the tree after: byte for byte the document the whole
    tree gives, holding the tree itself, and highdicom reads it back whole."""
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    images = [sources[i.sop_instance_uid] for i in ordered_images(prediction)]
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=pydicom.uid.generate_uid(), identifier=img.view_key
            ),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=img.region.outline_xy(),
                source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
            ),
            measurements=[hd.sr.Measurement(DCM_PROBABILITY_OF_CANCER, 70.0, UCUM_PERCENT)],
        )
        for img, ds in zip(ordered_images(prediction), images, strict=True)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=groups,
        referenced_images=images,
    )
    arguments = dict(
        series_instance_uid=derive_uid(prediction, "test", "series"),
        series_number=9100,
        sop_instance_uid=derive_uid(prediction, "test", "instance"),
        instance_number=1,
        is_complete=True,
        **equipment(prediction),
    )
    ours = comprehensive_sr(images, report, **arguments)
    theirs = hd.sr.ComprehensiveSR(evidence=images, content=report, **arguments)
    assert _written(ours) == _written(theirs)
    assert ours.ContentSequence is report[0].ContentSequence  # not a copy
    back = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(_written(ours))))
    assert len(back.content.get_planar_roi_measurement_groups()) == 4
