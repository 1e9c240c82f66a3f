"""The all-convolutional whole-image classifier (Shen et al., Sci Rep 2019) as a model family.

Saliency is the class activation map turned into a per-location cancer probability (softmax
over the two class channels at each location of the last feature map). ROI: one box, the CAM
cell with the highest cancer probability, weighted by that probability; at 1152x896 a cell is
128x128 input pixels, so it marks where to look rather than outlining a lesion.
"""

from __future__ import annotations

from typing import Any

import torch

from ..family import Prepared, ScoreMaps, register_family
from ..mammogram import Mammogram
from .network import (
    PRESETS,
    AllConvNet,
    AllConvOutput,
    ArchitectureConfig,
    ArchitectureError,
    ResidualTopConfig,
    ResNetTrunkConfig,
    TopConfig,
    TrunkConfig,
    VGGTopConfig,
    VGGTrunkConfig,
    build,
)
from .preprocess import DDSM_MEAN, INBREAST_MEAN, PreprocessSpec, default_spec, preprocess

__all__ = [
    "DDSM_MEAN",
    "FAMILY",
    "INBREAST_MEAN",
    "PRESETS",
    "AllConvFamily",
    "AllConvNet",
    "AllConvOutput",
    "ArchitectureConfig",
    "ArchitectureError",
    "PreprocessSpec",
    "ResNetTrunkConfig",
    "ResidualTopConfig",
    "TopConfig",
    "TrunkConfig",
    "VGGTopConfig",
    "VGGTrunkConfig",
    "build",
    "cancer_map",
    "default_spec",
    "peak_box",
    "preprocess",
]


def cancer_map(output: AllConvOutput) -> torch.Tensor:
    """(N, h, w) cancer probability per location of the last feature map, in [0, 1]; float32
    whatever the autocast precision."""
    return output.cam.float().softmax(dim=1)[:, 1]


def peak_box(
    prob_map: torch.Tensor, input_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 4) box of the highest-probability map cell, as (top, left, bottom, right) input
    pixels, and its (N, 1) probability."""
    n, h, w = prob_map.shape
    value, index = prob_map.reshape(n, -1).max(dim=1)
    row, col = (index // w).float(), (index % w).float()
    cell_h, cell_w = input_shape[0] / h, input_shape[1] / w
    boxes = torch.stack([row * cell_h, col * cell_w, (row + 1) * cell_h, (col + 1) * cell_w], dim=1)
    return boxes[:, None, :], value[:, None]


class AllConvFamily:
    name = "allconv"
    test_time_flips = ("none", "hflip", "vflip", "hvflip")

    def build(self, architecture: dict[str, Any]) -> AllConvNet:
        return build(architecture)

    def default_preprocessing(self, architecture: dict[str, Any]) -> dict[str, Any]:
        return default_spec(architecture)

    def check_preprocessing(self, spec: dict[str, Any]) -> None:
        PreprocessSpec.from_dict(spec)

    def preprocess(self, image: Mammogram, spec: dict[str, Any]) -> Prepared:
        return preprocess(image, spec)

    def preprocess_on(
        self, image: Mammogram, spec: dict[str, Any], device: torch.device
    ) -> Prepared:
        """`preprocess` with the pixel work in torch on `device` (the ensemble's)."""
        return preprocess(image, spec, device)

    def score_maps(self, output: AllConvOutput) -> ScoreMaps:
        maps = cancer_map(output)
        boxes, weights = peak_box(maps, output.input_shape)
        return ScoreMaps(
            malignant=output.probabilities[:, 1],
            benign=None,
            maps=maps[:, None].expand(-1, 2, -1, -1),
            boxes=boxes,
            box_weights=weights,
        )


FAMILY = register_family(AllConvFamily())
