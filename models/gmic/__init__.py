"""GMIC: the globally-aware multiple instance classifier, its preprocessing and its importer.

Registers the "gmic" model family, so model files with `family: gmic` load through
`models.load_model` and run in the ensemble.
"""

from __future__ import annotations

from typing import Any

import torch

from ..family import Prepared, ScoreMaps, register_family
from ..mammogram import Mammogram
from .checkpoint import CheckpointError, import_checkpoint
from .network import GMIC, PRESETS, GMICConfig, GMICOutput
from .preprocess import PreprocessSpec, default_spec, extract_window, preprocess


class GMICFamily:
    name = "gmic"
    # The preprocessing mirrors every breast to face the same way (`needs_flip`), so a
    # horizontal flip would show the model a breast it is never trained or run on.
    test_time_flips = ("none", "vflip")

    def build(self, architecture: dict[str, Any]) -> GMIC:
        return GMIC(architecture)

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

    def score_maps(self, output: GMICOutput) -> ScoreMaps:
        if output.y_fusion.shape[1] != 2:
            raise ValueError(
                f"GMIC score maps need 2 classes (benign, malignant), got "
                f"{output.y_fusion.shape[1]}"
            )
        crop_h, crop_w = output.crop_shape
        top_left = output.roi_positions.to(torch.float32)
        boxes = torch.cat([top_left, top_left + top_left.new_tensor([crop_h, crop_w])], dim=-1)
        return ScoreMaps(
            malignant=output.y_fusion[:, 1],
            benign=output.y_fusion[:, 0],
            maps=output.saliency,
            boxes=boxes,
            box_weights=output.attention,
        )


FAMILY = register_family(GMICFamily())

__all__ = [
    "FAMILY",
    "CheckpointError",
    "GMIC",
    "PRESETS",
    "GMICConfig",
    "GMICFamily",
    "GMICOutput",
    "PreprocessSpec",
    "default_spec",
    "extract_window",
    "import_checkpoint",
    "preprocess",
]
