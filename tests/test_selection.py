"""View selection: one instance per screening view, a specific reason for every skipped one,
the policy's options, and the store's JSON facts as input."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForProcessing,
    generate_uid,
)

from models.header import ImageDescription, describe
from models.mammogram import SCREENING_VIEW_KEYS
from plugin.selection import (
    Candidate,
    SelectionPolicy,
    TieBreak,
    Use,
    select_views,
)

FOR_PROCESSING = DigitalMammographyXRayImageStorageForProcessing
TOMOSYNTHESIS = BreastTomosynthesisImageStorage


@pytest.fixture
def headers(synth_exam_small) -> dict[str, Dataset]:
    """The four views' headers (no pixel data), by view key."""
    out = {}
    for image in synth_exam_small.images:
        ds = copy.deepcopy(image.dataset)
        del ds.PixelData
        out[image.view_key] = ds
    return out


def variant(ds: Dataset, **changes: Any) -> Dataset:
    new = copy.deepcopy(ds)
    new.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(new, keyword, value)
    return new


def code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def with_modifier(ds: Dataset, value: str, meaning: str) -> Dataset:
    new = variant(ds)
    new.ViewCodeSequence[0].ViewModifierCodeSequence = [code(value, meaning)]
    return new


def reasons(selection) -> dict[str, str]:
    return {str(item.SOPInstanceUID): reason for item, reason in selection.skipped}


def test_complete_exam(headers):
    selection = select_views(list(headers.values()))
    assert selection.complete and selection.missing == ()
    assert selection.skipped == []
    assert {k: v.SOPInstanceUID for k, v in selection.chosen.items()} == {
        k: v.SOPInstanceUID for k, v in headers.items()
    }


def test_retake_latest_acquisition_wins(headers):
    first = variant(headers["L-CC"], AcquisitionDateTime="20240101090000", InstanceNumber=9)
    retake = variant(headers["L-CC"], AcquisitionDateTime="20240101091500", InstanceNumber=2)
    items = [headers["R-CC"], first, retake]
    selection = select_views(items)
    assert selection.chosen["L-CC"] is retake
    assert "duplicate L-CC" in reasons(selection)[first.SOPInstanceUID]
    assert "later acquisition" in reasons(selection)[first.SOPInstanceUID]
    assert selection.missing == ("R-MLO", "L-MLO")
    # The other tie-break picks the higher instance number.
    by_number = select_views(items, SelectionPolicy(tie_break=TieBreak.HIGHEST_INSTANCE_NUMBER))
    assert by_number.chosen["L-CC"] is first
    assert "higher instance number" in reasons(by_number)[retake.SOPInstanceUID]


def test_same_instance_twice_is_skipped(headers):
    selection = select_views([headers["R-CC"], headers["R-CC"]])
    assert len(selection.chosen) == 1
    assert "duplicate SOPInstanceUID" in selection.skipped[0][1]


def test_for_processing_skipped_or_fallback(headers):
    raw = variant(
        headers["R-MLO"], SOPClassUID=FOR_PROCESSING, PresentationIntentType="FOR PROCESSING"
    )
    selection = select_views([headers["R-CC"], raw])
    assert (
        "For Processing image: policy for_processing=skip" in reasons(selection)[raw.SOPInstanceUID]
    )
    assert "R-MLO" in selection.missing

    fallback = SelectionPolicy(for_processing=Use.FALLBACK)
    alone = select_views([raw], fallback)
    assert alone.chosen["R-MLO"] is raw
    both = select_views([raw, headers["R-MLO"]], fallback)
    assert both.chosen["R-MLO"] is headers["R-MLO"]
    assert "screening preferred over For Processing" in reasons(both)[raw.SOPInstanceUID]


