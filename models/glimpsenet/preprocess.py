"""GlimpseNet's preprocessing: the paper resizes every image to 512×512 and subtracts the
channel mean, with no augmentation and no variance normalisation.

We resize to the full-resolution grid (`fcgn_size · scale` square, e.g. 2048×2048 for the paper
preset), from which the model both pools the FCGN's 512×512 input and cuts its glimpses; so one
`Resize` step in the `Geometry` maps the mask and the glimpse boxes back to the source. Like the
paper, the resize ignores the aspect ratio. Pixel values are scaled to [0, 1] by the bit depth,
then the mean is subtracted: the image's own mean (`mean: "image"`, ours: robust to a
scanner's overall brightness) or a fixed value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..family import Prepared
from ..geometry import Geometry, Resize
from ..mammogram import Mammogram, MammogramError
from .network import GlimpseNetConfig


@dataclass(frozen=True)
class PreprocessSpec:
    size: int
    """Side of the square full-resolution input grid."""
    mean: float | str = "image"

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> PreprocessSpec:
        unknown = sorted(set(spec) - {"size", "mean"})
        if unknown:
            raise ValueError(f"GlimpseNet preprocessing: unknown keys {unknown}; known: mean, size")
        try:
            size = int(spec["size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"GlimpseNet preprocessing needs size: N, got {spec.get('size')!r}"
            ) from None
        mean = spec.get("mean", "image")
        if mean != "image" and not isinstance(mean, int | float):
            raise ValueError(
                f'GlimpseNet preprocessing: mean must be "image" or a number, got {mean!r}'
            )
        if size < 1:
            raise ValueError(f"GlimpseNet preprocessing: size must be at least 1, got {size}")
        return cls(size=size, mean=mean)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": self.mean}


def default_spec(architecture: dict[str, Any]) -> dict[str, Any]:
    return PreprocessSpec(size=GlimpseNetConfig.from_dict(architecture).input_size).to_dict()


def preprocess(image: Mammogram, spec: dict[str, Any]) -> Prepared:
    """Mammogram → (1, size, size) float32 input and its `Geometry` (one Resize step)."""
    s = PreprocessSpec.from_dict(spec)
    pixels = np.asarray(image.pixels)
    if pixels.ndim != 2:
        raise MammogramError(f"expected one 2-D image plane, got pixels of shape {pixels.shape}")
    if not 1 <= image.bits_stored <= 16:
        raise MammogramError(f"bits_stored {image.bits_stored} is outside 1..16")
    x = torch.from_numpy(pixels.astype(np.float32) / np.float32(2**image.bits_stored - 1))
    x = x[None, None]
    if tuple(x.shape[-2:]) != (s.size, s.size):
        x = F.interpolate(
            x, size=(s.size, s.size), mode="bilinear", align_corners=False, antialias=True
        )
    x = x[0]
    x = x - (x.mean() if s.mean == "image" else float(s.mean))
    return Prepared(
        tensor=x.contiguous(), geometry=Geometry(image.shape, (Resize(s.size, s.size),))
    )
