"""The published preprocessing of the all-convolutional classifier (Shen et al.).

Upstream reads 16-bit PNGs unchanged, resizes them bicubically to 1152x896 when needed,
multiplies by 0.003891 (= 255/65535) and subtracts one featurewise mean (52.18 for the DDSM
models, 44.33 for INbreast); there is no per-image normalisation and no canonical-side flip.

DICOM images are rarely 16-bit: INbreast is 14-bit, many systems store 12. The 0.003891 factor
assumes the full 16-bit range, so a `bits_stored`-bit image is first stretched to it
(x · 65535 / (2^bits − 1)), rounded and clipped as a 16-bit PNG would hold it. We take the
stretch rather than the raw value because the published means only make sense that way: a
14-bit INbreast image left unstretched tops out at 63.7 after rescaling, so its mean of 44.33
would put the average pixel at 70 % of full scale, implausible for an image that is largely
black background. `scale_to_16bit: false` in the spec feeds stored values unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PositivePair, StrictConfig
from ..family import Prepared
from ..geometry import Geometry, Resize
from ..mammogram import Mammogram, MammogramError
from .network import ArchitectureConfig

RESCALE_16BIT = 0.003891
DDSM_MEAN = 52.18
INBREAST_MEAN = 44.33
_MAX_16BIT = 65535.0


class PreprocessSpec(StrictConfig):
    subject: ClassVar[str] = "all-conv preprocessing"

    target_size: PositivePair
    """(rows, cols) of the model input; 1152x896 for the published models."""
    featurewise_mean: float = DDSM_MEAN
    rescale: float = RESCALE_16BIT
    scale_to_16bit: bool = True
    """Stretch a `bits_stored` < 16 image to the 16-bit range before `rescale`."""


def default_spec(architecture: dict[str, Any]) -> dict[str, Any]:
    """The DDSM preprocessing at the architecture's input size (INbreast models: mean 44.33)."""
    config = ArchitectureConfig.from_dict(architecture)
    return PreprocessSpec(target_size=config.input_shape).to_dict()


def preprocess(
    image: Mammogram, spec: dict[str, Any], device: torch.device | str = "cpu"
) -> Prepared:
    """Mammogram → (3, H, W) float32 input on `device` and the `Geometry` (one Resize step)
    back; the pixel work runs in torch on `device`."""
    s = PreprocessSpec.from_dict(spec)
    pixels = np.asarray(image.pixels)
    if pixels.ndim != 2:
        raise MammogramError(f"expected one 2-D image plane, got pixels of shape {pixels.shape}")
    if not 1 <= image.bits_stored <= 16:
        raise MammogramError(
            f"bits_stored {image.bits_stored} is outside 1..16; the all-conv models take "
            "images of at most 16 bits"
        )
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    if s.scale_to_16bit and image.bits_stored < 16:
        factor = _MAX_16BIT / (2**image.bits_stored - 1)
        if device.type == "cpu":
            # The same float64 stretch in numpy: 3x faster than torch's on the CPU.
            stretched = np.rint(pixels.astype(np.float64) * factor)
            x = torch.from_numpy(np.clip(stretched, 0.0, _MAX_16BIT).astype(np.float32))
        else:
            x = _as_16bit_png(x.to(device).double() * factor)
    x = x.to(device)
    rows, cols = s.target_size
    if tuple(x.shape) != (rows, cols):
        x = _resize_bicubic(x, rows, cols)
    # Two float32 operations, as upstream: this reproduces its input bit for bit.
    x = x * s.rescale
    x = x - s.featurewise_mean
    return Prepared(
        tensor=x.unsqueeze(0).expand(3, -1, -1),
        geometry=Geometry(image.shape, (Resize(rows, cols),)),
    )


def _resize_bicubic(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """OpenCV's INTER_CUBIC on a uint16 image: a = −0.75 bicubic on pixel centres without
    antialiasing (torch's `bicubic`, align_corners=False), then rounded and saturated to 16 bits."""
    out = F.interpolate(x[None, None], size=(rows, cols), mode="bicubic", align_corners=False)
    return _as_16bit_png(out[0, 0])


def _as_16bit_png(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0.0, _MAX_16BIT).float()
