"""Keras-2.0-faithful VGG pieces: the VGG16 patch trunk and the `512x1`-style top blocks.

All convs are 3x3 stride 1 'same' (symmetric padding 1) with a bias; pools are 2x2/2 'valid'.
The trunk has no BatchNorm (its ReLU sits inside the Keras conv layer); the top blocks are
Conv → BN (eps 1e-3) → ReLU, as `add_top_layers` builds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import batch_norm


class VGGBlock(nn.Module):
    """`convs` x [3x3 conv (→ BN) → ReLU], then a 2x2/2 max pool; modules `conv1`, `bn1`, …"""

    def __init__(self, in_channels: int, width: int, convs: int, with_bn: bool) -> None:
        super().__init__()
        self.convs = convs
        self.with_bn = with_bn
        channels = in_channels
        for i in range(1, convs + 1):
            self.add_module(f"conv{i}", nn.Conv2d(channels, width, 3, padding=1))
            if with_bn:
                self.add_module(f"bn{i}", batch_norm(width))
            channels = width
        self.pool = nn.MaxPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.convs + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.with_bn:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
        return self.pool(x)


class VGGTrunk(nn.Module):
    """Keras `applications.VGG16` up to `block5_pool`; modules `block1` … mirror its names."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        channels = 3
        for i, (width, convs) in enumerate(zip(widths, blocks, strict=True)):
            self.add_module(f"block{i + 1}", VGGBlock(channels, width, convs, with_bn=False))
            channels = width
        self.stages = len(widths)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.stages):
            x = getattr(self, f"block{i + 1}")(x)
        return x


def vgg_top(
    in_channels: int, depths: tuple[int, ...], repetitions: tuple[int, ...]
) -> tuple[nn.Sequential, int]:
    """The `512x1` top of Shen et al.: per block, reps x Conv-BN-ReLU then a 2x2/2 pool."""
    blocks = []
    channels = in_channels
    for depth, reps in zip(depths, repetitions, strict=True):
        blocks.append(VGGBlock(channels, depth, reps, with_bn=True))
        channels = depth
    return nn.Sequential(*blocks), channels
