"""GMIC (Shen et al. 2021, "An interpretable classifier for high-resolution breast cancer
screening images..."), written in plain PyTorch from the reference description in
`reference/gmic/ARCHITECTURE.md`.

A global ResNet-22 (pre-activation blocks) turns the whole image into a low-resolution saliency
map per class; the top t% of each map gives `y_global`. The K most salient windows are cropped
from the input at full resolution, a local ResNet-18 describes each crop, gated attention pools
those descriptions into `y_local`, and a linear layer fuses the strongest global feature with the
attended crop feature into `y_fusion`, the model's prediction.

Module attribute names follow the public implementation exactly, so the published state dicts
(`sample_model_{1..5}.p`) load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import IntPair, Positive, Sizes, StrictConfig

PUBLISHED_INPUT_SHAPE = (2944, 1920)


# -- configuration ------------------------------------------------------------------------


class GMICConfig(StrictConfig):
    """Architecture of one GMIC model; `to_dict()` is what a model card stores.

    A card may also carry `cam_size` and `post_processing_dim` (the published parameter names);
    they follow from the layers and are checked against them, never taken from the card.
    """

    subject: ClassVar[str] = "GMIC architecture"
    derived_fields: ClassVar[tuple[str, ...]] = ("cam_size", "post_processing_dim")

    input_shape: IntPair
    K: Positive
    crop_shape: IntPair
    percent_t: Annotated[float, Field(gt=0.0, le=1.0)]
    num_classes: Positive = 2
    global_width: Positive = 16
    global_blocks: Sizes = (2, 2, 2, 2, 2)
    local_width: Positive = 64
    local_blocks: Sizes = (2, 2, 2, 2)
    attention_dim: Positive = 128

    @model_validator(mode="wrap")
    @classmethod
    def _derived_match(cls, data: Any, handler: Any) -> GMICConfig:
        derived = {}
        if isinstance(data, dict):
            data = dict(data)
            derived = {k: data.pop(k) for k in ("cam_size", "post_processing_dim") if k in data}
        config = handler(data)
        cam_size = derived.get("cam_size", list(config.cam_size))
        if not isinstance(cam_size, list | tuple) or list(cam_size) != list(config.cam_size):
            raise ValueError(
                f"cam_size {cam_size!r} does not match input_shape {list(config.input_shape)}, "
                f"which gives a {list(config.cam_size)} map"
            )
        post_dim = derived.get("post_processing_dim", config.post_processing_dim)
        if post_dim != config.post_processing_dim or isinstance(post_dim, bool):
            raise ValueError(
                f"post_processing_dim {post_dim!r} does not match the global network, whose "
                f"last layer has {config.post_processing_dim} channels "
                "(global_width × 2^(len(global_blocks) - 1))"
            )
        return config

    @field_validator("input_shape")
    @classmethod
    def _input_at_least_64(cls, shape: tuple[int, int]) -> tuple[int, int]:
        if min(shape) < 64:
            raise ValueError(f"must be (height, width), each at least 64, got {list(shape)}")
        return shape

    @field_validator("crop_shape")
    @classmethod
    def _crop_at_least_8(cls, shape: tuple[int, int]) -> tuple[int, int]:
        if min(shape) < 8:
            raise ValueError(f"must be (height, width), each at least 8, got {list(shape)}")
        return shape

    @model_validator(mode="after")
    def _fits_the_map(self) -> GMICConfig:
        h, w = self.cam_size
        if min(h, w) < 1:
            raise ValueError(f"input_shape {list(self.input_shape)} is too small")
        if self.top_t_count < 1:
            raise ValueError(
                f"percent_t {self.percent_t} keeps no position of the {h}x{w} saliency map; "
                "raise it"
            )
        wh, ww = self.roi_window
        if wh < 1 or ww < 1 or wh > h or ww > w:
            raise ValueError(
                f"crop_shape {list(self.crop_shape)} maps to a {wh}x{ww} window on the {h}x{w} "
                "saliency map; it must be between 1x1 and the map size"
            )
        return self

    @property
    def cam_size(self) -> tuple[int, int]:
        """Saliency map size, from the global network's layer arithmetic (2944x1920 → 46x30)."""
        return tuple(_global_out(n, len(self.global_blocks)) for n in self.input_shape)

    @property
    def post_processing_dim(self) -> int:
        return self.global_width * 2 ** (len(self.global_blocks) - 1)

    @property
    def local_dim(self) -> int:
        return self.local_width * 2 ** (len(self.local_blocks) - 1)

    @property
    def top_t_count(self) -> int:
        h, w = self.cam_size
        return int(round(h * w * self.percent_t))

    @property
    def roi_window(self) -> tuple[int, int]:
        """Crop size in saliency-map cells."""
        return tuple(
            int(round(c * m / i))
            for c, m, i in zip(self.crop_shape, self.cam_size, self.input_shape, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "cam_size": list(self.cam_size),
            "post_processing_dim": self.post_processing_dim,
        }


def _global_out(n: int, layers: int) -> int:
    n = (n + 2 * 3 - 7) // 2 + 1  # first_conv: 7x7, stride 2, padding 3
    n = (n - 3) // 2 + 1  # first_pool: 3x3, stride 2, no padding
    for _ in range(layers - 1):
        n = (n + 2 - 3) // 2 + 1  # first conv of each later layer: 3x3, stride 2, padding 1
    return n


PRESETS: dict[str, dict[str, Any]] = {
    # The published "GMIC-ResNet-18" sample models (nyukat/GMIC run_model.py).
    "published": GMICConfig(
        input_shape=PUBLISHED_INPUT_SHAPE, K=6, crop_shape=(256, 256), percent_t=0.02
    ).to_dict(),
    # Same structure at about a quarter of the resolution and narrower, to train on a CPU.
    "demo": GMICConfig(
        input_shape=(768, 512),
        K=4,
        crop_shape=(128, 128),
        percent_t=0.05,
        global_width=8,
        local_width=16,
        attention_dim=32,
    ).to_dict(),
}


# -- output ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GMICOutput:
    """One forward pass. Class order everywhere: 0 benign, 1 malignant.

    `y_fusion` is the prediction; `y_global` and `y_local` are the branch predictions the
    training loss also uses. `roi_positions` are the upper-left (row, col) corners of the K
    crops in input pixels, in selection order; `attention` their gated-attention weights.
    """

    y_global: torch.Tensor
    """(N, C) mean of the top t% of each saliency map."""
    y_local: torch.Tensor
    """(N, C) from the attention-pooled crop features."""
    y_fusion: torch.Tensor
    """(N, C) the model's prediction."""
    saliency: torch.Tensor
    """(N, C, h, w) sigmoid class maps covering the whole input."""
    roi_positions: torch.Tensor
    """(N, K, 2) int64."""
    attention: torch.Tensor
    """(N, K), sums to 1 per image."""
    crop_shape: tuple[int, int]
    """(rows, cols) of each crop, so a box is `roi_positions` + `crop_shape`."""


# -- global network: ResNet-22, pre-activation blocks ----------------------------------------


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlockV2(nn.Module):
    """Pre-activation block; the projection shortcut sees the pre-activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU and add on fresh BN/conv outputs: safe under autograd too, and what
        # keeps the forward as fast as the authors' code.
        a = F.relu(self.bn1(x), inplace=True)
        skip = x if self.downsample is None else self.downsample(a)
        out = self.conv1(a)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return out.add_(skip)


class GlobalNetwork(nn.Module):
    """ResNet-22 v2: 7x7 conv, max-pool (no BN/ReLU between), pre-activation layers whose
    first block always has a 1x1 projection (no BN), then BN + ReLU."""

    def __init__(self, width: int, blocks: Sequence[int]) -> None:
        super().__init__()
        self.first_conv = nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False)
        self.first_pool = nn.MaxPool2d(3, stride=2, padding=0)
        layers = []
        in_ch = width
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            stride = 1 if i == 0 else 2
            layer = [
                BasicBlockV2(in_ch, out_ch, stride, nn.Sequential(_conv1x1(in_ch, out_ch, stride)))
            ]
            layer += [BasicBlockV2(out_ch, out_ch, 1, None) for _ in range(n - 1)]
            layers.append(nn.Sequential(*layer))
            in_ch = out_ch
        self.layer_list = nn.ModuleList(layers)
        self.final_bn = nn.BatchNorm2d(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        # Inference on the CPU: the same maxima without ATen's NCHW max-pool kernel (it also
        # computes argmax indices), 0.24 s -> 0.14 s of a 1.9 s forward at 2944x1920 on one
        # core (bench/gmic_authors.py --profile). Training keeps max_pool2d's gradient.
        if x.device.type == "cpu" and not x.requires_grad:
            x = max_pool_3x3_stride_2(x)
        else:
            x = self.first_pool(x)
        for layer in self.layer_list:
            x = layer(x)
        return F.relu(self.final_bn(x), inplace=True)


def max_pool_3x3_stride_2(x: torch.Tensor) -> torch.Tensor:
    """`MaxPool2d(3, stride=2, padding=0)` as strided maxima, rows then columns: bit-identical
    (a maximum is exact; NaN propagates as in max_pool2d)."""
    x = torch.maximum(torch.maximum(x[..., 0:-2:2, :], x[..., 1:-1:2, :]), x[..., 2::2, :])
    return torch.maximum(torch.maximum(x[..., 0:-2:2], x[..., 1:-1:2]), x[..., 2::2])


class SaliencyHead(nn.Module):
    """1x1 conv to one map per class, no bias, then sigmoid."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.gn_conv_last = nn.Conv2d(in_ch, num_classes, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gn_conv_last(h))


# -- local network: ResNet-18, post-activation blocks ----------------------------------------


class BasicBlockV1(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN, plus a 1x1 conv + BN projection when the
    shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out.add_(skip), inplace=True)


class LocalNetwork(nn.Module):
    """torchvision-style ResNet-18 without avgpool/fc, on 3 identical channels."""

    def __init__(self, width: int, blocks: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = width
        self.layer_names = []
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            stride = 1 if i == 0 else 2
            layer = [BasicBlockV1(in_ch, out_ch, stride)]
            layer += [BasicBlockV1(out_ch, out_ch, 1) for _ in range(n - 1)]
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*layer))
            self.layer_names.append(name)
            in_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x


