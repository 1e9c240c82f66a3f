"""Choosing an operating point and writing it into a model file's card.

The file is rewritten atomically (new file, then rename) with the same tensors and an updated
card: `operating_points["default"]` and, under `provenance["operating_points"]`, how it was
chosen (criterion, level, split, data fingerprint, achieved sensitivity and specificity).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.modelfile import read_card, update_card

from . import metrics


@dataclass(frozen=True)
class Criterion:
    kind: str
    """"sensitivity", "specificity" or "threshold"."""
    value: float

    @classmethod
    def parse(cls, text: str) -> Criterion:
        kind, sep, value = text.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in ("sensitivity", "specificity", "threshold"):
            raise ValueError(
                f"--set-operating-point {text!r}: use sensitivity=0.9, specificity=0.8 or "
                "threshold=0.35"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--set-operating-point {text!r}: {value!r} is not a number") from None
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"--set-operating-point {text!r}: the value must be in [0, 1]")
        return cls(kind, number)

    def threshold(self, labels: np.ndarray, scores: np.ndarray) -> float:
        if self.kind == "threshold":
            return self.value
        if self.kind == "sensitivity":
            return metrics.threshold_for_sensitivity(labels, scores, self.value)
        return metrics.threshold_for_specificity(labels, scores, self.value)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def write_operating_point(
    model_path: Path, threshold: float, details: dict, name: str = "default"
) -> None:
    """Store `threshold` as operating point `name` in the model file, atomically."""
    card = read_card(model_path)
    card.operating_points[name] = float(threshold)
    history = card.provenance.setdefault("operating_points", {})
    history[name] = {
        **details,
        "threshold": float(threshold),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    update_card(model_path, card)
