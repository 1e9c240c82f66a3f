"""Synthetic four-view screening exams: DICOM datasets with known lesion masks, for tests and demos.

    exam = synth_exam(seed=7, rows=512, cols=416, malignant=True)
    exam.image("L-CC").dataset          # pydicom Dataset, MG For Presentation, Explicit VR LE
    exam.image("L-CC").malignant_mask   # bool (rows, cols) on the same grid
    write_dataset("out/", n_exams=20, positive_fraction=0.3, seed=1, rows=512, cols=416)

A seed reproduces everything: pixels, masks and every UID. Positive exams have one malignant
lesion in one breast, visible in both its CC and MLO at the same distance from the chest wall;
any exam may also carry a benign finding.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.uid import generate_uid

from models.mammogram import Laterality, View

from ..progress import progress as progress_bar
from .dicom import SYNTAXES, Identity, encode, mammogram_dataset
from .look import LOOKS, DetectorLook, get_look
from .phantom import Breast, Lesion, LesionType, quantize, random_breast, random_lesion, render_view

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "LABEL_COLUMNS",
    "LOOKS",
    "SYNTAXES",
    "DetectorLook",
    "VIEW_ORDER",
    "Lesion",
    "LesionType",
    "SynthExam",
    "SynthImage",
    "encode",
    "read_labels",
    "read_mask",
    "synth_exam",
    "write_dataset",
]

VIEW_ORDER: tuple[tuple[Laterality, View], ...] = (
    (Laterality.LEFT, View.CC),
    (Laterality.LEFT, View.MLO),
    (Laterality.RIGHT, View.CC),
    (Laterality.RIGHT, View.MLO),
)

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

DEFAULT_ROWS, DEFAULT_COLS = 2048, 1664
DEFAULT_SPACING_MM = 0.1


@dataclass(frozen=True)
class SynthImage:
    dataset: Dataset
    """MG For Presentation, Explicit VR Little Endian, with file_meta (ready to save or encode)."""
    laterality: Laterality
    view: View
    malignant_mask: np.ndarray
    """bool (rows, cols): pixels of the malignant lesion on this image; all False if none."""
    benign_mask: np.ndarray

    @property
    def view_key(self) -> str:
        return f"{self.laterality}-{self.view}"

    @property
    def malignant(self) -> bool:
        return bool(self.malignant_mask.any())

    @property
    def benign(self) -> bool:
        return bool(self.benign_mask.any())


@dataclass(frozen=True)
class SynthExam:
    images: tuple[SynthImage, ...]
    """L-CC, L-MLO, R-CC, R-MLO, in that order."""
    malignant_side: Laterality | None
    """The breast with the malignant lesion, None for a negative exam."""
    lesions: dict[Laterality, tuple[Lesion, ...]]
    patient_id: str
    study_instance_uid: str

    @property
    def malignant(self) -> bool:
        return self.malignant_side is not None

    @property
    def datasets(self) -> list[Dataset]:
        return [image.dataset for image in self.images]

    def image(self, view_key: str) -> SynthImage:
        """The image for "L-CC", "R-MLO", …"""
        for image in self.images:
            if image.view_key == view_key:
                return image
        raise KeyError(f"no view {view_key!r}; this exam has {[i.view_key for i in self.images]}")


def synth_exam(
    seed: int | np.random.Generator = 0,
    *,
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    malignant: bool = False,
    malignant_type: LesionType | None = None,
    benign: bool | None = None,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    spacing_mm: float | None = None,
    patient_id: str | None = None,
    look: DetectorLook | str = "standard",
) -> SynthExam:
    """One four-view screening exam.

    `malignant_type` fixes the malignant lesion (default: a spiculated mass or, less often, a
    pleomorphic calcification cluster, which is nearly invisible below ~0.2 mm per pixel).
    `benign=None` adds a benign finding to a random breast with probability 0.3. `spacing_mm`
    defaults to 0.1 mm at 2048 rows and scales with `rows`, so a small image shows the same
    anatomy at lower resolution. `look` renders the exam through another vendor's processing
    (`trainer.synth.look.LOOKS`); the anatomy and lesions stay the same for a seed.
    """
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, not {bits_stored}")
    if malignant_type is not None and not (malignant and malignant_type.malignant):
        raise ValueError(
            f"malignant_type {malignant_type.value} needs malignant=True and a "
            "malignant lesion type"
        )
    if rows < 64 or cols < 64:
        raise ValueError(f"image size {rows}x{cols} is too small to draw a breast; use ≥ 64x64")
    detector = get_look(look) if isinstance(look, str) else look
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # The look draws its noise from a child stream, so a seed gives the same anatomy, lesions
    # and UIDs under every look.
    look_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    spacing = spacing_mm or round(DEFAULT_SPACING_MM * DEFAULT_ROWS / rows, 4)

    breasts = {side: random_breast(rng) for side in Laterality}
    malignant_side = _side(rng) if malignant else None
    if benign is None:
        benign = bool(rng.random() < 0.3)
    lesions: dict[Laterality, list[Lesion]] = {side: [] for side in Laterality}
    if malignant_side is not None:
        lesions[malignant_side].append(random_lesion(rng, malignant=True, kind=malignant_type))
    if benign:
        side = _side(rng)
        lesions[side].append(_apart_from(rng, lesions[side]))
    breasts = {
        side: Breast(b.extent, b.height, b.density, tuple(lesions[side]))
        for side, b in breasts.items()
    }

    identity = _identity(rng, patient_id)
    images = []
    for number, (side, view) in enumerate(VIEW_ORDER, start=1):
        rendered = render_view(
            rng,
            breasts[side],
            laterality=side,
            view=view,
            rows=rows,
            cols=cols,
            spacing_mm=spacing,
        )
        intensity = detector.apply(rendered.intensity, rendered.breast_mask, spacing, look_rng)
        stored = quantize(intensity, bits_stored)
        window = _window(stored, rendered.breast_mask)
        if photometric == "MONOCHROME1":
            top = (1 << bits_stored) - 1
            stored = top - stored
            window = (top - window[0], window[1])
        ds = mammogram_dataset(
            stored,
            identity=identity,
            sop_instance_uid=_uid(rng),
            instance_number=number,
            laterality=side,
            view=view,
            bits_stored=bits_stored,
            photometric=photometric,
            spacing_mm=spacing,
            window=window,
        )
        if not detector.is_identity:
            ds.ManufacturerModelName = f"trainer synth, {detector.name} look"
        images.append(SynthImage(ds, side, view, rendered.malignant_mask, rendered.benign_mask))
    return SynthExam(
        images=tuple(images),
        malignant_side=malignant_side,
        lesions={side: b.lesions for side, b in breasts.items()},
        patient_id=identity.patient_id,
        study_instance_uid=identity.study_instance_uid,
    )


def write_dataset(
    out_dir: str | Path,
    n_exams: int,
    *,
    positive_fraction: float = 0.5,
    seed: int = 0,
    transfer_syntax: str | Sequence[str] = "explicit",
    photometric: str = "MONOCHROME2",
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    bits_stored: int = 12,
    look: str = "standard",
    progress: bool = False,
) -> Path:
    """Write `n_exams` exams as DICOM files plus masks and labels.csv; returns the CSV's path.

    `transfer_syntax` is a name from `SYNTAXES`, "mixed" (explicit, jpeg2000 and jpegls in
    turn), or a sequence of names used in turn per image. `photometric` is MONOCHROME1,
    MONOCHROME2 or "mixed" (alternating per exam). `look` names a detector look from
    `trainer.synth.look.LOOKS`. Exactly round(n_exams × positive_fraction)
    exams are positive. The same arguments write the same files, UIDs included.
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


