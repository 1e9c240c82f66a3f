"""The all-convolutional whole-image classifier of Shen et al. (Sci Rep 2019).

A patch-classifier trunk (ResNet50 or VGG16), residual or VGG top blocks, then global average
pooling → Dense(2) → softmax; class 1 is cancer. One architecture config dict builds the
published models, site fine-tunes and the small demo model through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..config import Positive, PositivePair, Sizes, StrictConfig
from .resnet import ResNetTrunk, residual_top
from .vgg import VGGTrunk, vgg_top


class ArchitectureError(ValueError):
    """An architecture config that cannot be built; the message names the key."""


class _Section(StrictConfig):
    subject: ClassVar[str] = "all-conv architecture"
    error: ClassVar[type[ValueError]] = ArchitectureError


class ResNetTrunkConfig(_Section):
    """ResNet50-style patch trunk: a 7x7/2 stem, a 3x3/2 max pool, bottleneck stages."""

    kind: Literal["resnet"]
    widths: Sizes
    """Bottleneck width per stage."""
    blocks: Sizes
    """Units per stage."""
    expansion: Positive = 4
    """Stage output channels = width x expansion."""
    stem_width: Positive = 64
    stem_padding: Literal["zeropad", "same"] = "zeropad"
    """"zeropad" (ZeroPadding2D(3) + 'valid' conv) or "same" (TF 'SAME')."""

    @model_validator(mode="after")
    def _one_width_per_stage(self) -> Self:
        return _paired(self, "widths", "blocks")


class VGGTrunkConfig(_Section):
    """VGG16-style patch trunk: blocks of 3x3 convs with ReLU, each closed by a 2x2 max pool."""

    kind: Literal["vgg"]
    widths: Sizes
    """Conv width per block."""
    blocks: Sizes
    """Convs per block."""

    @model_validator(mode="after")
    def _one_width_per_block(self) -> Self:
        return _paired(self, "widths", "blocks")


class ResidualTopConfig(_Section):
    """`[d-d-d*enlarge]xr` residual top blocks (Shen et al.'s `_residual_block`)."""

    kind: Literal["resnet"]
    depths: Sizes
    repetitions: Sizes
    enlarge: Positive = 2
    """Bottleneck enlarge factor."""

    @model_validator(mode="after")
    def _one_depth_per_block(self) -> Self:
        return _paired(self, "depths", "repetitions")


class VGGTopConfig(_Section):
    """`dxr` top blocks: r Conv-BN-ReLU of depth d, then a 2x2 max pool."""

    kind: Literal["vgg"]
    depths: Sizes
    repetitions: Sizes

    @model_validator(mode="after")
    def _one_depth_per_block(self) -> Self:
        return _paired(self, "depths", "repetitions")


TrunkConfig = Annotated[ResNetTrunkConfig | VGGTrunkConfig, Field(discriminator="kind")]
TopConfig = Annotated[ResidualTopConfig | VGGTopConfig, Field(discriminator="kind")]


def _paired(config: _Section, a: str, b: str) -> _Section:
    if len(getattr(config, a)) != len(getattr(config, b)):
        raise ValueError(f"{a} and {b} need the same length")
    return config


class ArchitectureConfig(_Section):
    """Trunk → top blocks → GAP → dense(2); `to_dict()` is what a model card stores."""

    trunk: TrunkConfig
    top: TopConfig
    input_shape: PositivePair = (1152, 896)
    """(rows, cols) the model was trained at; preprocessing resizes to it."""


_RESNET50 = {
    "kind": "resnet",
    "widths": [64, 128, 256, 512],
    "blocks": [3, 4, 6, 3],
    "expansion": 4,
    "stem_width": 64,
    "stem_padding": "zeropad",
}
_VGG16 = {"kind": "vgg", "widths": [64, 128, 256, 512, 512], "blocks": [2, 2, 3, 3, 3]}
_RESIDUAL_TOP = {"kind": "resnet", "depths": [512, 512], "repetitions": [2, 2], "enlarge": 2}

PRESETS: dict[str, dict[str, Any]] = {
    # ddsm_resnet50_s10_[512-512-1024]x2.h5 (and the reference case)
    "resnet50": {"trunk": _RESNET50, "top": _RESIDUAL_TOP, "input_shape": [1152, 896]},
    # ddsm_vgg16_s10_512x1.h5, inbreast_vgg16_512x1.h5
    "vgg16": {
        "trunk": _VGG16,
        "top": {"kind": "vgg", "depths": [512, 512], "repetitions": [1, 1]},
        "input_shape": [1152, 896],
    },
    # ddsm_vgg16_s10_[512-512-1024]x2_hybrid.h5, inbreast_vgg16_[512-512-1024]x2_hybrid.h5
    "vgg16_hybrid": {"trunk": _VGG16, "top": _RESIDUAL_TOP, "input_shape": [1152, 896]},
    # Same code path as "resnet50" at 1/64 of the channels and 1/4 of the pixels: trains on a CPU.
    "demo": {
        "trunk": {
            "kind": "resnet",
            "widths": [8, 16, 32, 64],
            "blocks": [1, 1, 1, 1],
            "expansion": 4,
            "stem_width": 8,
            "stem_padding": "zeropad",
        },
        "top": {"kind": "resnet", "depths": [32, 32], "repetitions": [2, 2], "enlarge": 2},
        "input_shape": [576, 448],
    },
}


@dataclass(frozen=True)
class AllConvOutput:
    """One forward pass of `AllConvNet`."""

    probabilities: torch.Tensor
    """(N, 2) softmax; index 1 is cancer."""
    logits: torch.Tensor
    """(N, 2) the dense layer's output before the softmax."""
    cam: torch.Tensor
    """(N, 2, h, w) class activation map: the dense layer applied at every location of the
    last feature map, so its spatial mean equals `logits`. Its grid covers the whole input."""
    input_shape: tuple[int, int]
    """(H, W) of the input batch, to place map cells in input pixels."""


class AllConvNet(nn.Module):
    """Trunk → top blocks → global average pool → dense(2); see the module docstring."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        t, p = config.trunk, config.top
        if isinstance(t, ResNetTrunkConfig):
            self.trunk: nn.Module = ResNetTrunk(
                t.widths, t.blocks, t.expansion, t.stem_width, t.stem_padding
            )
        else:
            self.trunk = VGGTrunk(t.widths, t.blocks)
        if isinstance(p, ResidualTopConfig):
            self.top, channels = residual_top(
                self.trunk.out_channels, p.depths, p.repetitions, p.enlarge
            )
        else:
            self.top, channels = vgg_top(self.trunk.out_channels, p.depths, p.repetitions)
        self.fc = nn.Linear(channels, 2)
        self._init_weights()

    def _init_weights(self) -> None:
        # Keras' he_normal for convs and dense (what add_top_layers uses), zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed input → the last feature map, before pooling."""
        return self.top(self.trunk(x))

    def forward(self, x: torch.Tensor) -> AllConvOutput:
        f = self.features(x)
        logits = self.fc(f.mean(dim=(2, 3)))
        cam = F.conv2d(f, self.fc.weight[:, :, None, None], self.fc.bias)
        return AllConvOutput(
            probabilities=logits.softmax(dim=1),
            logits=logits,
            cam=cam,
            input_shape=(int(x.shape[-2]), int(x.shape[-1])),
        )


def build(architecture: dict[str, Any]) -> AllConvNet:
    """A freshly initialised network for an architecture dict (e.g. a `PRESETS` entry)."""
    return AllConvNet(ArchitectureConfig.from_dict(architecture))
