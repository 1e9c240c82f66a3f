"""trainer.synth: reproducible, valid, mammogram-like four-view exams with aligned masks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from models.mammogram import Laterality, View
from models.reading import describe, read_mammogram_file
from trainer.cli import main as trainer_main
from trainer.synth import (
    LABEL_COLUMNS,
    SYNTAXES,
    DetectorLook,
    LesionType,
    read_labels,
    read_mask,
    synth_exam,
    write_dataset,
)

ROWS, COLS = 512, 416


def _pixels(exam) -> list[bytes]:
    return [image.dataset.PixelData for image in exam.images]


def test_a_seed_reproduces_pixels_masks_and_uids(synth_exam_small):
    again = synth_exam(
        7,
        rows=ROWS,
        cols=COLS,
        malignant=True,
        malignant_type=LesionType.SPICULATED_MASS,
        benign=False,
    )
    assert _pixels(again) == _pixels(synth_exam_small)
    for a, b in zip(again.images, synth_exam_small.images, strict=True):
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
        assert np.array_equal(a.malignant_mask, b.malignant_mask)
    assert again.study_instance_uid == synth_exam_small.study_instance_uid

    other = synth_exam(8, rows=ROWS, cols=COLS, malignant=True, benign=False)
    assert other.lesions[other.malignant_side][0].malignant
    assert other.study_instance_uid != synth_exam_small.study_instance_uid
    assert _pixels(other) != _pixels(synth_exam_small)


def test_malignant_type_must_be_a_malignant_lesion():
    with pytest.raises(ValueError, match="malignant_type round_mass"):
        synth_exam(0, rows=128, cols=104, malignant=True, malignant_type=LesionType.ROUND_MASS)
    exam = synth_exam(
        0, rows=128, cols=104, malignant=True,
        malignant_type=LesionType.PLEOMORPHIC_CALCIFICATIONS,
    )  # fmt: skip
    assert exam.lesions[exam.malignant_side][0].type is LesionType.PLEOMORPHIC_CALCIFICATIONS


def test_write_dataset_is_reproducible(tmp_path):
    a = read_labels(write_dataset(tmp_path / "a", 2, seed=5, rows=128, cols=104))
    b = read_labels(write_dataset(tmp_path / "b", 2, seed=5, rows=128, cols=104))
    assert [r["sop_instance_uid"] for r in a] == [r["sop_instance_uid"] for r in b]
    assert all(
        Path(x["path"]).read_bytes() == Path(y["path"]).read_bytes()
        for x, y in zip(a, b, strict=True)
    )


def test_four_standard_views_with_consistent_identity(synth_exam_small):
    exam = synth_exam_small
    assert [i.view_key for i in exam.images] == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    uids = {i.dataset.SOPInstanceUID for i in exam.images}
    assert len(uids) == 4
    for image in exam.images:
        ds = image.dataset
        assert ds.StudyInstanceUID == exam.study_instance_uid
        assert ds.PatientID == exam.patient_id
        assert (ds.Rows, ds.Columns) == (ROWS, COLS)
        d = describe(ds)
        assert d.screening_view, d.not_screening_reason
        assert (d.laterality, d.view) == (image.laterality, image.view)


def test_positive_exam_has_the_lesion_in_both_views_of_one_breast(synth_exam_small):
    exam = synth_exam_small
    assert exam.malignant and exam.malignant_side is not None
    for image in exam.images:
        assert image.malignant == (image.laterality is exam.malignant_side), image.view_key
    # Same distance from the chest wall in CC and MLO (within the MLO's tilt), as on real films.
    depth = []
    for view in View:
        mask = exam.image(f"{exam.malignant_side}-{view}").malignant_mask
        cols = np.nonzero(mask)[1].mean()
        depth.append(cols if exam.malignant_side is Laterality.LEFT else COLS - 1 - cols)
    assert abs(depth[0] - depth[1]) < 0.25 * COLS


def test_negative_exam_has_no_malignant_mask(synth_exam_negative_small):
    assert not synth_exam_negative_small.malignant
    assert not any(i.malignant or i.benign for i in synth_exam_negative_small.images)


@pytest.mark.parametrize("seed", [7, 21, 3])
def test_pixels_under_a_lesion_mask_are_denser_than_around_it(seed):
    exam = synth_exam(seed, rows=ROWS, cols=COLS, malignant=True, benign=True)
    checked = 0
    for image in exam.images:
        pixels = image.dataset.pixel_array.astype(float)
        breast = pixels > 0
        for mask in (image.malignant_mask, image.benign_mask):
            if not mask.any():
                continue
            ring = ndimage.binary_dilation(mask, iterations=6) & ~mask & breast
            # The 95th percentile: a calcification cluster's mask is its outline, mostly tissue.
            inside, around = np.percentile(pixels[mask], 95), np.percentile(pixels[ring], 95)
            assert inside > around + 150, image.view_key
            checked += 1
    assert checked >= 2


def test_chest_wall_is_on_the_standard_side_and_mlo_has_a_pectoral_muscle(synth_exam_small):
    for image in synth_exam_small.images:
        pixels = image.dataset.pixel_array.astype(float)
        wall, far = pixels[:, :8], pixels[:, -8:]
        if image.laterality is Laterality.RIGHT:
            wall, far = far, wall
        assert (wall > 100).mean() > 0.6 and (far > 100).mean() < 0.05, image.view_key
        expected = {"L-CC": ["A", "R"], "L-MLO": ["A", "FR"], "R-CC": ["P", "L"]}
        assert list(image.dataset.PatientOrientation) == expected.get(image.view_key, ["P", "FL"])
        # Upper chest-wall corner: the pectoral muscle on MLO is brighter than the breast.
        corner = (
            pixels[: ROWS // 8, : COLS // 10]
            if image.laterality is Laterality.LEFT
            else (pixels[: ROWS // 8, -COLS // 10 :])
        )
        tissue = pixels[ROWS // 2 - 20 : ROWS // 2 + 20]
        brighter = corner.mean() > np.median(tissue[tissue > 100])
        assert brighter == (image.view is View.MLO), image.view_key


def test_monochrome1_stores_inverted_values_and_window():
    m2 = synth_exam(3, rows=128, cols=104, photometric="MONOCHROME2").images[0].dataset
    m1 = synth_exam(3, rows=128, cols=104, photometric="MONOCHROME1").images[0].dataset
    assert m1.PhotometricInterpretation == "MONOCHROME1" and m1.PresentationLUTShape == "INVERSE"
    assert np.array_equal(m1.pixel_array, 4095 - m2.pixel_array)
    assert float(m1.WindowCenter) == pytest.approx(4095 - float(m2.WindowCenter))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dciodvfy_reports_no_errors(tmp_path, photometric):
    exam = synth_exam(5, rows=256, cols=208, malignant=True, photometric=photometric)
    for image in exam.images[:2]:  # a CC and an MLO
        path = tmp_path / f"{image.view_key}.dcm"
        image.dataset.save_as(path, enforce_file_format=True)
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = run.stdout + run.stderr
        assert "MammographyImageForPresentation" in report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, "\n".join(errors)


def test_written_dataset_matches_its_labels(synth_dir: Path):
    rows = read_labels(synth_dir / "labels.csv")
    with (synth_dir / "labels.csv").open() as fh:
        assert tuple(fh.readline().strip().split(",")) == LABEL_COLUMNS
    assert len(rows) == 16
    exams: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        exams.setdefault(row["study_instance_uid"], []).append(row)
    assert len(exams) == 4
    assert sum(any(r["malignant"] == "1" for r in exam) for exam in exams.values()) == 2

    syntaxes, photometrics = set(), set()
    for row in rows:
        header = dcmread(row["path"], stop_before_pixels=True)
        syntaxes.add(header.file_meta.TransferSyntaxUID)
        photometrics.add(header.PhotometricInterpretation)
        mammogram = read_mammogram_file(row["path"])
        assert mammogram.sop_instance_uid == row["sop_instance_uid"]
        assert mammogram.view_key == f"{row['laterality']}-{row['view']}"
        assert mammogram.patient_id == row["patient_id"]
        for kind in ("malignant", "benign"):
            assert bool(row[f"{kind}_mask"]) == (row[kind] == "1")
            if row[f"{kind}_mask"]:
                mask = read_mask(row[f"{kind}_mask"])
                assert mask.shape == mammogram.shape and mask.any()
    assert syntaxes == {SYNTAXES["explicit"], SYNTAXES["jpeg2000"], SYNTAXES["jpegls"]}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}


def test_cli_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    code = trainer_main(
        ["synth", "--out", str(out), "--exams", "2", "--positive-fraction", "1",
         "--seed", "3", "--size", "128x104", "--transfer-syntax", "jpegls"]
    )  # fmt: skip
    assert code == 0
    rows = read_labels(out / "labels.csv")
    assert len(rows) == 8 and {r["study_instance_uid"] for r in rows}.__len__() == 2
    assert sum(r["malignant"] == "1" for r in rows) == 4  # two views of one breast per exam
    assert "wrote 2 exams" in capsys.readouterr().out


def test_cli_fixes_the_malignant_lesion_kind(tmp_path):
    """--malignant-kind gives every positive exam that lesion: the files are those of
    `synth_exam` with `malignant_type`, whose lesions are of that kind."""
    out = tmp_path / "clusters"
    trainer_main(
        ["synth", "--out", str(out), "--exams", "2", "--positive-fraction", "1", "--seed", "3",
         "--size", "128x104", "--malignant-kind", "pleomorphic_calcifications"]
    )  # fmt: skip
    rows = read_labels(out / "labels.csv")
    for i in range(2):
        exam = synth_exam(np.random.default_rng([3, i]), rows=128, cols=104, malignant=True,
                          malignant_type=LesionType.PLEOMORPHIC_CALCIFICATIONS)  # fmt: skip
        assert exam.lesions[exam.malignant_side][0].type is LesionType.PLEOMORPHIC_CALCIFICATIONS
        written = [r["sop_instance_uid"] for r in rows[4 * i : 4 * i + 4]]
        assert written == [im.dataset.SOPInstanceUID for im in exam.images]


def test_cli_rejects_a_bad_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        trainer_main(["synth", "--out", str(tmp_path), "--exams", "1", "--size", "big"])
    assert exit_.value.code == 2
    assert "512x416" in capsys.readouterr().err


def test_a_detector_look_changes_the_pixels_not_the_anatomy():
    """The same seed under another vendor's look: same patient, lesions, masks and UIDs, so a
    domain-shift experiment compares like with like; different pixels, with the lesion still
    denser than its surroundings."""
    standard = synth_exam(5, rows=ROWS, cols=COLS, malignant=True)
    shifted = synth_exam(5, rows=ROWS, cols=COLS, malignant=True, look="vendor-b")
    assert standard.patient_id == shifted.patient_id and standard.lesions == shifted.lesions
    for a, b in zip(standard.images, shifted.images, strict=True):
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
        assert np.array_equal(a.malignant_mask, b.malignant_mask)
        assert a.dataset.PixelData != b.dataset.PixelData
        assert b.dataset.ManufacturerModelName == "trainer synth, vendor-b look"
        if b.malignant:
            pixels = b.dataset.pixel_array.astype(float)
            ring = ndimage.binary_dilation(b.malignant_mask, iterations=6) & ~b.malignant_mask
            inside = np.percentile(pixels[b.malignant_mask], 95)
            assert inside > np.percentile(pixels[ring & (pixels > 0)], 95) + 150
    assert synth_exam(5, rows=ROWS, cols=COLS, look="standard").images[0].dataset.PixelData == (
        synth_exam(5, rows=ROWS, cols=COLS).images[0].dataset.PixelData
    )
    with pytest.raises(ValueError, match="unknown detector look 'vendor-z'; known: standard"):
        synth_exam(5, rows=ROWS, cols=COLS, look="vendor-z")


def test_a_dataset_takes_a_look_of_ones_own(tmp_path: Path):
    """A held-out look no model was built on, for a domain-shift test of one's own."""
    soft = DetectorLook("soft", "a soft tone curve", gamma=0.55, contrast=0.8, noise=0.02)
    write_dataset(tmp_path, 1, seed=5, rows=ROWS, cols=COLS, look=soft)
    first = dcmread(next(tmp_path.glob("exam_00000/*.dcm")))
    assert first.ManufacturerModelName == "trainer synth, soft look"
