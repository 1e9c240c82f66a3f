"""Shared fixtures: synthetic mammography exams from `trainer.synth`.

Session-scoped, so each is built once per test run; treat what they return as read-only
(copy a dataset with `copy.deepcopy` before changing it).

- `synth_exam_small`: one positive four-view exam (L-CC, L-MLO, R-CC, R-MLO) at 512x416
  (0.4 mm pixels), MONOCHROME2, 12 bits, in memory, seed 7, its malignant lesion a spiculated
  mass (visible at this size), no benign finding. `exam.malignant_side` names the breast with the
  lesion; `exam.image("L-CC").dataset` / `.malignant_mask` give each view.
- `synth_exam_negative_small`: the same, negative (no malignant lesion, no benign finding).
- `synth_dir`: a small dataset written to disk by `write_dataset`: 4 exams (2 positive) at
  512x416, seed 11, transfer syntaxes cycling explicit, jpeg2000, jpegls per image, photometric
  alternating MONOCHROME2/MONOCHROME1 per exam. Returns the folder; `synth_dir / "labels.csv"`
  lists the files (see `trainer.synth.LABEL_COLUMNS`, `read_labels`).
- `shared_reference`: the ../shared/reference folder, or a skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.synth import LesionType, SynthExam, synth_exam, write_dataset

SMALL_ROWS, SMALL_COLS = 512, 416


@pytest.fixture(scope="session")
def synth_exam_small() -> SynthExam:
    return synth_exam(
        7,
        rows=SMALL_ROWS,
        cols=SMALL_COLS,
        malignant=True,
        malignant_type=LesionType.SPICULATED_MASS,
        benign=False,
    )


@pytest.fixture(scope="session")
def synth_exam_negative_small() -> SynthExam:
    return synth_exam(8, rows=SMALL_ROWS, cols=SMALL_COLS, malignant=False, benign=False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(
        out,
        4,
        positive_fraction=0.5,
        seed=11,
        transfer_syntax="mixed",
        photometric="mixed",
        rows=SMALL_ROWS,
        cols=SMALL_COLS,
    )
    return out


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    if not path.is_dir():
        pytest.skip(f"shared reference notes not found at {path}; they live beside the repo")
    return path
