"""GlimpseNet's two training objectives, as pure functions.

* FCGN: regression of the lesion mask with a pixel-wise squared error in which reference
  lesion pixels weigh λ (= 100 in the paper). The paper prints
  `1/(n·m) · Σ (Î − λ·I)²` (the target itself is scaled by λ) while its text says the point is to
  penalise missed lesion pixels heavily; both forms are here. Note that with Adam the printed
  form is a plain MSE on Î/λ (a constant factor on the loss does not change Adam's steps), so
  only the weighted form carries the stated intent; it is our default.
* Classifier + MIL: binary cross-entropy of each class's pooled probability (the classes are
  independent Bernoullis), with a per-class `known` flag so a label that is not given does not
  train anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FCGN_LOSSES = ("weighted", "printed")
PAPER_LAMBDA = 100.0


def fcgn_loss(
    raw: torch.Tensor, target: torch.Tensor, form: str = "weighted", lam: float = PAPER_LAMBDA
) -> torch.Tensor:
    """Mean over pixels of the λ-penalised squared error; `raw` and `target` (N, 1, h, w),
    target in [0, 1] (the fraction of each pixel that is lesion)."""
    raw, target = raw.float(), target.float()
    if form == "printed":
        return ((raw - lam * target) ** 2).mean()
    if form == "weighted":
        weight = 1.0 + (lam - 1.0) * target
        return (weight * (raw - target) ** 2).mean()
    raise ValueError(f"unknown FCGN loss {form!r}; known: {', '.join(FCGN_LOSSES)}")


def mil_loss(pooled: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known (image, class) pairs; (N, C) each."""
    p = pooled.float().clamp(1e-6, 1.0 - 1e-6)
    bce = F.binary_cross_entropy(p, targets.float(), reduction="none")
    return (bce * known).sum() / known.sum().clamp(min=1.0)
