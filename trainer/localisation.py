"""Does the saliency map point at the lesion? The localisation figure of `trainer evaluate`.

For every malignant image with a lesion mask, the peak of the malignancy map on the source
grid (the map the SEG carries: each member's map flipped back, resampled onto the image's
pixels and averaged over members; its peak found in fp32 by the ensemble, before the map is
quantised) is compared with the mask. The image counts as localised when the peak lies within
`within_mm` of a lesion pixel (0 mm when it is on the lesion), the hit criterion of
FROC-style lesion localisation with one mark per image. The figure is the fraction of
localised images with a Wilson 95% interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.results import ImagePrediction

from .sitedata import MaskFileError, SiteImage

DEFAULT_WITHIN_MM = 5.0
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class PeakDistance:
    """Where one image's map peaks, and how far that is from its lesion."""

    sop_instance_uid: str
    peak: tuple[int, int]
    """(row, column) on the source grid."""
    distance_mm: float
    """0 when the peak is on the lesion."""


@dataclass(frozen=True)
class LocalisationReport:
    within_mm: float
    n: int
    """Malignant images with a lesion mask."""
    localised: int
    fraction: float | None
    ci95: tuple[float, float] | None
    median_distance_mm: float | None

    def to_json(self) -> dict:
        return {
            "within_mm": self.within_mm,
            "n": self.n,
            "localised": self.localised,
            "fraction": self.fraction,
            "ci95": list(self.ci95) if self.ci95 else None,
            "median_distance_mm": self.median_distance_mm,
        }

    def line(self) -> str:
        if self.fraction is None or self.ci95 is None:
            return "localisation: no malignant image with a lesion mask"
        return (
            f"localisation: map peak within {self.within_mm:g} mm of the lesion on "
            f"{self.localised} of {self.n} malignant images ({self.fraction:.0%}, 95% CI "
            f"{self.ci95[0]:.0%}-{self.ci95[1]:.0%}); median distance "
            f"{self.median_distance_mm:.1f} mm"
        )


def read_mask(image: SiteImage, shape: tuple[int, int]) -> np.ndarray:
    """The malignant lesion mask of `image` as a boolean array on its pixel grid."""
    if image.malignant_mask is None:
        raise MaskFileError(f"{image.path.name} has no malignant_mask in labels.csv")
    try:
        with Image.open(image.malignant_mask) as png:
            mask = np.asarray(png.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"{image.malignant_mask}: not a readable mask ({exc})") from exc
    if mask.shape != tuple(shape):
        raise MaskFileError(
            f"{image.malignant_mask} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{shape[0]}x{shape[1]}; a mask must be on the image's own pixel grid"
        )
    return mask


def peak_distance(
    image: SiteImage,
    prediction: ImagePrediction,
    spacing_mm: tuple[float, float] | None,
) -> PeakDistance:
    """Distance from the malignancy map's peak (`ImagePrediction.malignant_peak`, its first
    maximum in fp32) to the nearest lesion pixel.

    Without a pixel spacing in the header the distance cannot be in mm; that is an error
    rather than a guess.
    """
    if spacing_mm is None:
        raise MaskFileError(
            f"{image.path.name} has neither PixelSpacing nor ImagerPixelSpacing, so a "
            "distance in mm cannot be measured; use images whose header gives a spacing"
        )
    mask = read_mask(image, prediction.malignant_map.shape)
    row, col = prediction.malignant_peak
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise MaskFileError(f"{image.malignant_mask} is empty: it outlines no lesion")
    d = np.hypot((rows - row) * spacing_mm[0], (cols - col) * spacing_mm[1]).min()
    return PeakDistance(image.sop_instance_uid, (int(row), int(col)), float(d))


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; sensible at 0 % and 100 %, unlike the
    normal approximation."""
    if n == 0:
        raise ValueError("a proportion needs at least one case")
    p = successes / n
    denom = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denom
    half = _Z95 * np.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def localisation_report(
    distances: Sequence[PeakDistance], within_mm: float = DEFAULT_WITHIN_MM
) -> LocalisationReport:
    n = len(distances)
    if n == 0:
        return LocalisationReport(within_mm, 0, 0, None, None, None)
    hits = sum(d.distance_mm <= within_mm for d in distances)
    median = float(np.median([d.distance_mm for d in distances]))
    return LocalisationReport(
        within_mm, n, hits, hits / n, wilson_interval(hits, n), round(median, 2)
    )
