"""The `Mammogram`: one decoded mammography image with the header facts the models need.

Reading (`models.header`, `models.pixels`) is the only place that knows DICOM pixel
semantics; everything downstream works on this typed record. Pixel values are "brighter is
denser" (MONOCHROME1 is already inverted) and keep their stored bit depth, so each model's
preprocessing decides how to scale them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Laterality(StrEnum):
    LEFT = "L"
    RIGHT = "R"


class View(StrEnum):
    CC = "CC"
    MLO = "MLO"


SCREENING_VIEWS: tuple[tuple[Laterality, View], ...] = (
    (Laterality.RIGHT, View.CC),
    (Laterality.LEFT, View.CC),
    (Laterality.RIGHT, View.MLO),
    (Laterality.LEFT, View.MLO),
)
"""The four screening views in reading (hanging) order: R-CC, L-CC, R-MLO, L-MLO."""


def view_key(laterality: str, view: str) -> str:
    """ "L-CC", "R-MLO", …: the names the papers, the exam grouper and the outputs use."""
    return f"{laterality}-{view}"


SCREENING_VIEW_KEYS: tuple[str, ...] = tuple(view_key(lat, v) for lat, v in SCREENING_VIEWS)


class ImageKind(StrEnum):
    """What kind of mammography object an image is; only FOR_PRESENTATION is analysed."""

    FOR_PRESENTATION = "for_presentation"
    FOR_PROCESSING = "for_processing"
    TOMOSYNTHESIS = "tomosynthesis"
    SYNTHETIC_2D = "synthetic_2d"


class MammogramError(ValueError):
    """A dataset that cannot be turned into a `Mammogram`; the message says what to fix."""


@dataclass(frozen=True)
class Mammogram:
    pixels: np.ndarray
    """(rows, cols) in the stored grid, float32, higher = denser (MONOCHROME2 semantics)."""
    laterality: Laterality
    view: View
    bits_stored: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    kind: ImageKind = ImageKind.FOR_PRESENTATION
    view_modifiers: tuple[str, ...] = ()
    """Code meanings of ViewModifierCodeSequence (e.g. "spot compression"), empty for a
    plain screening view."""
    pixel_spacing_mm: tuple[float, float] | None = None
    """(row, column) spacing: PixelSpacing, else ImagerPixelSpacing."""
    patient_orientation: tuple[str, str] | None = None
    """PatientOrientation (row direction, column direction), e.g. ("A", "R")."""
    patient_id: str = field(default="", repr=False)
    """Needed to split site data by patient; never logged."""
    photometric_interpretation: str = "MONOCHROME2"
    """As stored; `pixels` is already inverted when this is MONOCHROME1."""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    @property
    def view_key(self) -> str:
        return view_key(self.laterality, self.view)
