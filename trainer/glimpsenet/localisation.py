"""Does the FCGN mask point at the malignant lesion? Its peak, mapped back to the source grid,
is a hit when it lies within `radius_mm` of a malignant-mask pixel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
from PIL import Image
from torch import nn

from models.family import ModelFamily
from models.reading import read_mammogram_file

from ..sitedata import SiteImage

DEFAULT_RADIUS_MM = 5.0


@dataclass(frozen=True)
class PeakReport:
    images: int
    """Malignant images with a malignant mask that were checked."""
    hits: int
    radius_mm: float
    distances_mm: tuple[float, ...]

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.images if self.images else None

    def to_json(self) -> dict[str, float | int | None]:
        d = np.asarray(self.distances_mm)
        return {
            "images": self.images,
            "hits": self.hits,
            "radius_mm": self.radius_mm,
            "hit_rate": self.hit_rate,
            "median_distance_mm": float(np.median(d)) if d.size else None,
        }


@torch.no_grad()
def mask_peaks(
    module: nn.Module,
    family: ModelFamily,
    spec: dict,
    images: Sequence[SiteImage],
    device: torch.device,
    radius_mm: float = DEFAULT_RADIUS_MM,
) -> PeakReport:
    """Distance from each malignant image's mask peak to its malignant lesion, in mm (0 when
    the peak is on the lesion). Images without pixel spacing count 0.1 mm per pixel."""
    module.eval()
    distances = []
    for im in images:
        if not im.malignant or im.malignant_mask is None:
            continue
        mammogram = read_mammogram_file(im.path)
        prepared = family.preprocess(mammogram, spec)
        mask = module.mask(prepared.tensor[None].to(device))[0, 0].cpu()
        h, w = mask.shape
        row, col = divmod(int(torch.argmax(mask)), w)
        in_h, in_w = prepared.geometry.input_shape
        point = [(row + 0.5) * in_h / h, (col + 0.5) * in_w / w]
        src_row, src_col = prepared.geometry.to_source([point])[0]
        with Image.open(im.malignant_mask) as png:
            lesion = np.asarray(png.convert("L")) > 0
        spacing = mammogram.pixel_spacing_mm or (0.1, 0.1)
        to_lesion = ndi.distance_transform_edt(~lesion, sampling=spacing)
        r = min(max(int(src_row), 0), lesion.shape[0] - 1)
        c = min(max(int(src_col), 0), lesion.shape[1] - 1)
        distances.append(float(to_lesion[r, c]))
    hits = sum(d <= radius_mm for d in distances)
    return PeakReport(len(distances), hits, radius_mm, tuple(distances))
