"""Typed predictions that leave `models`: per image, per breast and per exam, with saliency
maps and ROI boxes already on each source image's pixel grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .mammogram import Laterality, View, view_key


@dataclass(frozen=True)
class RegionOfInterest:
    """A box on the source grid: (top, left, bottom, right) in pixels, with its weight
    (GMIC's attention, or the saliency peak value) and the member model that proposed it."""

    box: tuple[float, float, float, float]
    weight: float
    model: str

    @property
    def center(self) -> tuple[float, float]:
        top, left, bottom, right = self.box
        return ((top + bottom) / 2.0, (left + right) / 2.0)


@dataclass(frozen=True)
class ModelInfo:
    """What an output object must say about the algorithm behind it."""

    name: str
    version: str
    family: str
    clinical_use: bool
    """True only when the model file says the model is validated for clinical use."""
    intended_use: str
    licence: str
    operating_point: float | None
    """Malignancy threshold above which a finding must be presented, if one was set."""
    file_sha256: str = ""
    """sha256 of the model file the member was loaded from ("" when not loaded from a file):
    result objects derive the algorithm's IHE AIR Device UID from it, so a retrained model
    gets a new one even if nobody bumped its version."""


@dataclass(frozen=True)
class ImagePrediction:
    """The ensemble's result for one source image."""

    sop_instance_uid: str
    laterality: Laterality
    view: View
    malignant: float
    """Ensemble probability of malignancy for this image."""
    benign: float | None
    per_model: dict[str, float]
    """Each member's malignancy probability (averaged over its flips), by model name."""
    malignant_map: np.ndarray = field(repr=False)
    """(rows, cols) float32 in [0, 1] on the source grid."""
    benign_map: np.ndarray | None = field(repr=False)
    """Like `malignant_map`; None when no member has a benign class."""
    rois: tuple[RegionOfInterest, ...] = ()
    """All members' boxes, highest weight first (weights of different families are not on
    one scale: GMIC's attention sums to 1 per image, all-conv's is a probability)."""

    @property
    def view_key(self) -> str:
        """ "R-CC", "L-MLO", …"""
        return view_key(self.laterality, self.view)


@dataclass(frozen=True)
class BreastPrediction:
    """One breast's scores, from its images."""

    laterality: Laterality
    malignant: float
    """Mean over the breast's CC and MLO images (or the one present)."""
    benign: float | None
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class ExamPrediction:
    """One exam's result: its images, breasts and exam-level scores, and the models behind
    them."""

    study_instance_uid: str
    images: tuple[ImagePrediction, ...]
    breasts: tuple[BreastPrediction, ...]
    malignant: float
    """Max over breasts."""
    benign: float | None
    missing_views: tuple[str, ...]
    """E.g. ("R-MLO",); empty for a complete four-view exam."""
    models: tuple[ModelInfo, ...]
    precision: str = "fp32"
    """The numeric precision the forward passes ran at (`EnsembleSpec.precision`)."""

    @property
    def partial(self) -> bool:
        return bool(self.missing_views)

    @property
    def clinical_use(self) -> bool:
        """True only when every member model is validated for clinical use."""
        return all(m.clinical_use for m in self.models)

    def image(self, sop_instance_uid: str) -> ImagePrediction:
        for img in self.images:
            if img.sop_instance_uid == sop_instance_uid:
                return img
        raise KeyError(sop_instance_uid)
