"""Inception V3 (Szegedy et al., CVPR 2016) in plain PyTorch, with torchvision's module and
parameter names, so that an ImageNet state dict a user holds imports by name.

`width` scales every convolution's channel count (1.0 is the published network); the demo
preset uses a narrow one that trains on a CPU. The auxiliary classifier is left out: GlimpseNet
reads the pooled features, and its own head replaces `fc`. Inputs must be at least 75×75.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_INPUT = 75


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as published), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, w) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), 1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool, 1)
        self.out_channels = w(64) + w(64) + w(96) + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, cin: int, w) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, w) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        return torch.cat(
            [
                self.branch1x1(x),
                b7,
                self.branch7x7dbl_5(d),
                self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1)),
            ],
            1,
        )


class InceptionD(nn.Module):
    def __init__(self, cin: int, w) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), 3, stride=2)
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1
        )


class InceptionE(nn.Module):
    def __init__(self, cin: int, w) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(320), 1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), 1)
        self.branch3x3_2a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """The feature extractor up to global average pooling; `features` is its width."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if not 0 < width <= 1:
            raise ValueError(f"Inception V3 width must be in (0, 1], got {width}")

        def w(c: int) -> int:
            return max(1, round(c * width))

        self.width = width
        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), 3)
        self.Mixed_5b = InceptionA(w(192), w(32), w)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, w(64), w)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, w(64), w)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, w)
        c = self.Mixed_6a.out_channels
        self.Mixed_6b = InceptionC(c, w(128), w)
        self.Mixed_6c = InceptionC(c, w(160), w)
        self.Mixed_6d = InceptionC(c, w(160), w)
        self.Mixed_6e = InceptionC(c, w(192), w)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, w)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, w)
        self.features = self.Mixed_7c.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H, W >= 75 → (B, features) after global average pooling."""
        if min(x.shape[-2:]) < MIN_INPUT:
            raise ValueError(f"Inception V3 needs inputs of at least {MIN_INPUT}x{MIN_INPUT}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in (
            "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
            "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
        ):  # fmt: skip
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class InceptionImportError(ValueError):
    """ImageNet weights that do not fit; the message says which file and what is wrong."""


def import_imagenet_state_dict(trunk: InceptionV3, path: str | Path) -> list[str]:
    """Load torchvision-named ImageNet Inception V3 weights (a state dict saved with
    `torch.save`) into `trunk`, read with `weights_only=True` so nothing is unpickled.

    Every trunk tensor must be present with its shape; the ImageNet classifier (`fc.*`) and the
    auxiliary classifier (`AuxLogits.*`) are not used. Returns the keys left unused, so the
    caller can report them.
    """
    if trunk.width != 1.0:
        raise InceptionImportError(
            f"ImageNet weights fit the full-width Inception V3 only; this one has width "
            f"{trunk.width}: use the glimpsenet.paper preset"
        )
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InceptionImportError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises several error types for unreadable files
        raise InceptionImportError(
            f"{path}: not a state dict torch can read with weights_only=True ({exc}); save "
            "the weights with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionImportError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InceptionImportError(
            f"{path}: not torchvision Inception V3 weights: {len(missing)} trunk tensors "
            f"missing, e.g. {missing[:3]}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InceptionImportError(
                f"{path}: tensor {k} has shape {tuple(state[k].shape)}, Inception V3 needs "
                f"{tuple(v.shape)}"
            )
    trunk.load_state_dict({k: state[k] for k in expected}, strict=True)
    return sorted(set(state) - set(expected))
