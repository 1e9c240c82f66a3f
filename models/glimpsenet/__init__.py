"""GlimpseNet (Hang, Liu, Hannun, Stanford 2017) as a model family: an FCGN lesion mask picks
glimpses, Inception V3 classifies each, and multi-instance pooling scores the image.

Registers the "glimpsenet" family. For the ensemble: p(malignant) is the MALIGNANT class;
p(benign) combines BENIGN_WITHOUT_CALLBACK and BENIGN as a noisy-OR, 1 − (1 − p_BWC)(1 − p_B),
since the classes are independent Bernoullis (the plain sum can exceed 1; ours). Both map
channels are the FCGN's lesion confidence: it has one output, trained on all lesion masks (the
paper) or on the malignant ones only (the demo; the card's training stages say which); the
ROIs are the glimpses, weighted by each glimpse's malignancy probability.
"""

from __future__ import annotations

from typing import Any

from ..family import Prepared, ScoreMaps, register_family
from ..mammogram import Mammogram
from . import mil
from .inception import InceptionImportError, InceptionV3, import_imagenet_state_dict
from .network import (
    CLASSES,
    MALIGNANT,
    PRESETS,
    GlimpseNet,
    GlimpseNetConfig,
    GlimpseNetOutput,
)
from .preprocess import PreprocessSpec, default_spec, preprocess

__all__ = [
    "CLASSES",
    "FAMILY",
    "MALIGNANT",
    "PRESETS",
    "GlimpseNet",
    "GlimpseNetConfig",
    "GlimpseNetFamily",
    "GlimpseNetOutput",
    "InceptionImportError",
    "InceptionV3",
    "PreprocessSpec",
    "default_spec",
    "import_imagenet_state_dict",
    "mil",
    "preprocess",
]


class GlimpseNetFamily:
    name = "glimpsenet"
    test_time_flips = ("none", "hflip", "vflip", "hvflip")

    def build(self, architecture: dict[str, Any]) -> GlimpseNet:
        return GlimpseNet(architecture)

    def default_preprocessing(self, architecture: dict[str, Any]) -> dict[str, Any]:
        return default_spec(architecture)

    def check_preprocessing(self, spec: dict[str, Any]) -> None:
        PreprocessSpec.from_dict(spec)

    def preprocess(self, image: Mammogram, spec: dict[str, Any]) -> Prepared:
        return preprocess(image, spec)

    def score_maps(self, output: GlimpseNetOutput) -> ScoreMaps:
        p = output.probabilities.float()
        benign = 1.0 - (1.0 - p[:, 0]) * (1.0 - p[:, 1])
        return ScoreMaps(
            malignant=p[:, MALIGNANT],
            benign=benign,
            maps=output.mask.expand(-1, 2, -1, -1),
            boxes=output.boxes.float(),
            box_weights=output.glimpse_probabilities[:, :, MALIGNANT].float(),
        )


FAMILY = register_family(GlimpseNetFamily())
