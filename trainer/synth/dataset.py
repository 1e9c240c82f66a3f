"""A synthetic site dataset on disk: DICOM files, lesion masks as PNGs and a labels.csv, in
the layout `trainer finetune --site-data` reads."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..progress import progress as progress_bar
from .dicom import SYNTAXES, encode
from .exam import DEFAULT_COLS, DEFAULT_ROWS, SynthExam, SynthImage, synth_exam
from .look import DetectorLook
from .phantom import LesionType

LABEL_COLUMNS = (
    "path",
    "sop_instance_uid",
    "study_instance_uid",
    "patient_id",
    "laterality",
    "view",
    "malignant",
    "benign",
    "malignant_mask",
    "benign_mask",
)
"""labels.csv columns. Paths are relative to the CSV's folder; a mask path is empty when the
image has no such finding. Masks are 8-bit PNGs (0 or 255) on the image's pixel grid."""


def write_dataset(
    out_dir: str | Path,
    n_exams: int,
    *,
    positive_fraction: float = 0.5,
    malignant_kind: LesionType | None = None,
    seed: int = 0,
    transfer_syntax: str | Sequence[str] = "explicit",
    photometric: str = "MONOCHROME2",
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    bits_stored: int = 12,
    look: str | DetectorLook = "standard",
    progress: bool = False,
) -> Path:
    """Write `n_exams` exams as DICOM files plus masks and labels.csv; returns the CSV's path.

    `transfer_syntax` is a name from `SYNTAXES`, "mixed" (explicit, jpeg2000 and jpegls in
    turn), or a sequence of names used in turn per image. `photometric` is MONOCHROME1,
    MONOCHROME2 or "mixed" (alternating per exam). `look` is a detector look, or the name of
    one in `trainer.synth.look.LOOKS`. Exactly round(n_exams × positive_fraction)
    exams are positive; `malignant_kind` fixes their lesion type (default: either malignant
    type, a spiculated mass more often). The same arguments write the same files, UIDs
    included.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive fraction must be in [0, 1], not {positive_fraction}")
    if n_exams < 1:
        raise ValueError(f"number of exams must be at least 1, not {n_exams}")
    syntaxes = _syntax_cycle(transfer_syntax)
    photometrics = _photometric_cycle(photometric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_positive = round(n_exams * positive_fraction)
    positive = set(np.random.default_rng(seed).permutation(n_exams)[:n_positive].tolist())

    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        image_index = 0
        for i in progress_bar(range(n_exams), "synth", "exam", enabled=progress):
            exam = synth_exam(
                np.random.default_rng([seed, i]),
                rows=rows,
                cols=cols,
                malignant=i in positive,
                malignant_type=malignant_kind if i in positive else None,
                bits_stored=bits_stored,
                photometric=photometrics[i % len(photometrics)],
                look=look,
            )
            folder = out / f"exam_{i:05d}"
            folder.mkdir(exist_ok=True)
            for image in exam.images:
                syntax = syntaxes[image_index % len(syntaxes)]
                image_index += 1
                writer.writerow(_write_image(out, folder, image, exam, syntax))
    return labels


def read_labels(path: str | Path) -> list[dict[str, str]]:
    """The rows of a labels.csv, with paths made absolute."""
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("path", "malignant_mask", "benign_mask"):
            if row[key]:
                row[key] = str(path.parent / row[key])
    return rows


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG from `write_dataset` as a bool array."""
    return np.asarray(Image.open(path)) > 0


def _write_image(
    root: Path, folder: Path, image: SynthImage, exam: SynthExam, syntax: str
) -> dict[str, str]:
    path = folder / f"{image.view_key}.dcm"
    encode(image.dataset, syntax).save_as(path, enforce_file_format=True)
    masks = {}
    for name, mask in (("malignant", image.malignant_mask), ("benign", image.benign_mask)):
        masks[name] = ""
        if mask.any():
            mask_path = folder / f"{image.view_key}_{name}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path, optimize=False)
            masks[name] = mask_path.relative_to(root).as_posix()
    return {
        "path": path.relative_to(root).as_posix(),
        "sop_instance_uid": image.dataset.SOPInstanceUID,
        "study_instance_uid": exam.study_instance_uid,
        "patient_id": exam.patient_id,
        "laterality": str(image.laterality),
        "view": str(image.view),
        "malignant": str(int(image.malignant)),
        "benign": str(int(image.benign)),
        "malignant_mask": masks["malignant"],
        "benign_mask": masks["benign"],
    }


def _syntax_cycle(transfer_syntax: str | Sequence[str]) -> list[str]:
    if isinstance(transfer_syntax, str):
        names = (
            ["explicit", "jpeg2000", "jpegls"] if transfer_syntax == "mixed" else [transfer_syntax]
        )
    else:
        names = list(transfer_syntax)
    unknown = [n for n in names if n not in SYNTAXES]
    if unknown or not names:
        raise ValueError(
            f"unknown transfer syntax {unknown or names}; use mixed or one of {', '.join(SYNTAXES)}"
        )
    return names


def _photometric_cycle(photometric: str) -> list[str]:
    if photometric == "mixed":
        return ["MONOCHROME2", "MONOCHROME1"]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(
            f"photometric must be MONOCHROME1, MONOCHROME2 or mixed, not {photometric!r}"
        )
    return [photometric]
