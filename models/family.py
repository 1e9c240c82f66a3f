"""What every model family (GMIC, all-conv, …) provides, so that model files, the ensemble and
the trainer handle all of them through one code path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .geometry import Geometry
from .mammogram import Mammogram


@dataclass(frozen=True)
class Prepared:
    """One image ready for a model: `tensor` is (C, H, W) float32 on the input grid."""

    tensor: torch.Tensor
    geometry: Geometry


@dataclass(frozen=True)
class ScoreMaps:
    """A family's output in the shape the ensemble needs; everything on the input grid.

    `malignant`/`benign` are (N,) probabilities; `benign` is None for families without a
    benign class. `maps` is (N, 2, h, w) covering the whole input: channel 0 benign, channel 1
    malignant (without a benign class, channel 0 repeats channel 1). `boxes` is (N, K, 4) as
    (top, left, bottom, right) input pixels with `box_weights` (N, K), or both are None.
    """

    malignant: torch.Tensor
    benign: torch.Tensor | None
    maps: torch.Tensor
    boxes: torch.Tensor | None = None
    box_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.malignant.shape[0]
        if self.maps.dim() != 4 or self.maps.shape[:2] != (n, 2):
            raise ValueError(f"ScoreMaps.maps must be ({n}, 2, h, w), got {tuple(self.maps.shape)}")
        if (self.boxes is None) != (self.box_weights is None):
            raise ValueError("ScoreMaps.boxes and box_weights come together or not at all")
        if self.boxes is not None and (
            self.boxes.shape[0] != n
            or self.boxes.shape[2:] != (4,)
            or self.box_weights.shape != self.boxes.shape[:2]
        ):
            raise ValueError(
                f"ScoreMaps.boxes must be ({n}, K, 4) with box_weights ({n}, K), got "
                f"{tuple(self.boxes.shape)} and {tuple(self.box_weights.shape)}"
            )

    @property
    def has_benign(self) -> bool:
        return self.benign is not None


class ModelFamily(Protocol):
    """One kind of network: how to build it from a card's architecture, prepare an image for it
    and read its output. Families register themselves with `register_family`."""

    name: str
    test_time_flips: tuple[str, ...]
    """The flips (of "none", "hflip", "vflip", "hvflip") whose images look like those the
    family's preprocessing gives its models. A family that turns every breast to face one way
    (GMIC) leaves out the horizontal ones: a mirrored breast is one its models never see."""

    def build(self, architecture: dict[str, Any]) -> nn.Module:
        """A module with freshly initialised weights for this architecture config."""

    def default_preprocessing(self, architecture: dict[str, Any]) -> dict[str, Any]:
        """The preprocessing spec of the published models of this family."""

    def check_preprocessing(self, spec: dict[str, Any]) -> None:
        """Refuse a card's preprocessing spec with a `ValueError` naming the field, before
        any image meets it."""

    def preprocess(self, image: Mammogram, spec: dict[str, Any]) -> Prepared:
        """Source image → model input and the `Geometry` that maps it back."""

    def score_maps(self, output: Any) -> ScoreMaps:
        """The module's typed forward result → `ScoreMaps`."""


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` available to `get_family` (and so to model files) under its name."""
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The registered family `name`; a `ValueError` lists the known ones."""
    _load_builtin_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def _load_builtin_families() -> None:
    # Imported lazily: the family packages import this module to register themselves.
    from . import allconv, glimpsenet, gmic  # noqa: F401
