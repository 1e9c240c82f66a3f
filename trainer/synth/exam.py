"""One synthetic four-view screening exam: pixels, lesion masks and DICOM datasets from a seed.

A seed reproduces everything: pixels, masks and every UID. Positive exams have one malignant
lesion in one breast, visible in both its CC and MLO at the same distance from the chest wall;
any exam may also carry a benign finding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from models.mammogram import Laterality, View, view_key

from .dicom import Identity, mammogram_dataset
from .look import DetectorLook, get_look
from .phantom import Breast, Lesion, LesionType, quantize, random_breast, random_lesion, render_view

VIEW_ORDER: tuple[tuple[Laterality, View], ...] = (
    (Laterality.LEFT, View.CC),
    (Laterality.LEFT, View.MLO),
    (Laterality.RIGHT, View.CC),
    (Laterality.RIGHT, View.MLO),
)
"""The order views are drawn in, breast by breast: it fixes what a seed produces (each view
draws from the seed's one random stream, and numbers its instance), so it stays this order.
Not the hanging order (`models.mammogram.SCREENING_VIEWS`, R-CC first), which readers and the
outputs use."""

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
        return view_key(self.laterality, self.view)

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
    _check(rows, cols, bits_stored, malignant, malignant_type)
    detector = get_look(look) if isinstance(look, str) else look
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # The look draws its noise from a child stream, so a seed gives the same anatomy, lesions
    # and UIDs under every look.
    look_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    spacing = spacing_mm or round(DEFAULT_SPACING_MM * DEFAULT_ROWS / rows, 4)
    breasts, malignant_side = _breasts(rng, malignant, malignant_type, benign)
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
        stored, window = _stored(intensity, rendered.breast_mask, bits_stored, photometric)
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


def _check(
    rows: int, cols: int, bits_stored: int, malignant: bool, malignant_type: LesionType | None
) -> None:
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, not {bits_stored}")
    if malignant_type is not None and not (malignant and malignant_type.malignant):
        raise ValueError(
            f"malignant_type {malignant_type.value} needs malignant=True and a "
            "malignant lesion type"
        )
    if rows < 64 or cols < 64:
        raise ValueError(f"image size {rows}x{cols} is too small to draw a breast; use ≥ 64x64")


def _breasts(
    rng: np.random.Generator,
    malignant: bool,
    malignant_type: LesionType | None,
    benign: bool | None,
) -> tuple[dict[Laterality, Breast], Laterality | None]:
    """Both breasts with their lesions, and the side of the malignant one (None if none)."""
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
    with_lesions = {
        side: Breast(b.extent, b.height, b.density, tuple(lesions[side]))
        for side, b in breasts.items()
    }
    return with_lesions, malignant_side


def _stored(
    intensity: np.ndarray, breast: np.ndarray, bits_stored: int, photometric: str
) -> tuple[np.ndarray, tuple[float, float]]:
    """Stored pixel values and their window (center, width), MONOCHROME1 inverted."""
    stored = quantize(intensity, bits_stored)
    window = _window(stored, breast)
    if photometric == "MONOCHROME1":
        top = (1 << bits_stored) - 1
        stored = top - stored
        window = (top - window[0], window[1])
    return stored, window


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
