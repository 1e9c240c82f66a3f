"""Typed predictions that leave `models`: per image, per breast and per exam, with saliency
maps (as 8-bit levels), ROI boxes and each image's marked region already on each source
image's pixel grid."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

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
class Region:
    """One image's most suspicious region on the source grid, in continuous pixel coordinates
    (pixel i covers [i, i+1)): centre (row, col) and box (top, left, bottom, right)."""

    center: tuple[float, float]
    box: tuple[float, float, float, float]
    origin: str
    """"roi" (the model's top region), "saliency" (peak of the malignant map) or "image"."""

    def center_xy(self) -> np.ndarray:
        """SCOORD POINT: (column, row)."""
        return np.array([[self.center[1], self.center[0]]], dtype=np.float32)

    def outline_xy(self) -> np.ndarray:
        """SCOORD closed POLYLINE around the box: (column, row), first point repeated."""
        top, left, bottom, right = self.box
        pts = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
        return np.array(pts, dtype=np.float32)


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


def map_levels(p: np.ndarray) -> np.ndarray:
    """uint8 levels of a probability map in [0, 1] (NaN as 0), on the CPU, by the ensemble's
    own rule (`models.numerics.to_levels`): how a map built outside the ensemble (synthetic
    data, tests, benches) becomes an `ImagePrediction` map."""
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(
            f"map_levels turns probabilities (floats in [0, 1]) into levels, not {p.dtype}"
        )
    import torch  # here, not above: the result types alone need no torch

    from .numerics import to_levels

    writable = np.require(p, dtype=np.float32, requirements="W")
    return to_levels(torch.from_numpy(writable)).numpy()


def _check_levels(name: str, m: np.ndarray | None, shape: tuple[int, ...] | None) -> None:
    """A map is 2-D uint8 levels (on the source grid, so both maps share one shape)."""
    if m is None and name == "benign_map":
        return
    if m is None:
        raise TypeError(
            "ImagePrediction.malignant_map is None: a prediction whose maps were left out "
            "(without_maps) cannot be rebuilt; replace fields of the original instead"
        )
    if not isinstance(m, np.ndarray) or m.dtype != np.uint8:
        kind = type(m).__name__ if not isinstance(m, np.ndarray) else f"{m.dtype} array"
        raise TypeError(
            f"ImagePrediction.{name} must be uint8 levels round(p × 255), not a {kind}; "
            "build them from probabilities in [0, 1] with models.results.map_levels(p)"
        )
    if m.ndim != 2 or (shape is not None and m.shape != shape):
        raise ValueError(
            f"ImagePrediction.{name} must be (rows, cols) on the source grid"
            + (f" like malignant_map {shape}" if shape is not None else "")
            + f", not {m.shape}"
        )


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
    """(rows, cols) uint8 on the source grid: the malignancy map p in [0, 1] as the 8-bit
    level round(p × 255) (`models.numerics.to_levels`), the levels every output stores or
    shows. The ensemble quantises on its device, so a quarter of fp32's bytes leave it; a
    prediction built elsewhere turns its probabilities into levels with `map_levels`. Any
    other dtype is refused (TypeError). None only in a copy from `without_maps`."""
    benign_map: np.ndarray | None = field(repr=False)
    """Like `malignant_map`; None when no member has a benign class (or in `without_maps`)."""
    rois: tuple[RegionOfInterest, ...] = ()
    """All members' boxes, highest weight first (weights of different families are not on
    one scale: GMIC's attention sums to 1 per image, all-conv's is a probability)."""
    malignant_peak: tuple[int, int] | None = None
    """(row, col) of the malignancy map's maximum (the first, in row-major order), found by
    the ensemble in fp32 before quantising, so levels that tie cannot move it. Always set
    once built: None, or a pixel that is not at the map's maximum (a map replaced without
    its peak), takes the argmax of the map given."""

    def __post_init__(self) -> None:
        _check_levels("malignant_map", self.malignant_map, None)
        _check_levels("benign_map", self.benign_map, self.malignant_map.shape)
        m, peak = self.malignant_map, self.malignant_peak
        inside = peak is not None and 0 <= peak[0] < m.shape[0] and 0 <= peak[1] < m.shape[1]
        if not inside or m[peak] < m.max():
            row, col = np.unravel_index(int(np.argmax(m)), m.shape)
            object.__setattr__(self, "malignant_peak", (int(row), int(col)))

    @property
    def view_key(self) -> str:
        """ "R-CC", "L-MLO", …"""
        return view_key(self.laterality, self.view)

    @functools.cached_property
    def region(self) -> Region:
        """The region every result object marks (the SRs' outline and centre, the heat-map's
        outline): the top ROI when the models proposed any, else the half-maximum blob around
        the saliency peak, else (a map whose peak rounds to level 0, below 0.2 %) the whole
        image. Worked out once per prediction.

        The peak is the ensemble's, found in fp32 (`malignant_peak`), so levels that tie after
        quantising cannot move the mark. The blob is the connected set of pixels around it
        whose level is at least half the peak's, on the 8-bit levels the objects carry.
        """
        rows, cols = self.malignant_map.shape
        if self.rois:
            top, left, bottom, right = _clip_box(self.rois[0].box, rows, cols)
            centre = ((top + bottom) / 2, (left + right) / 2)
            return Region(centre, (top, left, bottom, right), "roi")
        m = self.malignant_map
        r, c = self.malignant_peak
        peak = int(m[r, c])
        if peak == 0:
            return Region((rows / 2, cols / 2), (0.0, 0.0, float(rows), float(cols)), "image")
        labels, _ = ndimage.label(m >= (peak + 1) // 2)  # level >= peak / 2
        blob = ndimage.find_objects((labels == labels[r, c]).astype(np.int32))[0]
        box = (float(blob[0].start), float(blob[1].start), float(blob[0].stop), float(blob[1].stop))
        return Region((r + 0.5, c + 0.5), box, "saliency")

    def without_maps(self) -> ImagePrediction:
        """This prediction with its maps left out (None) and its `region` worked out first:
        for what reads scores, ROIs, the peak and the region only. The exam-level SRs are
        built in a process of their own, which would otherwise receive 70 MB of maps per
        3328x2560 exam that it never reads."""
        lean = copy.copy(self)  # the fields as they are: no __post_init__ to check maps
        vars(lean).update(malignant_map=None, benign_map=None, region=self.region)
        return lean


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

    def without_maps(self) -> ExamPrediction:
        """The exam with every image's maps left out (`ImagePrediction.without_maps`)."""
        return replace(self, images=tuple(img.without_maps() for img in self.images))


def _clip_box(box: Sequence[float], rows: int, cols: int) -> tuple[float, float, float, float]:
    top, left, bottom, right = (float(v) for v in box)
    top, bottom = sorted((min(max(top, 0.0), rows), min(max(bottom, 0.0), rows)))
    left, right = sorted((min(max(left, 0.0), cols), min(max(right, 0.0), cols)))
    # A degenerate box still needs an area for a closed outline.
    if bottom - top < 1.0:
        top, bottom = max(0.0, top - 0.5), min(float(rows), top + 0.5)
    if right - left < 1.0:
        left, right = max(0.0, left - 0.5), min(float(cols), left + 0.5)
    return (top, left, bottom, right)
