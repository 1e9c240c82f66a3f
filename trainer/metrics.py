"""Discrimination and calibration figures for binary malignancy scores.

Plain numpy, so evaluation needs no extra packages: AUC as the Mann–Whitney statistic (ties
count one half), a percentile bootstrap for its 95% interval, the ROC curve, sensitivity and
specificity at thresholds, the threshold for a target sensitivity or specificity, and a binned
calibration table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

DEFAULT_N_BOOT = 2000
BOOTSTRAP_SEED = 0
"""`trainer finetune` and `trainer evaluate` draw the same resamples, so the same model on the
same split reports the same interval in both (and in the model card)."""


class MetricError(ValueError):
    """Labels or scores that a metric cannot be computed on."""


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise MetricError(f"{labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise MetricError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise MetricError("scores contain NaN or infinity")
    return labels, scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(
            f"AUC needs both classes; got {n_pos} positive and {n_neg} negative cases"
        )
    return _mann_whitney_auc(labels, scores)


def _mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC from mid-ranks (ties count one half); both classes must be present."""
    n_pos = int(labels.sum())
    ranks = rankdata(scores)
    return float(
        (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (labels.size - n_pos))
    )


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) case indices drawn with replacement; shared by the CI and its tests."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_auc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling cases; resamples that miss a
    class are dropped (they have no AUC)."""
    labels, scores = _check(labels, scores)
    roc_auc(labels, scores)  # raises the specific error for a one-class sample
    aucs = []
    for idx in bootstrap_indices(labels.size, n_boot, seed):
        y = labels[idx]
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            continue
        aucs.append(_mann_whitney_auc(y, scores[idx]))
    if not aucs:
        raise MetricError(
            f"no bootstrap resample of {labels.size} cases held both classes; add cases or "
            "raise n_boot"
        )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(aucs), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_roc_band(
    labels: np.ndarray,
    scores: np.ndarray,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = BOOTSTRAP_SEED,
    points: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr grid, lower, upper) pointwise 95% band of the ROC curve's sensitivity, from the
    same resamples as `bootstrap_auc_ci`."""
    labels, scores = _check(labels, scores)
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for idx in bootstrap_indices(labels.size, n_boot, seed):
        y = labels[idx]
        if y.sum() == 0 or y.sum() == y.size:
            continue
        fpr, tpr, _ = roc_curve(y, scores[idx])
        curves.append(np.interp(grid, fpr, tpr))
    if not curves:
        return grid, np.zeros(points), np.ones(points)
    lo, hi = np.quantile(np.stack(curves), [0.025, 0.975], axis=0)
    return grid, lo, hi


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) to (1, 1); a case is
    called positive when its score >= threshold."""
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return fpr, tpr, thresholds


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float
    positives: int
    """Cases called positive at this threshold."""


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> OperatingPoint:
    labels, scores = _check(labels, scores)
    called = scores >= threshold
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    sens = float((called & (labels == 1)).sum() / n_pos) if n_pos else float("nan")
    spec = float((~called & (labels == 0)).sum() / n_neg) if n_neg else float("nan")
    return OperatingPoint(float(threshold), sens, spec, int(called.sum()))


def sens_spec_table(
    labels: np.ndarray, scores: np.ndarray, thresholds: list[float] | np.ndarray
) -> list[OperatingPoint]:
    return [at_threshold(labels, scores, t) for t in thresholds]


def _require_class(labels: np.ndarray, label: int, measure: str) -> None:
    if not (np.asarray(labels).ravel() == label).any():
        kind = "malignant" if label else "non-malignant"
        raise MetricError(f"{measure} needs at least one {kind} case; there are none")


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target` (so specificity is best)."""
    if not 0.0 < target <= 1.0:
        raise MetricError(f"target sensitivity must be in (0, 1], got {target}")
    _require_class(labels, 1, "sensitivity")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ok = np.nonzero(tpr >= target - 1e-12)[0]
    return float(thresholds[ok[0]])


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity still reaches `target` (so sensitivity is best)."""
    if not 0.0 < target <= 1.0:
        raise MetricError(f"target specificity must be in (0, 1], got {target}")
    _require_class(labels, 0, "specificity")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ok = np.nonzero(1.0 - fpr >= target - 1e-12)[0]
    return float(thresholds[ok[-1]])


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: int
    mean_score: float
    observed: float
    """Fraction of positive cases in the bin."""


def calibration_bins(
    labels: np.ndarray, scores: np.ndarray, n_bins: int = 10
) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1]; empty bins are left out."""
    labels, scores = _check(labels, scores)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            bins.append(
                CalibrationBin(
                    float(edges[b]),
                    float(edges[b + 1]),
                    int(mask.sum()),
                    float(scores[mask].mean()),
                    float(labels[mask].mean()),
                )
            )
    return bins


def expected_calibration_error(bins: list[CalibrationBin]) -> float:
    total = sum(b.count for b in bins)
    return float(sum(b.count * abs(b.mean_score - b.observed) for b in bins) / total)
