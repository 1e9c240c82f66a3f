"""GlimpseNet (Hang, Liu, Hannun 2017): FCGN mask → glimpses → Inception V3 → MIL pooling.

One forward pass on the full-resolution input grid (`size × size`, with `size = fcgn_size ·
scale`): the FCGN sees the image at `fcgn_size` (average-pooled: the paper's 512×512; or each
block's pixels as channels, `fcgn.input`), picks
glimpse windows on its mask, and the glimpses are cut from the full-resolution input and
resampled to the classifier's input (the paper's 299×299). The classifier gives each glimpse an
independent Bernoulli probability per class, in the paper's order (BENIGN_WITHOUT_CALLBACK,
BENIGN, MALIGNANT), and MIL pooling turns them into the image's probabilities.

GlimpseNet is not end-to-end trainable (a glimpse is an argmax): the trainer fits the FCGN to
lesion masks first, then the classifier with the FCGN's glimpses (`trainer.glimpsenet`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import Positive, Sizes, StrictConfig
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
            "widths": [16, 32, 48, 64],
            "kernels": [3, 3, 3, 3],
            "mask_scale": 1.0,
            "input": "unshuffle",
        },
        "glimpses": {"count": 8, "window": 16, "stride": 8, "iou": 0.5, "size": 75},
        "classifier": {"width": 0.125, "dropout": 0.4},
        "pooling": {"kind": "lse", "r": 5.0},
    },
}
"""`paper`: the paper's 512×512 FCGN input and full Inception V3 at 299×299 glimpses (six
glimpses of 64×64 FCGN pixels, a 2048×2048 full-resolution grid: ours). `demo`: a 128×128
FCGN that sees each 4×4 block of the 512×512 grid as 16 channels (so calcification specks
survive) and pools four times, to an 8×8 code (pooled down to 1×1, as the paper's, it could not
learn to find calcification clusters: 23 of 74 on the demo's test split, against 54 of 74), and
a 1/8-width Inception V3 at 75×75, small enough to train on a CPU."""


class _Section(StrictConfig):
    subject: ClassVar[str] = "GlimpseNet architecture"


class FCGNConfig(_Section):
    widths: Sizes
    """Channels per encoder level (the decoder mirrors them)."""
    kernels: Sizes
    """Odd kernel size per level."""
    mask_scale: Annotated[float, Field(gt=0.0)] = 1.0
    """The FCGN's raw output divided by this is the lesion confidence: 1 for the weighted
    loss, λ for the paper's printed loss (whose target is λ on lesion pixels)."""
    input: Literal["average", "unshuffle"] = "average"
    """How the full-resolution grid becomes the FCGN's `fcgn_size` input. "average": each
    `scale`×`scale` block averaged to one pixel (the paper's resized image). "unshuffle": each
    block's pixels as `scale²` channels (`pixel_unshuffle`), so detail finer than an FCGN
    pixel (a calcification speck, averaged away by "average") still reaches the first
    convolution; ours, for the demo's 128×128 FCGN."""

    @model_validator(mode="after")
    def _one_odd_kernel_per_level(self) -> Self:
        if len(self.kernels) != len(self.widths) or any(k % 2 == 0 for k in self.kernels):
            raise ValueError(
                f"needs one odd kernel size per level: widths {list(self.widths)}, kernels "
                f"{list(self.kernels)}"
            )
        return self


class GlimpseConfig(_Section):
    count: Positive
    window: Positive
    """Side of a candidate window, in FCGN mask pixels."""
    stride: Positive
    iou: Annotated[float, Field(gt=0.0, le=1.0)]
    """Non-maximum suppression threshold between glimpses."""
    size: int
    """Side of a glimpse as the classifier sees it."""

    @field_validator("size")
    @classmethod
    def _inception_minimum(cls, size: int) -> int:
        if size < MIN_INPUT:
            raise ValueError(f"must be at least {MIN_INPUT} for Inception V3, got {size}")
        return size


class ClassifierConfig(_Section):
    width: Annotated[float, Field(gt=0.0)]
    """Inception V3's channel multiplier (1 = the full network)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]


class LSEPooling(_Section):
    kind: Literal["lse"]
    r: Annotated[float, Field(gt=0.0)] = 5.0


class NoisyAndPooling(_Section):
    kind: Literal["noisy_and"]
    a: Annotated[float, Field(gt=0.0)] = 10.0
    b: float = 0.2


class TopKPooling(_Section):
    kind: Literal["topk"]
    k: Positive = 3
    by: Annotated[int, Field(ge=0, lt=len(CLASSES))] = MALIGNANT


Pooling = Annotated[LSEPooling | NoisyAndPooling | TopKPooling, Field(discriminator="kind")]
"""One MIL pooling operator of `mil` and its arguments."""


class GlimpseNetConfig(_Section):
    """Architecture of one GlimpseNet; the card's `architecture` as it is stored."""

    fcgn_size: Positive
    scale: Positive
    fcgn: FCGNConfig
    glimpses: GlimpseConfig
    classifier: ClassifierConfig
    pooling: Pooling

    @property
    def input_size(self) -> int:
        return self.fcgn_size * self.scale

    @property
    def mask_scale(self) -> float:
        return self.fcgn.mask_scale

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        depth = len(self.fcgn.widths)
        if self.fcgn_size % 2**depth:
            raise ValueError(
                f"fcgn_size {self.fcgn_size} must be divisible by 2**depth = {2**depth}"
            )
        if self.glimpses.window > self.fcgn_size:
            raise ValueError(
                f"glimpses.window {self.glimpses.window} is larger than fcgn_size {self.fcgn_size}"
            )
        if isinstance(self.pooling, TopKPooling) and self.pooling.k > self.glimpses.count:
            raise ValueError(
                f"pooling: top-k pooling needs 1 <= k <= {self.glimpses.count} (glimpses.count), "
                f"got k={self.pooling.k}"
            )
        return self


@dataclass(frozen=True)
class GlimpseNetOutput:
    """One batch's result; pixel coordinates are on the full-resolution input grid."""

    probabilities: torch.Tensor
    """(N, 3) MIL-pooled probabilities, classes as in `CLASSES`; float32."""
    glimpse_probabilities: torch.Tensor
    """(N, J, 3) per-glimpse probabilities."""
    mask: torch.Tensor
    """(N, 1, fcgn_size, fcgn_size) lesion confidence in [0, 1], float32."""
    boxes: torch.Tensor = field(repr=False)
    """(N, J, 4) glimpse boxes (top, left, bottom, right), best mask score first."""
    input_shape: tuple[int, int] = (0, 0)


class GlimpseNet(nn.Module):
    def __init__(self, architecture: dict[str, Any]) -> None:
        super().__init__()
        self.config = GlimpseNetConfig.from_dict(architecture)
        c = self.config
        unshuffled = c.fcgn.input == "unshuffle"
        self.fcgn = FCGN(list(c.fcgn.widths), list(c.fcgn.kernels), c.scale**2 if unshuffled else 1)
        self.inception = InceptionV3(c.classifier.width)
        self.dropout = nn.Dropout(c.classifier.dropout)
        self.fc = nn.Linear(self.inception.features, len(CLASSES))

    def fcgn_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, size, size) full-resolution input → the FCGN's (N, C, fcgn_size, fcgn_size),
        C = 1, or scale² with the "unshuffle" input."""
        c = self.config
        if tuple(x.shape[-2:]) != (c.input_size, c.input_size) or x.shape[1] != 1:
            raise ValueError(
                f"GlimpseNet needs (N, 1, {c.input_size}, {c.input_size}) inputs, got "
                f"{tuple(x.shape)}; preprocess with the model card's spec"
            )
        if c.scale == 1:
            return x
        if c.fcgn.input == "unshuffle":
            return F.pixel_unshuffle(x, c.scale)
        return F.avg_pool2d(x, c.scale)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, fcgn_size, fcgn_size) lesion confidence of full-resolution inputs. The FCGN
        runs in fp32 under any autocast, as GMIC's global network does: its mask picks the
        glimpses, a discrete choice that reduced precision must never move."""
        with torch.autocast(x.device.type, enabled=False):
            raw = self.fcgn(self.fcgn_input(x.float()))
        return (raw / self.config.mask_scale).clamp(0.0, 1.0)

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Inception V3 and its head: what the MIL stage trains, the FCGN frozen."""
        return [*self.inception.parameters(), *self.fc.parameters()]

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
        return mil.pool(glimpse_probabilities.float(), self.config.pooling.to_dict())

    def forward(self, x: torch.Tensor) -> GlimpseNetOutput:
        mask = self.mask(x)
        boxes = self.glimpse_boxes(mask)
        per_glimpse = self.classify(self.crops(x, boxes))
        return GlimpseNetOutput(
            probabilities=self.pool(per_glimpse),
            glimpse_probabilities=per_glimpse,
            mask=mask,
            boxes=boxes,
            input_shape=tuple(x.shape[-2:]),
        )
