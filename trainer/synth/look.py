"""Detector looks: how one vendor's acquisition and image processing render the same breast.

For Presentation mammograms differ between systems far more than the anatomy does: each
vendor applies its own tone curve, contrast and edge enhancement, and detectors differ in
noise. A model trained on one look loses accuracy on another, which is why a site fine-tunes.
`trainer synth --look` renders the same synthetic anatomy through a named look, so the
fine-tuning workflow can be exercised on a realistic shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class DetectorLook:
    """A processing chain applied to the breast (the background stays as rendered)."""

    name: str
    description: str
    gamma: float = 1.0
    """Tone curve on [0, 1] intensities: values ** gamma (> 1 darkens fat, keeps dense tissue)."""
    contrast: float = 1.0
    """Scale about the breast's median intensity after the tone curve."""
    unsharp_amount: float = 0.0
    """Edge enhancement: adds amount × (image − blurred image)."""
    unsharp_sigma_mm: float = 2.0
    noise: float = 0.0
    """Extra detector noise (standard deviation, in [0, 1] intensity units)."""

    @property
    def is_identity(self) -> bool:
        return (
            self.gamma == 1.0
            and self.contrast == 1.0
            and self.unsharp_amount == 0.0
            and self.noise == 0.0
        )

    def apply(
        self,
        intensity: np.ndarray,
        breast: np.ndarray,
        spacing_mm: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The rendered view as this detector shows it, float32 in [0, 1]."""
        if self.is_identity:
            return intensity
        out = np.power(intensity, np.float32(self.gamma), dtype=np.float32)
        if self.unsharp_amount:
            blurred = ndimage.gaussian_filter(out, self.unsharp_sigma_mm / spacing_mm)
            out = out + np.float32(self.unsharp_amount) * (out - blurred)
        if self.contrast != 1.0:
            median = np.float32(np.median(out[breast])) if breast.any() else np.float32(0)
            out = median + np.float32(self.contrast) * (out - median)
        if self.noise:
            out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(self.noise)
        out = np.where(breast, out, intensity)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


LOOKS: dict[str, DetectorLook] = {
    look.name: look
    for look in (
        DetectorLook("standard", "the look the shipped demo models were trained on"),
        DetectorLook(
            "vendor-b",
            "another vendor's processing: a harder tone curve, strong edge enhancement and a "
            "noisier detector",
            gamma=1.8,
            contrast=1.3,
            unsharp_amount=1.5,
            unsharp_sigma_mm=3.0,
            noise=0.01,
        ),
    )
}


def get_look(name: str) -> DetectorLook:
    try:
        return LOOKS[name]
    except KeyError:
        raise ValueError(f"unknown detector look {name!r}; known: {', '.join(LOOKS)}") from None
