"""Keras-2.0-faithful ResNet pieces: the ResNet50 patch trunk and the residual top blocks.

Both use the same bottleneck unit ("ResNet v1": the stride sits on the first 1x1 conv and on
the 1x1 projection shortcut). Every conv has a bias and BatchNorm uses Keras' eps 1e-3, as in
the published `.h5` files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
"""Keras' BatchNormalization default; PyTorch's 1e-5 moves p(cancer) measurably."""

STEM_PADDINGS = ("zeropad", "same")


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's 'SAME' on one axis: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Bottleneck(nn.Module):
    """1x1/stride → 3x3 → 1x1 (x out_channels), with a 1x1/stride conv + BN shortcut when
    `project` is set and an identity shortcut otherwise."""

    def __init__(
        self, in_channels: int, width: int, out_channels: int, stride: int, project: bool
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride)
        self.bn1 = batch_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = batch_norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1)
        self.bn3 = batch_norm(out_channels)
        self.downsample: nn.Sequential | None = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride), batch_norm(out_channels)
            )
        elif stride != 1 or in_channels != out_channels:
            raise ValueError("an identity shortcut needs stride 1 and equal channel counts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def residual_stage(
    in_channels: int, width: int, out_channels: int, units: int, stride: int
) -> nn.Sequential:
    """One projection unit carrying the stride, then `units - 1` identity units."""
    layers = [Bottleneck(in_channels, width, out_channels, stride, project=True)]
    for _ in range(units - 1):
        layers.append(Bottleneck(out_channels, width, out_channels, 1, project=False))
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """The Keras 2.0.x `applications.ResNet50` graph up to the last ReLU of its final stage.

    `stem_padding` "zeropad" is `ZeroPadding2D(3)` + a 'valid' 7x7/2 conv (Keras ≤ 2.0.6);
    "same" is a 'same' 7x7/2 conv, i.e. TensorFlow's asymmetric padding (2 before, 3 after on
    even sizes). The 3x3/2 max pool has no padding (287x223 at 1152x896, not 288x224).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        expansion: int = 4,
        stem_width: int = 64,
        stem_padding: str = "zeropad",
    ) -> None:
        super().__init__()
        if stem_padding not in STEM_PADDINGS:
            raise ValueError(f"stem_padding must be one of {STEM_PADDINGS}, got {stem_padding!r}")
        self.stem_padding = stem_padding
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2)
        self.bn1 = batch_norm(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0)
        channels = stem_width
        for i, (width, units) in enumerate(zip(widths, blocks, strict=True)):
            stage = residual_stage(channels, width, width * expansion, units, 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            channels = width * expansion
        self.stages = len(widths)
        self.out_channels = channels

    def _pad_stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem_padding == "zeropad":
            return F.pad(x, (3, 3, 3, 3))
        top, bottom = tf_same_padding(x.shape[-2], 7, 2)
        left, right = tf_same_padding(x.shape[-1], 7, 2)
        return F.pad(x, (left, right, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self._pad_stem(x))))
        x = self.maxpool(x)
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


def residual_top(
    in_channels: int, depths: tuple[int, ...], repetitions: tuple[int, ...], enlarge: int
) -> tuple[nn.Sequential, int]:
    """The `[d-d-d*enlarge]xr` top blocks of Shen et al.; each block halves the map."""
    blocks = []
    channels = in_channels
    for depth, reps in zip(depths, repetitions, strict=True):
        blocks.append(residual_stage(channels, depth, depth * enlarge, reps, stride=2))
        channels = depth * enlarge
    return nn.Sequential(*blocks), channels
