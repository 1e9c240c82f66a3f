"""build_outputs as the worker calls it: deterministic UIDs, study/series placement,
equipment, algorithm identification and the "not for clinical use" label on every object."""

from __future__ import annotations

import pytest
from outputs_samples import model_info, prediction_for

from plugin import __version__
from plugin.outputs import (
    DEFAULT_KINDS,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    build_outputs,
    output_kind,
    source_instance,
)

ALL = list(OutputKind)


def _uids(objects) -> list[tuple[str, str]]:
    return [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in objects]


@pytest.fixture(scope="module")
def objects(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    return prediction, sources, build_outputs(prediction, sources, ALL)


def test_every_kind_in_order_in_the_source_study(objects, synth_exam_small):
    prediction, sources, built = objects
    kinds = [output_kind(o) for o in built]
    assert (
        kinds
        == [OutputKind.CAD_SR, OutputKind.TID1500, OutputKind.TID1500_SCORES]
        + [OutputKind.SEG] * 4
        + [OutputKind.SC] * 4
    )
    assert {o.StudyInstanceUID for o in built} == {synth_exam_small.study_instance_uid}
    source_series = {s.SeriesInstanceUID for s in sources.values()}
    series_by_kind = {}
    for o, kind in zip(built, kinds, strict=True):
        series_by_kind.setdefault(kind, set()).add((o.SeriesInstanceUID, int(o.SeriesNumber)))
        assert o.SeriesInstanceUID not in source_series
        assert o.PatientID == synth_exam_small.patient_id
    assert all(len(v) == 1 for v in series_by_kind.values())  # one series per kind
    numbers = [next(iter(v))[1] for v in series_by_kind.values()]
    assert len(set(numbers)) == len(numbers)
    assert len({o.SOPInstanceUID for o in built}) == len(built)
    # SEG and SC name their source image; the hanging order is R-CC, L-CC, R-MLO, L-MLO.
    segs = [o for o, k in zip(built, kinds, strict=True) if k is OutputKind.SEG]
    order = [prediction.image(source_instance(s)) for s in segs]
    assert [f"{i.laterality}-{i.view}" for i in order] == ["R-CC", "L-CC", "R-MLO", "L-MLO"]
    assert source_instance(built[0]) is None


def test_equipment_and_label(objects):
    _, _, built = objects
    for o in built:
        assert o.Manufacturer == "mammo-ai-plugin"
        assert o.ManufacturerModelName == "mammo-ai-plugin"
        assert __version__ in list(o.SoftwareVersions) or o.SoftwareVersions == __version__
        assert o.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
        # IHE AIR: this software as processing equipment, with the models' versions.
        processing = [
            e
            for e in o.ContributingEquipmentSequence
            if e.Manufacturer == "mammo-ai-plugin"
            and e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        ][0]
        assert "test-gmic 1.0" in list(processing.SoftwareVersions)


def test_rerun_gives_identical_uids(objects):
    prediction, sources, built = objects
    again = build_outputs(prediction, sources, ALL)
    assert _uids(again) == _uids(built)
    seg, again_seg = built[3], again[3]
    assert (
        seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
        == again_seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )


def test_uids_change_with_model_version_inputs_and_prefix(synth_exam_small, objects):
    _, _, built = objects
    kinds = [OutputKind.CAD_SR, OutputKind.SEG]
    newer, sources = prediction_for(synth_exam_small, models=[model_info(version="1.1")])
    changed = build_outputs(newer, sources, kinds)
    old = {o.SOPInstanceUID for o in built}
    assert not old & {o.SOPInstanceUID for o in changed}
    partial, fewer = prediction_for(synth_exam_small, drop=["R-MLO"])
    assert not old & {o.SOPInstanceUID for o in build_outputs(partial, fewer, kinds)}
    prefixed = build_outputs(newer, sources, kinds, OutputOptions(uid_prefix="1.2.3.4."))
    assert all(o.SOPInstanceUID.startswith("1.2.3.4.") for o in prefixed)
    # Every UID the plugin makes is under the site's root (nested ones name the sources).
    ours = [o.SeriesInstanceUID for o in prefixed] + [
        e.value for o in prefixed for e in o.iterall() if e.keyword == "DimensionOrganizationUID"
    ]
    assert len(ours) > len(prefixed)
    assert all(str(uid).startswith("1.2.3.4.") for uid in ours)


def test_validated_models_are_not_labelled(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    for o in build_outputs(prediction, sources, DEFAULT_KINDS):
        assert NOT_FOR_CLINICAL_USE not in o.SeriesDescription


def test_unknown_kind_and_missing_source_are_refused(objects):
    prediction, sources, _ = objects
    with pytest.raises(ValueError):
        build_outputs(prediction, sources, ["gsps"])
    partial = dict(list(sources.items())[:2])
    with pytest.raises(ValueError, match="missing from `sources`"):
        build_outputs(prediction, partial, [OutputKind.CAD_SR])
