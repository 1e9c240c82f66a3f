"""Patient-level, stratified, seeded splits (trainer.split)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import pytest

from trainer.sitedata import SiteData, SiteDataError, SiteImage
from trainer.split import split_site_data


def _data(n_patients: int = 60, split: bool = False) -> SiteData:
    images = []
    for p in range(n_patients):
        malignant_side = "L" if p % 4 == 0 else None  # 25% positive patients
        for side in ("L", "R"):
            for view in ("CC", "MLO"):
                images.append(
                    SiteImage(
                        path=Path(f"/nowhere/{p}/{side}{view}.dcm"),
                        sop_instance_uid=f"1.2.{p}.{side == 'L'}.{view == 'CC'}",
                        study_instance_uid=f"1.3.{p}",
                        patient_id=f"PAT{p:03d}",
                        laterality=side,
                        view=view,
                        malignant=int(side == malignant_side),
                        benign=None,
                        split=("train", "val", "test")[p % 3] if split else None,
                    )
                )
    images.sort(key=lambda im: im.sop_instance_uid)
    return SiteData(Path("/nowhere"), tuple(images), "image", 0)


def _patients_by_split(data: SiteData, assignment: dict[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for im in data.images:
        out[assignment[im.sop_instance_uid]].add(im.patient_id)
    return out


def test_no_patient_is_in_two_splits_and_positives_are_stratified():
    data = _data()
    split = split_site_data(data, seed=1)
    by = _patients_by_split(data, split.assignment)
    assert not (by["train"] & by["val"]) and not (by["train"] & by["test"])
    assert not (by["val"] & by["test"])
    assert {k: len(v) for k, v in by.items()} == {"train": 42, "val": 9, "test": 9}
    counts = split.counts(data)
    # 15 positive patients (two malignant images each): 11 train, 2 val, 2 test
    assert [counts[s]["malignant_images"] for s in ("train", "val", "test")] == [22, 4, 4]


def test_split_is_a_pure_function_of_data_and_seed():
    data = _data()
    reordered = dataclasses.replace(data, images=tuple(reversed(data.images)))
    assert split_site_data(data, 4).assignment == split_site_data(reordered, 4).assignment
    assert split_site_data(data, 4).assignment != split_site_data(data, 5).assignment


def test_a_split_column_is_used_as_given():
    data = _data(split=True)
    split = split_site_data(data, seed=123)
    assert split.source == "labels.csv"
    assert all(split.assignment[im.sop_instance_uid] == im.split for im in data.images)


def test_a_partly_filled_split_column_is_an_error():
    data = _data(split=True)
    images = list(data.images)
    images[0] = dataclasses.replace(images[0], split=None)
    with pytest.raises(SiteDataError, match="1 rows leave it empty"):
        split_site_data(dataclasses.replace(data, images=tuple(images)))


def test_tiny_sets_still_get_a_val_and_test_patient_per_stratum():
    split = split_site_data(_data(n_patients=12), seed=0)
    counts = split.counts(_data(n_patients=12))
    assert all(counts[s]["malignant_images"] >= 1 for s in ("train", "val", "test"))