def test_synthetic_2d_and_implant_displaced(headers):
    synthetic = variant(headers["L-MLO"], ImageType=["DERIVED", "PRIMARY", "", "GENERATED_2D"])
    assert describe(synthetic).kind.value == "synthetic_2d"
    default = select_views([synthetic, headers["L-MLO"]])
    assert default.chosen["L-MLO"] is headers["L-MLO"]
    assert "synthetic 2D" in reasons(default)[synthetic.SOPInstanceUID]
    assert select_views([synthetic]).chosen["L-MLO"] is synthetic  # fallback by default
    prefer = select_views([headers["L-MLO"], synthetic], {"synthetic_2d": "prefer"})
    assert prefer.chosen["L-MLO"] is synthetic

    implant = with_modifier(headers["R-CC"], "399209000", "implant displaced")
    default = select_views([implant, headers["R-CC"]])
    assert default.chosen["R-CC"] is headers["R-CC"]
    prefer = select_views([implant, headers["R-CC"]], {"implant_displaced": "prefer"})
    assert prefer.chosen["R-CC"] is implant


def test_non_screening_views_are_skipped_with_reasons(headers):
    spot = with_modifier(headers["R-CC"], "399055006", "spot compression")
    ml = variant(headers["L-MLO"], ViewPosition="ML")
    ml.ViewCodeSequence = [code("399260004", "medio-lateral")]
    tomo = variant(headers["L-CC"], SOPClassUID=TOMOSYNTHESIS)
    broken = variant(headers["R-MLO"])
    del broken.ImageLaterality
    if "Laterality" in broken:
        del broken.Laterality
    selection = select_views([spot, ml, tomo, broken])
    why = reasons(selection)
    assert (
        "view-modified image (spot compression): policy modified_views=skip"
        == why[spot.SOPInstanceUID]
    )
    assert why[ml.SOPInstanceUID] == "ML view: only CC and MLO are analysed"
    assert why[tomo.SOPInstanceUID].startswith("tomosynthesis")
    assert why[broken.SOPInstanceUID].startswith("unusable header: no laterality")
    assert selection.chosen == {} and selection.missing == ("R-CC", "L-CC", "R-MLO", "L-MLO")
    # Spot views may fill an otherwise empty slot when the site allows it.
    allowed = select_views([spot], SelectionPolicy(modified_views=Use.FALLBACK))
    assert allowed.chosen["R-CC"] is spot


def test_policy_from_config_mapping_names_bad_keys():
    assert (
        SelectionPolicy.from_mapping({"for_processing": "fallback"}).for_processing is Use.FALLBACK
    )
    with pytest.raises(ValueError, match="unknown option\\(s\\) for_procesing"):
        SelectionPolicy.from_mapping({"for_procesing": "skip"})
    with pytest.raises(ValueError, match="synthetic_2d must be one of skip, fallback, prefer"):
        SelectionPolicy.from_mapping({"synthetic_2d": "always"})
    with pytest.raises(ValueError, match="modified_views may be skip or fallback"):
        SelectionPolicy(modified_views=Use.PREFER)


@dataclass(frozen=True)
class StoredInstance:
    """The shape of the service's stored instance: the header's facts as stored and read
    back (`to_json` / `from_json`)."""

    sop_instance_uid: str
    received_at: float
    description: ImageDescription


def test_store_facts_select_like_datasets(headers):
    def stored(ds: Dataset, received_at: float) -> StoredInstance:
        facts = ImageDescription.from_json(describe(ds).to_json())
        assert facts == describe(ds)
        return StoredInstance(str(ds.SOPInstanceUID), received_at, facts)

    again = variant(headers["R-CC"])
    items = [stored(ds, 1.0) for ds in headers.values()] + [stored(again, 2.0)]
    selection = select_views(items, {"tie_break": "latest_received"})
    assert selection.complete
    assert selection.chosen["R-CC"].sop_instance_uid == again.SOPInstanceUID
    assert "received later" in selection.skipped[0][1]
    assert Candidate.from_description(items[0].description).view_key in headers


def test_unknown_item_type_is_refused():
    with pytest.raises(TypeError, match="cannot select views from int"):
        select_views([1])


def test_reads_only_headers(tmp_path, synth_exam_small):
    path = tmp_path / "a.dcm"
    synth_exam_small.images[0].dataset.save_as(path, enforce_file_format=True)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in header
    selection = select_views([header])
    key = synth_exam_small.images[0].view_key
    assert list(selection.chosen) == [key] and selection.chosen[key] is header
    assert selection.skipped == []
    assert selection.missing == tuple(k for k in SCREENING_VIEW_KEYS if k != key)
