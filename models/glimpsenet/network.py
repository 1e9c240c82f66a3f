"""GlimpseNet (Hang, Liu, Hannun 2017): FCGN mask → glimpses → Inception V3 → MIL pooling.

One forward pass on the full-resolution input grid (`size × size`, with `size = fcgn_size ·
scale`): the FCGN sees the image average-pooled to `fcgn_size` (the paper's 512×512), picks
glimpse windows on its mask, and the glimpses are cut from the full-resolution input and
resampled to the classifier's input (the paper's 299×299). The classifier gives each glimpse an
independent Bernoulli probability per class, in the paper's order (BENIGN_WITHOUT_CALLBACK,
BENIGN, MALIGNANT), and MIL pooling turns them into the image's probabilities.

GlimpseNet is not end-to-end trainable (a glimpse is an argmax): the trainer fits the FCGN to
lesion masks first, then the classifier with the FCGN's glimpses (`trainer.glimpsenet`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import mil
from .fcgn import FCGN
from .glimpses import crop_glimpses, select_glimpses
from .inception import MIN_INPUT, InceptionV3

CLASSES = ("BENIGN_WITHOUT_CALLBACK", "BENIGN", "MALIGNANT")
MALIGNANT = 2

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "fcgn_size": 512,
        "scale": 4,
        "fcgn": {
            "widths": [32, 64, 96, 128, 192, 256, 256, 256, 256],
            "kernels": [7, 5, 5, 3, 3, 3, 3, 3, 3],
            "mask_scale": 1.0,
        },
        "glimpses": {"count": 6, "window": 64, "stride": 16, "iou": 0.5, "size": 299},
        "classifier": {"width": 1.0, "dropout": 0.4},
        "pooling": {"kind": "lse", "r": 5.0},
    },
    "demo": {
        "fcgn_size": 128,
        "scale": 4,
        "fcgn": {
            "widths": [8, 16, 24, 32, 32, 32, 32],
            "kernels": [5, 3, 3, 3, 3, 3, 3],
            "mask_scale": 1.0,
        },
        "glimpses": {"count": 4, "window": 16, "stride": 8, "iou": 0.5, "size": 75},
        "classifier": {"width": 0.125, "dropout": 0.4},
        "pooling": {"kind": "lse", "r": 5.0},
    },
}
"""`paper`: the paper's 512×512 FCGN input and full Inception V3 at 299×299 glimpses (six
glimpses of 64×64 FCGN pixels, a 2048×2048 full-resolution grid: ours). `demo`: a 128×128
FCGN and a 1/8-width Inception V3 at 75×75, small enough to train on a CPU."""


@dataclass(frozen=True)
class GlimpseConfig:
    count: int
    window: int
    """Side of a candidate window, in FCGN mask pixels."""
    stride: int
    iou: float
    size: int
    """Side of a glimpse as the classifier sees it."""


@dataclass(frozen=True)
class GlimpseNetConfig:
    fcgn_size: int
    scale: int
    widths: tuple[int, ...]
    kernels: tuple[int, ...]
    mask_scale: float
    """The FCGN's raw output divided by this is the lesion confidence: 1 for the weighted
    loss, λ for the paper's printed loss (whose target is λ on lesion pixels)."""
    glimpses: GlimpseConfig
    width: float
    dropout: float
    pooling: dict[str, Any]

    @property
    def input_size(self) -> int:
        return self.fcgn_size * self.scale

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> GlimpseNetConfig:
        known = {"fcgn_size", "scale", "fcgn", "glimpses", "classifier", "pooling"}
        unknown = sorted(set(arch) - known)
        missing = sorted(known - set(arch))
        if unknown or missing:
            raise ValueError(
                f"GlimpseNet architecture: unknown keys {unknown}, missing keys {missing}; "
                f"start from a preset in models.glimpsenet.PRESETS"
            )
        try:
            g = GlimpseConfig(**arch["glimpses"])
            config = cls(
                fcgn_size=int(arch["fcgn_size"]),
                scale=int(arch["scale"]),
                widths=tuple(int(v) for v in arch["fcgn"]["widths"]),
                kernels=tuple(int(v) for v in arch["fcgn"]["kernels"]),
                mask_scale=float(arch["fcgn"].get("mask_scale", 1.0)),
                glimpses=g,
                width=float(arch["classifier"]["width"]),
                dropout=float(arch["classifier"]["dropout"]),
                pooling=dict(arch["pooling"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"GlimpseNet architecture: bad or missing field ({exc})") from None
        config._check()
        return config

    def _check(self) -> None:
        g = self.glimpses
        if self.fcgn_size % (2 ** len(self.widths)):
            raise ValueError(
                f"GlimpseNet: fcgn_size {self.fcgn_size} must be divisible by 2**depth = "
                f"{2 ** len(self.widths)}"
            )
        if self.scale < 1 or self.mask_scale <= 0:
            raise ValueError("GlimpseNet: scale must be >= 1 and mask_scale > 0")
        if not (1 <= g.window <= self.fcgn_size and g.stride >= 1 and g.count >= 1):
            raise ValueError(f"GlimpseNet: bad glimpse settings {g}")
        if not 0 < g.iou <= 1:
            raise ValueError(f"GlimpseNet: glimpse NMS IoU must be in (0, 1], got {g.iou}")
        if g.size < MIN_INPUT:
            raise ValueError(
                f"GlimpseNet: glimpse size must be at least {MIN_INPUT} for Inception V3"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GlimpseNet: dropout must be in [0, 1), got {self.dropout}")
        if self.pooling.get("kind") not in mil.POOLINGS:
            raise ValueError(
                f"GlimpseNet: pooling kind must be one of {mil.POOLINGS}, got {self.pooling}"
            )
        mil.pool(torch.full((1, g.count, len(CLASSES)), 0.5), self.pooling)  # checks its args


@dataclass(frozen=True)
class GlimpseNetOutput:
    """One batch's result; pixel coordinates are on the full-resolution input grid."""

    probabilities: torch.Tensor
    """(N, 3) MIL-pooled probabilities, classes as in `CLASSES`; float32."""
    glimpse_probabilities: torch.Tensor
    """(N, J, 3) per-glimpse probabilities."""
    mask: torch.Tensor
    """(N, 1, fcgn_size, fcgn_size) lesion confidence in [0, 1], float32."""
    mask_raw: torch.Tensor = field(repr=False)
    """The FCGN's raw regression output (what the mask loss sees)."""
    boxes: torch.Tensor = field(repr=False)
    """(N, J, 4) glimpse boxes (top, left, bottom, right), best mask score first."""
    input_shape: tuple[int, int] = (0, 0)


class GlimpseNet(nn.Module):
    def __init__(self, architecture: dict[str, Any]) -> None:
        super().__init__()
        self.config = GlimpseNetConfig.from_dict(copy.deepcopy(architecture))
        c = self.config
        self.fcgn = FCGN(list(c.widths), list(c.kernels))
        self.inception = InceptionV3(c.width)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(self.inception.features, len(CLASSES))

    def fcgn_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, size, size) full-resolution input → the FCGN's (N, 1, fcgn_size, fcgn_size)."""
        c = self.config
        if tuple(x.shape[-2:]) != (c.input_size, c.input_size) or x.shape[1] != 1:
            raise ValueError(
                f"GlimpseNet needs (N, 1, {c.input_size}, {c.input_size}) inputs, got "
                f"{tuple(x.shape)}; preprocess with the model card's spec"
            )
        return F.avg_pool2d(x, c.scale) if c.scale > 1 else x

    def lesion_mask(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() / self.config.mask_scale).clamp(0.0, 1.0)

    def glimpse_boxes(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, J, 4) glimpse boxes on the full-resolution grid, from the (N, 1, s, s) mask;
        float32 on the mask's device, whatever the autocast state."""
        g = self.config.glimpses
        boxes, _ = select_glimpses(mask.detach(), g.window, g.stride, g.count, g.iou)
        return boxes * float(self.config.scale)

    def crops(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return crop_glimpses(x, boxes, self.config.glimpses.size)

    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, J, 1, S, S) glimpses → (N, J, 3) per-class probabilities."""
        n, j = crops.shape[:2]
        x = crops.reshape(n * j, *crops.shape[2:]).expand(-1, 3, -1, -1)
        logits = self.fc(self.dropout(self.inception(x)))
        return torch.sigmoid(logits.float()).reshape(n, j, len(CLASSES))

    def pool(self, glimpse_probabilities: torch.Tensor) -> torch.Tensor:
        return mil.pool(glimpse_probabilities.float(), self.config.pooling)

    def forward(self, x: torch.Tensor) -> GlimpseNetOutput:
        raw = self.fcgn(self.fcgn_input(x))
        mask = self.lesion_mask(raw)
        boxes = self.glimpse_boxes(mask)
        per_glimpse = self.classify(self.crops(x, boxes))
        return GlimpseNetOutput(
            probabilities=self.pool(per_glimpse),
            glimpse_probabilities=per_glimpse,
            mask=mask,
            mask_raw=raw,
            boxes=boxes,
            input_shape=tuple(x.shape[-2:]),
        )