def _apart_from(rng: np.random.Generator, others: list[Lesion]) -> Lesion:
    """A benign lesion that does not overlap the breast's other findings in either view, so
    each mask marks one finding."""
    while True:
        lesion = random_lesion(rng, malignant=False)
        if all(
            min(abs(lesion.cc_offset - o.cc_offset), abs(lesion.mlo_offset - o.mlo_offset)) > 0.35
            or abs(lesion.depth - o.depth) > 0.2
            for o in others
        ):
            return lesion


def _side(rng: np.random.Generator) -> Laterality:
    return Laterality.LEFT if rng.random() < 0.5 else Laterality.RIGHT


def _uid(rng: np.random.Generator) -> str:
    """A UID reproducible from the seed: pydicom hashes the entropy into its root."""
    return generate_uid(entropy_srcs=[rng.bytes(16).hex()])


def _identity(rng: np.random.Generator, patient_id: str | None) -> Identity:
    tag = hashlib.sha1(rng.bytes(8)).hexdigest()[:8].upper()
    pid = patient_id or f"SYN{tag}"
    day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 1800)))
    seconds = int(rng.integers(8 * 3600, 18 * 3600))
    return Identity(
        patient_id=pid,
        patient_name=f"Synthetic^{pid}",
        study_instance_uid=_uid(rng),
        series_instance_uid=_uid(rng),
        accession_number=f"A{tag}",
        study_date=day.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
    )


def _window(stored: np.ndarray, breast: np.ndarray) -> tuple[float, float]:
    """A VOI window over the breast tissue: 1st to 99th percentile of a sample of its pixels."""
    values = stored[breast][:: max(1, int(breast.sum()) // 20000)]
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, float(stored.max()))
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))
