"""Site data discovery and labels.csv parsing (trainer.sitedata): each problem has its own
error class and a message naming the row and what to do."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from trainer.sitedata import (
    ConflictingLabelsError,
    DuplicateImageError,
    LabelFileError,
    MaskFileError,
    MissingViewError,
    UnknownImageError,
    UnreadableImageError,
    load_site_data,
)
from trainer.split import split_site_data


@pytest.fixture
def site(synth_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the 4-exam synthetic set, in a different folder layout."""
    root = tmp_path / "site"
    shutil.copytree(synth_dir, root)
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.move(root / "exam_00001", root / "nested" / "deeper" / "exam_00001")
    return root


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _write(root: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _per_breast(root: Path, breasts: dict[tuple[str, str], object]) -> None:
    """labels.csv with one row per (study, laterality): breast-level labels."""
    _write(
        root,
        [
            {"study_instance_uid": s, "laterality": lat, "malignant": m}
            for (s, lat), m in breasts.items()
        ],
        ["study_instance_uid", "laterality", "malignant"],
    )


def _per_uid(root: Path, rows: list[dict[str, str]] | None = None) -> None:
    _write(root, rows or _rows(root), ["sop_instance_uid", "malignant", "benign"])


def test_per_image_labels_by_uid_find_files_in_any_layout(site: Path):
    truth = {r["sop_instance_uid"]: r for r in _rows(site)}
    _per_uid(site)
    data = load_site_data(site)
    assert data.label_level == "image" and len(data.images) == 16
    for im in data.images:
        assert im.malignant == int(truth[im.sop_instance_uid]["malignant"])
        assert (im.laterality, im.view) == (
            truth[im.sop_instance_uid]["laterality"],
            truth[im.sop_instance_uid]["view"],
        )
        assert im.patient_id == truth[im.sop_instance_uid]["patient_id"]  # from the header
    summary = data.summary()
    assert summary["exams"] == 4 and summary["malignant_breasts"] == 2
    assert "SYN" not in str(summary)  # counts only, no identifiers


def test_per_image_labels_by_path(site: Path):
    rows = _rows(site)
    for r in rows:
        if r["path"].startswith("exam_00001"):
            r["path"] = "nested/deeper/" + r["path"]
    _write(site, rows, ["path", "malignant"])
    data = load_site_data(site)
    assert len(data.images) == 16 and all(im.benign is None for im in data.images)


def test_per_breast_labels_apply_to_both_views(site: Path):
    rows = _rows(site)
    breasts = {}
    for r in rows:
        key = (r["study_instance_uid"], r["laterality"])
        breasts[key] = max(breasts.get(key, 0), int(r["malignant"]))
    _per_breast(site, breasts)
    data = load_site_data(site)
    assert data.label_level == "breast" and len(data.images) == 16
    assert sum(im.malignant for im in data.images) == 2 * sum(breasts.values())


def test_per_breast_labels_leave_out_views_the_models_do_not_analyse(site: Path):
    """A For Processing copy beside the For Presentation images is common at sites; a breast
    label must skip it, not reject the whole breast."""
    import pydicom
    from pydicom.uid import generate_uid

    from models.header import MG_FOR_PROCESSING

    rows = _rows(site)
    ds = pydicom.dcmread(site / "exam_00002" / "L-CC.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.save_as(site / "exam_00002" / "L-CC-raw.dcm")
    breasts = {(r["study_instance_uid"], r["laterality"]): r["malignant"] for r in rows}
    _per_breast(site, breasts)
    data = load_site_data(site)
    assert len(data.images) == 16 and data.unlabelled == 1
    assert ds.SOPInstanceUID not in {im.sop_instance_uid for im in data.images}
    # Labelled by itself, the same image is an error that says why.
    _write(
        site,
        [{"sop_instance_uid": ds.SOPInstanceUID, "malignant": "0"}],
        ["sop_instance_uid", "malignant"],
    )
    with pytest.raises(UnreadableImageError, match="not a screening view"):
        load_site_data(site)


def test_a_row_naming_an_unknown_image(site: Path):
    rows = _rows(site)
    rows[3]["sop_instance_uid"] = "1.2.3.999"
    _per_uid(site, rows)
    with pytest.raises(UnknownImageError, match=r"labels.csv:5: no DICOM file .* 1\.2\.3\.999"):
        load_site_data(site)


def test_an_unknown_path(site: Path):
    rows = _rows(site)
    rows[0]["path"] = "exam_00000/missing.dcm"
    _write(site, rows, ["path", "malignant"])
    with pytest.raises(UnknownImageError, match="exam_00000/missing.dcm is not a DICOM"):
        load_site_data(site)


def test_a_duplicate_row(site: Path):
    rows = _rows(site)
    _per_uid(site, [*rows, rows[2]])
    with pytest.raises(DuplicateImageError, match="already labelled on line 4"):
        load_site_data(site)


def test_conflicting_labels_for_one_image(site: Path):
    rows = _rows(site)
    other = dict(rows[2], malignant=str(1 - int(rows[2]["malignant"])))
    _per_uid(site, [*rows, other])
    with pytest.raises(ConflictingLabelsError, match="different label"):
        load_site_data(site)


def test_a_duplicate_file(site: Path):
    shutil.copy(site / "exam_00000" / "L-CC.dcm", site / "copy.dcm")
    _per_uid(site)
    with pytest.raises(DuplicateImageError, match="same SOP Instance UID; remove one copy"):
        load_site_data(site)


def test_a_breast_without_images_is_a_missing_view(site: Path):
    rows = _rows(site)
    study = rows[0]["study_instance_uid"]
    for view in ("R-CC", "R-MLO"):
        (site / "exam_00000" / f"{view}.dcm").unlink()
    _write(
        site,
        [{"study_instance_uid": study, "laterality": "R", "malignant": "0"}],
        ["study_instance_uid", "laterality", "malignant"],
    )
    with pytest.raises(MissingViewError, match="breast R .* has no For Presentation CC or MLO"):
        load_site_data(site)


def test_one_patient_in_two_splits(site: Path):
    rows = _rows(site)
    for i, r in enumerate(rows):
        r["split"] = "train" if i != 1 else "test"  # rows 0 and 1 are the same exam
    _write(site, rows, ["sop_instance_uid", "malignant", "split"])
    with pytest.raises(ConflictingLabelsError, match="a patient must be in exactly one split"):
        load_site_data(site)


@pytest.mark.parametrize(
    ("columns", "value", "message"),
    [
        (["sop_instance_uid", "malignant"], "yes", r"`malignant` must be 0 or 1, got 'yes'"),
        (["sop_instance_uid", "benign"], "0", "no `malignant` column"),
        (["study_instance_uid", "malignant"], "0", "needs a `sop_instance_uid` or `path`"),
    ],
)
def test_bad_label_files(site: Path, columns: list[str], value: str, message: str):
    rows = [dict(r, malignant=value, benign=value) for r in _rows(site)]
    _write(site, rows, columns)
    with pytest.raises(LabelFileError, match=message):
        load_site_data(site)


def test_missing_labels_file(site: Path):
    (site / "labels.csv").unlink()
    with pytest.raises(LabelFileError, match="labels.csv: missing"):
        load_site_data(site)


def test_a_labelled_image_with_a_broken_header(site: Path):
    import pydicom

    path = site / "exam_00002" / "L-CC.dcm"
    ds = pydicom.dcmread(path)
    del ds.ImageLaterality
    if "Laterality" in ds:
        del ds.Laterality
    ds.save_as(path)
    _per_uid(site)
    with pytest.raises(UnreadableImageError, match="exam_00002/L-CC.dcm is labelled but unusable"):
        load_site_data(site)


def test_the_fingerprint_and_split_ignore_the_folder_layout(site: Path, synth_dir: Path):
    _per_uid(site)
    moved = load_site_data(site)
    original_copy = site.parent / "original"
    shutil.copytree(synth_dir, original_copy)
    _per_uid(original_copy)
    original = load_site_data(original_copy)
    assert moved.fingerprint() == original.fingerprint()
    assert split_site_data(moved, 3).assignment == split_site_data(original, 3).assignment


def test_lesion_masks_come_with_their_rows(synth_dir: Path):
    rows = {r["sop_instance_uid"]: r for r in _rows(synth_dir)}
    data = load_site_data(synth_dir)
    for im in data.images:
        row = rows[im.sop_instance_uid]
        assert (im.malignant_mask is not None) == bool(row["malignant_mask"])
        assert (im.benign_mask is not None) == bool(row["benign_mask"])
        assert all(m.is_file() for m in im.lesion_masks)
    with_masks = sum(1 for r in rows.values() if r["malignant_mask"] or r["benign_mask"])
    assert with_masks > 0 and data.summary()["images_with_lesion_masks"] == with_masks


def test_a_missing_mask_file(synth_dir: Path, tmp_path: Path):
    site = shutil.copytree(synth_dir, tmp_path / "copy")
    rows = _rows(site)
    line, row = next((n, r) for n, r in enumerate(rows, start=2) if r["malignant_mask"])
    (site / row["malignant_mask"]).unlink()
    with pytest.raises(MaskFileError, match=rf"labels.csv:{line}: `malignant_mask` .* not found"):
        load_site_data(site)


def test_a_mask_on_a_row_without_that_finding(synth_dir: Path, tmp_path: Path):
    site = shutil.copytree(synth_dir, tmp_path / "copy")
    rows = _rows(site)
    line, row = next((n, r) for n, r in enumerate(rows, start=2) if r["malignant_mask"])
    row["malignant"] = "0"
    _write(site, rows, list(rows[0]))
    with pytest.raises(MaskFileError, match=rf"labels.csv:{line}: .*`malignant` is not 1"):
        load_site_data(site)
