"""Multi-instance pooling: per-glimpse class probabilities (N, J, C) → per-image (N, C).

The three operators of the GlimpseNet paper, written exactly as printed there
(`reference/glimpsenet/ARCHITECTURE.md` §5). Each class is its own Bernoulli, so every class is
pooled on its own; the principle is that one strongly malignant glimpse makes the image
malignant. Pure functions of their inputs, differentiable, any float dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

POOLINGS = ("lse", "noisy_and", "topk")


def _check(p: torch.Tensor) -> None:
    if p.dim() != 3 or p.shape[1] < 1:
        raise ValueError(
            f"MIL pooling needs (N, J, C) probabilities with J >= 1, got {tuple(p.shape)}"
        )


def lse_pool(p: torch.Tensor, r: float = 5.0) -> torch.Tensor:
    """Log-sum-exp, a smooth max: P_i = (1/r) · log((1/|J|) · Σ_j exp(r · p_ij)).

    r → ∞ tends to the max over instances, r → 0 to their mean; the paper's best is r = 5.
    Computed with `logsumexp`, so large r does not overflow.
    """
    _check(p)
    if not r > 0:
        raise ValueError(f"LSE pooling needs r > 0, got {r}")
    return (torch.logsumexp(r * p, dim=1) - math.log(p.shape[1])) / r


def noisy_and_pool(p: torch.Tensor, a: float = 10.0, b: float = 0.2) -> torch.Tensor:
    """Noisy-AND: P_i = (σ(a(p̄_i − b)) − σ(−ab)) / (σ(a(1 − b)) − σ(−ab)), p̄_i = mean_j p_ij.

    Scaled so that p̄ = 0 gives 0 and p̄ = 1 gives 1; `b` is the mean activation at which the
    bag turns positive, `a` how sharply.
    """
    _check(p)
    if not a > 0:
        raise ValueError(f"Noisy-AND pooling needs a > 0, got {a}")
    mean = p.mean(dim=1)
    low = torch.sigmoid(torch.tensor(-a * b, dtype=mean.dtype, device=mean.device))
    high = torch.sigmoid(torch.tensor(a * (1.0 - b), dtype=mean.dtype, device=mean.device))
    return (torch.sigmoid(a * (mean - b)) - low) / (high - low)


def topk_pool(p: torch.Tensor, k: int = 3, by: int = 2) -> torch.Tensor:
    """Top-k: the mean, for every class, of the k instances most activated in class `by`
    (MALIGNANT, index 2, in the paper's class order); the same k instances for every class.
    Ties keep the lower instance index, so the choice is deterministic."""
    _check(p)
    n, j, c = p.shape
    if not 1 <= k <= j:
        raise ValueError(f"top-k pooling needs 1 <= k <= {j} instances, got k={k}")
    if not 0 <= by < c:
        raise ValueError(f"top-k pooling: class index by={by} is outside 0..{c - 1}")
    # A stable sort on the score (not topk) keeps ties in instance order on every device.
    order = torch.sort(p[:, :, by].float(), dim=1, descending=True, stable=True).indices[:, :k]
    chosen = torch.gather(p, 1, order[:, :, None].expand(n, k, c))
    return chosen.mean(dim=1)


def pool(p: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Pool with a card's `pooling` spec, e.g. {"kind": "lse", "r": 5.0}."""
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "lse":
        return lse_pool(p, **args)
    if kind == "noisy_and":
        return noisy_and_pool(p, **args)
    if kind == "topk":
        return topk_pool(p, **args)
    raise ValueError(f"unknown MIL pooling {kind!r}; known: {', '.join(POOLINGS)}")
