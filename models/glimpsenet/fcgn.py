"""FCGN, the fully convolutional glimpse network: an encoder–decoder that turns the
low-resolution image into a grey-level lesion mask.

As in the paper, every convolution and transposed convolution is followed by batch norm
(initialised scale 1, shift 0.01) and ReLU, and the encoder pools aggressively (2×2 max pooling
per level) down to a small code; the decoder unpools with the encoder's pooling indices and
deconvolves back to the input size. Depth, widths and kernel sizes are not in the paper: they
come from the card (`architecture["fcgn"]`). A last 1×1 convolution gives the raw regression
output, one channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_SHIFT = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.ones_(bn.weight)
    nn.init.constant_(bn.bias, BN_SHIFT)
    return bn


class FCGN(nn.Module):
    def __init__(self, widths: list[int], kernels: list[int], in_channels: int = 1) -> None:
        super().__init__()
        if not widths or len(widths) != len(kernels):
            raise ValueError(
                f"FCGN needs one kernel size per level: got widths {widths}, kernels {kernels}"
            )
        if min(widths) < 1 or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"FCGN widths must be >= 1 and kernels odd: {widths}, {kernels}")
        self.depth = len(widths)
        ins = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), _bn(o), nn.ReLU())
            for i, o, k in zip(ins, widths, kernels, strict=True)
        )
        outs = [widths[0], *widths[:-1]]  # level i decodes back to level i-1's width
        self.decoder = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(i, o, k, padding=k // 2, bias=False), _bn(o), nn.ReLU()
            )
            for i, o, k in zip(widths, outs, kernels, strict=True)
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, s, s) image, s divisible by 2**depth → (N, 1, s, s) raw mask."""
        if x.shape[-1] % (2**self.depth) or x.shape[-2] % (2**self.depth):
            raise ValueError(
                f"FCGN of depth {self.depth} needs sides divisible by {2**self.depth}, got "
                f"{tuple(x.shape[-2:])}"
            )
        indices = []
        for block in self.encoder:
            x, idx = F.max_pool2d(block(x), 2, return_indices=True)
            indices.append(idx)
        for block, idx in zip(reversed(self.decoder), reversed(indices), strict=True):
            x = block(F.max_unpool2d(x, idx, 2))
        return self.head(x)