# -- GMIC ------------------------------------------------------------------------------------


class GMIC(nn.Module):
    """The whole model; see the module docstring. Takes (N, 1, H, W) standardised images at
    exactly `config.input_shape` and returns a `GMICOutput`."""

    def __init__(self, architecture: dict[str, Any] | GMICConfig) -> None:
        super().__init__()
        config = (
            architecture
            if isinstance(architecture, GMICConfig)
            else GMICConfig.from_dict(architecture)
        )
        self.config = config
        c = config
        self.ds_net = GlobalNetwork(c.global_width, c.global_blocks)
        self.left_postprocess_net = SaliencyHead(c.post_processing_dim, c.num_classes)
        self.dn_resnet = LocalNetwork(c.local_width, c.local_blocks)
        self.mil_attn_V = nn.Linear(c.local_dim, c.attention_dim, bias=False)
        self.mil_attn_U = nn.Linear(c.local_dim, c.attention_dim, bias=False)
        self.mil_attn_w = nn.Linear(c.attention_dim, 1, bias=False)
        self.classifier_linear = nn.Linear(c.local_dim, c.num_classes, bias=False)
        self.fusion_dnn = nn.Linear(c.post_processing_dim + c.local_dim, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> GMICOutput:
        c = self.config
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != c.input_shape:
            raise ValueError(
                f"GMIC expects input of shape (N, 1, {c.input_shape[0]}, {c.input_shape[1]}), "
                f"got {tuple(x.shape)}; preprocess images with this model's preprocessing spec"
            )
        # The global network's saliency decides which crops are taken and which positions make
        # y_global: it runs in fp32 under any autocast, so reduced precision never changes a
        # discrete choice (bf16 saliency picked other crops and moved scores by 6.5 points).
        # Only the local network and the heads run at the autocast precision.
        with torch.autocast(x.device.type, enabled=False):
            h_g = self.ds_net(x.float())
            saliency = self.left_postprocess_net(h_g)
            y_global = top_t_percent(saliency, c.top_t_count)

        with torch.no_grad():
            cells = retrieve_roi(saliency.detach(), c.roi_window, c.K)
            positions = cells_to_pixels(cells, c.cam_size, c.input_shape)
            crops = extract_crops(x, positions, c.crop_shape)

        n, k = positions.shape[:2]
        h_crops = self.dn_resnet(crops.reshape(n * k, 1, *c.crop_shape).expand(-1, 3, -1, -1))
        h_crops = h_crops.mean(dim=2).mean(dim=2).reshape(n, k, -1)

        gate = torch.sigmoid(self.mil_attn_U(h_crops)) * torch.tanh(self.mil_attn_V(h_crops))
        attention = torch.softmax(self.mil_attn_w(gate).squeeze(-1), dim=1)
        z = (attention.unsqueeze(-1) * h_crops).sum(dim=1)
        y_local = torch.sigmoid(self.classifier_linear(z))

        global_vec = h_g.max(dim=2).values.max(dim=2).values
        y_fusion = torch.sigmoid(self.fusion_dnn(torch.cat([global_vec, z], dim=1)))
        return GMICOutput(
            y_global=y_global,
            y_local=y_local,
            y_fusion=y_fusion,
            saliency=saliency,
            roi_positions=positions,
            attention=attention,
            crop_shape=c.crop_shape,
        )


def top_t_percent(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, h, w) → (N, C): the mean of each map's k largest values."""
    flat = saliency.flatten(start_dim=2)
    return flat.topk(k, dim=2).values.mean(dim=2)


def retrieve_roi(saliency: torch.Tensor, window: tuple[int, int], k: int) -> torch.Tensor:
    """Greedy ROI search on the saliency map → (N, K, 2) upper-left cells, int64.

    Each class map is min-max normalised on its own, the classes are summed, and K times the
    window with the largest mean is taken (first in row-major order on ties) and its cells are
    zeroed, so later windows may overlap earlier ones. A constant class map (where GMIC's
    normalisation divides by zero) contributes zeros.
    """
    n, _, h, w = saliency.shape
    lo = saliency.amin(dim=(2, 3), keepdim=True)
    span = saliency.amax(dim=(2, 3), keepdim=True) - lo
    normed = torch.where(
        span > 0, (saliency - lo) / span.clamp_min(1e-30), torch.zeros_like(saliency)
    )
    current = normed.sum(dim=1, keepdim=True)
    rows = torch.arange(h, device=saliency.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=saliency.device).view(1, 1, 1, w)
    wh, ww = window
    picks = []
    for _ in range(k):
        pooled = F.avg_pool2d(current, window, stride=1)
        idx = pooled.flatten(start_dim=1).argmax(dim=1)
        r, c = idx // pooled.shape[-1], idx % pooled.shape[-1]
        picks.append(torch.stack([r, c], dim=1))
        r, c = r.view(n, 1, 1, 1), c.view(n, 1, 1, 1)
        inside = (rows >= r) & (rows < r + wh) & (cols >= c) & (cols < c + ww)
        current = current * (~inside).to(current.dtype)
    return torch.stack(picks, dim=1)


def cells_to_pixels(
    cells: torch.Tensor, cam_size: tuple[int, int], input_shape: tuple[int, int]
) -> torch.Tensor:
    """Map cells → input pixels: round(cell / map_size * input_size), half to even."""
    scale = torch.tensor([input_shape[0], input_shape[1]], dtype=torch.float64, device=cells.device)
    size = torch.tensor(cam_size, dtype=torch.float64, device=cells.device)
    return torch.round(cells.double() / size * scale).long()


def extract_crops(
    x: torch.Tensor, positions: torch.Tensor, crop_shape: tuple[int, int]
) -> torch.Tensor:
    """(N, 1, H, W), (N, K, 2) upper-left corners → (N, K, ch, cw) crops of the same input.

    A window that leaves the image is clipped; the crop is filled with the image's minimum and
    the visible part goes to its bottom-right corner (GMIC's convention).
    """
    n, k = positions.shape[:2]
    height, width = x.shape[-2:]
    ch, cw = crop_shape
    crops = x.new_empty((n, k, ch, cw))
    for i, corners in enumerate(positions.tolist()):
        image = x[i, 0]
        fill = image.min()
        for j, (top, left) in enumerate(corners):
            t0, t1 = min(max(top, 0), height), min(max(top + ch, 0), height)
            l0, l1 = min(max(left, 0), width), min(max(left + cw, 0), width)
            if (t1 - t0, l1 - l0) != (ch, cw):
                crops[i, j] = fill
            crops[i, j, ch - (t1 - t0) :, cw - (l1 - l0) :] = image[t0:t1, l0:l1]
    return crops
