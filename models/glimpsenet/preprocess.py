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

import math
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PlainValidator

from ..config import Positive, StrictConfig
from ..family import Prepared
from ..geometry import Geometry, Resize
from ..mammogram import Mammogram, MammogramError
from .network import GlimpseNetConfig


def _mean(value: Any) -> float | str:
    if value == "image" or (type(value) in (int, float) and math.isfinite(value)):
        return value
    raise ValueError(f'must be "image" or a number, got {value!r}')


class PreprocessSpec(StrictConfig):
    subject: ClassVar[str] = "GlimpseNet preprocessing"

    size: Positive
    """Side of the square full-resolution input grid."""
    mean: Annotated[float | Literal["image"], PlainValidator(_mean)] = "image"


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
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    if tuple(x.shape[-2:]) != (s.size, s.size):
        x = F.interpolate(
            x, size=(s.size, s.size), mode="bilinear", align_corners=False, antialias=True
        )
    # Scaled after the resize (linear, so the same up to rounding): a pass over the input
    # grid, not over the source (10 ms less per 3328x2560 image).
    x = x[0] / np.float32(2**image.bits_stored - 1)
    x = x - (x.mean() if s.mean == "image" else float(s.mean))
    return Prepared(
        tensor=x.contiguous(), geometry=Geometry(image.shape, (Resize(s.size, s.size),))
    )
