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
_BLOCK = 1 << 16
"""Pixels per block of the stretch: its temporaries stay in the CPU's cache."""


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
        top = 2**image.bits_stored - 1
        if device.type != "cpu":
            x = _as_16bit_png(x.to(device).double() * (_MAX_16BIT / top))
        elif (stretched := _stretch_stored_values(pixels, top)) is not None:
            x = torch.from_numpy(stretched)
        else:  # the same float64 stretch in numpy: 3x faster than torch's on the CPU
            stretched = np.rint(pixels.astype(np.float64) * (_MAX_16BIT / top))
            x = torch.from_numpy(np.clip(stretched, 0.0, _MAX_16BIT).astype(np.float32))
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


def _stretch_stored_values(pixels: np.ndarray, top: int) -> np.ndarray | None:
    """rint(x · 65535 / top) as float32, exactly as the float64 stretch, when every pixel x
    is an integer in 0..top (decoded stored values are); else None. 3x faster: float32, in
    blocks that stay in the cache. With q the integer part of 65535 / top and f the rest,
    x · q is an exact integer, so the rounding is x · q + rint(x · f); the float32 x · f is
    off by less than 2e-6, while the nearest tie is at least 1 / (2 · top) >= 1.5e-5 away
    (top is odd: x · 65535 / top is never a half). A plain float32 x · 65535 / top rounds
    65 of the 32768 15-bit values the other way."""
    if pixels.dtype != np.float32:
        return None
    whole, rest = divmod(int(_MAX_16BIT), top)
    q, f = np.float32(whole), np.float32(rest / top)
    flat = np.ascontiguousarray(pixels).reshape(-1)
    out = np.empty_like(flat)
    scratch = np.empty(min(_BLOCK, flat.size), np.float32)
    for start in range(0, flat.size, _BLOCK):
        x, o = flat[start : start + _BLOCK], out[start : start + _BLOCK]
        t = scratch[: x.size]
        if not (x.min() >= 0 and x.max() <= top) or not np.array_equal(np.rint(x, out=t), x):
            return None
        np.rint(np.multiply(x, f, out=t), out=t)
        np.add(np.multiply(x, q, out=o), t, out=o)
    return out.reshape(pixels.shape)


def _resize_bicubic(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """OpenCV's INTER_CUBIC on a uint16 image: a = −0.75 bicubic on pixel centres without
    antialiasing (torch's `bicubic`, align_corners=False), then rounded and saturated to 16 bits."""
    out = F.interpolate(x[None, None], size=(rows, cols), mode="bicubic", align_corners=False)
    return _as_16bit_png(out[0, 0])


def _as_16bit_png(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0.0, _MAX_16BIT).float()
