"""The all-convolutional whole-image classifier of Shen et al. (Sci Rep 2019).

A patch-classifier trunk (ResNet50 or VGG16), residual or VGG top blocks, then global average
pooling → Dense(2) → softmax; class 1 is cancer. One architecture config dict builds the
published models, site fine-tunes and the small demo model through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import STEM_PADDINGS, ResNetTrunk, residual_top
from .vgg import VGGTrunk, vgg_top

KINDS = ("resnet", "vgg")


class ArchitectureError(ValueError):
    """An architecture config that cannot be built; the message names the key."""


@dataclass(frozen=True)
class TrunkConfig:
    kind: str
    """"resnet" (bottleneck stages) or "vgg" (plain conv blocks)."""
    widths: tuple[int, ...]
    """resnet: bottleneck width per stage; vgg: conv width per block."""
    blocks: tuple[int, ...]
    """resnet: units per stage; vgg: convs per block."""
    expansion: int = 4
    """resnet only: stage output channels = width x expansion."""
    stem_width: int = 64
    """resnet only."""
    stem_padding: str = "zeropad"
    """resnet only: "zeropad" (ZeroPadding2D(3) + 'valid' conv) or "same" (TF 'SAME')."""


@dataclass(frozen=True)
class TopConfig:
    kind: str
    """"resnet" (`[d-d-d*enlarge]xr` residual blocks) or "vgg" (`dxr` Conv-BN-ReLU blocks)."""
    depths: tuple[int, ...]
    repetitions: tuple[int, ...]
    enlarge: int = 2
    """resnet only: bottleneck enlarge factor."""


@dataclass(frozen=True)
class ArchitectureConfig:
    trunk: TrunkConfig
    top: TopConfig
    input_shape: tuple[int, int] = (1152, 896)
    """(rows, cols) the model was trained at; preprocessing resizes to it."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureConfig:
        _only_keys(data, {"trunk", "top", "input_shape"}, "architecture")
        trunk, top = _section(data, "trunk"), _section(data, "top")
        trunk_kind, top_kind = _kind(trunk, "trunk"), _kind(top, "top")
        trunk_keys = {"kind", "widths", "blocks"}
        if trunk_kind == "resnet":
            trunk_keys |= {"expansion", "stem_width", "stem_padding"}
        top_keys = {"kind", "depths", "repetitions"}
        if top_kind == "resnet":
            top_keys.add("enlarge")
        _only_keys(trunk, trunk_keys, f"{trunk_kind} trunk")
        _only_keys(top, top_keys, f"{top_kind} top")
        config = cls(
            trunk=TrunkConfig(
                kind=trunk_kind,
                widths=_ints(trunk, "widths", "trunk"),
                blocks=_ints(trunk, "blocks", "trunk"),
                expansion=int(trunk.get("expansion", 4)),
                stem_width=int(trunk.get("stem_width", 64)),
                stem_padding=str(trunk.get("stem_padding", "zeropad")),
            ),
            top=TopConfig(
                kind=top_kind,
                depths=_ints(top, "depths", "top"),
                repetitions=_ints(top, "repetitions", "top"),
                enlarge=int(top.get("enlarge", 2)),
            ),
            input_shape=_ints(data, "input_shape", "architecture", default=(1152, 896)),
        )
        config.validate()
        return config

    def validate(self) -> None:
        t, p = self.trunk, self.top
        for where, kind in (("trunk", t.kind), ("top", p.kind)):
            if kind not in KINDS:
                raise ArchitectureError(f"{where}.kind must be one of {KINDS}, got {kind!r}")
        if len(t.widths) != len(t.blocks) or not t.widths:
            raise ArchitectureError("trunk.widths and trunk.blocks need the same, non-zero length")
        if len(p.depths) != len(p.repetitions) or not p.depths:
            raise ArchitectureError("top.depths and top.repetitions need the same, non-zero length")
        if t.stem_padding not in STEM_PADDINGS:
            raise ArchitectureError(
                f"trunk.stem_padding must be one of {STEM_PADDINGS}, got {t.stem_padding!r}"
            )
        if len(self.input_shape) != 2:
            raise ArchitectureError("input_shape must be [rows, cols]")
        numbers = (
            *t.widths,
            *t.blocks,
            t.expansion,
            t.stem_width,
            *p.depths,
            *p.repetitions,
            p.enlarge,
            *self.input_shape,
        )
        if min(numbers) < 1:
            raise ArchitectureError("architecture sizes and counts must be positive integers")

    def to_dict(self) -> dict[str, Any]:
        trunk: dict[str, Any] = {
            "kind": self.trunk.kind,
            "widths": list(self.trunk.widths),
            "blocks": list(self.trunk.blocks),
        }
        if self.trunk.kind == "resnet":
            trunk |= {
                "expansion": self.trunk.expansion,
                "stem_width": self.trunk.stem_width,
                "stem_padding": self.trunk.stem_padding,
            }
        top: dict[str, Any] = {
            "kind": self.top.kind,
            "depths": list(self.top.depths),
            "repetitions": list(self.top.repetitions),
        }
        if self.top.kind == "resnet":
            top["enlarge"] = self.top.enlarge
        return {"trunk": trunk, "top": top, "input_shape": list(self.input_shape)}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ArchitectureError(f"architecture.{key} must be a mapping, got {value!r}")
    return value


def _kind(section: dict[str, Any], where: str) -> str:
    kind = section.get("kind")
    if kind not in KINDS:
        raise ArchitectureError(f"{where}.kind must be one of {KINDS}, got {kind!r}")
    return kind


def _only_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ArchitectureError(
            f"unknown keys {unknown} in the {where} config; allowed: {sorted(allowed)}"
        )


def _ints(
    data: dict[str, Any], key: str, where: str, default: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    value = data.get(key, default)
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ArchitectureError(
            f"{where}.{key} must be a list of integers, got {value!r}"
        ) from None


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
        config.validate()
        self.config = config
        t, p = config.trunk, config.top
        if t.kind == "resnet":
            self.trunk: nn.Module = ResNetTrunk(
                t.widths, t.blocks, t.expansion, t.stem_width, t.stem_padding
            )
        else:
            self.trunk = VGGTrunk(t.widths, t.blocks)
        if p.kind == "resnet":
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
