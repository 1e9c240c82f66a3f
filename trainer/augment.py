"""Training augmentation on prepared input tensors (after the family's preprocessing).

The all-conv paper trains with random horizontal and vertical flips, rotation up to ±25°,
zoom 0.8–1.2 and a channel (intensity) shift; we apply the same families of transforms to the
prepared batch on the training device, as one affine resampling per image. Augmenting after
preprocessing keeps the cached inputs valid and the geometry chain of inference untouched.

Random draws come from an explicit `torch.Generator` on the CPU, so a seeded epoch augments
identically on every run and device (the resume test relies on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.family import get_family


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotation_deg: float = 25.0
    zoom: tuple[float, float] = (0.8, 1.2)
    intensity_shift: float = 0.1
    """Maximum additive shift, in units of each image's standard deviation."""


LEVELS = ("full", "flips", "none")


def default_augmentation(family: str, level: str = "full") -> AugmentConfig | None:
    """The augmentation of a `trainer finetune --augment` level for a family.

    "flips" keeps only the mirror images: a small synthetic or site set learns faster with it
    when rotation and zoom make the task too hard for the data at hand. Only the flips the
    family is run under (`ModelFamily.test_time_flips`) are drawn: GMIC's preprocessing turns
    every breast to face the same way, so a horizontal flip would show it a breast it never
    sees at inference, and GMIC keeps vertical flips only.
    """
    if level not in LEVELS:
        raise ValueError(f"augmentation level must be one of {', '.join(LEVELS)}, not {level!r}")
    if level == "none":
        return None
    config = AugmentConfig(hflip="hflip" in get_family(family).test_time_flips)
    if level == "flips":
        return AugmentConfig(config.hflip, True, 0.0, (1.0, 1.0), 0.0)
    return config


def augment(
    batch: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly flip, rotate, zoom and shift each image of a (N, C, H, W) batch, and move the
    (N, 2, h, w) lesion `masks` (any resolution covering the same input) with their images.

    Pixels that come from outside the image read as that image's minimum (the background of
    any normalisation), not as zero; masks read zero there.
    """
    n, _, h, w = batch.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    def coin(enabled: bool) -> torch.Tensor:
        draw = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        return torch.where(draw & enabled, -1.0, 1.0).to(torch.float64)

    fx, fy = coin(config.hflip), coin(config.vflip)
    angle = uniform(-config.rotation_deg, config.rotation_deg) * math.pi / 180.0
    zoom = uniform(*config.zoom)
    shift = uniform(-config.intensity_shift, config.intensity_shift)

    # affine_grid works in normalised coordinates ([-1, 1] per axis); rotate in pixel units so
    # a non-square image is not sheared: theta = S^-1 R S / zoom · flip, S = diag(w/2, h/2).
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * fx / zoom
    theta[:, 0, 1] = -sin * (h / w) * fy / zoom
    theta[:, 1, 0] = sin * (w / h) * fx / zoom
    theta[:, 1, 1] = cos * fy / zoom
    grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)

    floor = batch.amin(dim=(1, 2, 3), keepdim=True)
    std = batch.std(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(
        batch - floor,
        grid.to(batch.device),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    out = out + floor + shift.to(batch.device, batch.dtype).view(n, 1, 1, 1) * std
    if masks is not None:
        mask_grid = F.affine_grid(theta.to(torch.float32), list(masks.shape), align_corners=False)
        masks = F.grid_sample(
            masks.float(),
            mask_grid.to(masks.device),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
    return out, masks
