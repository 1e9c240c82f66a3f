"""trainer.metrics against direct computations from the definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trainer import metrics


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.fixture
def sample() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = (rng.random(120) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: plenty of ties
    return labels, scores


def test_auc_is_the_pairwise_win_rate_with_ties_as_half(sample):
    labels, scores = sample
    assert metrics.roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5


def test_auc_with_one_class_says_so():
    with pytest.raises(metrics.MetricError, match="both classes; got 0 positive"):
        metrics.roc_auc([0, 0, 0], [0.1, 0.2, 0.3])


@pytest.mark.slow  # about 30 s on 2 cores
def test_bootstrap_ci_matches_a_direct_resampling_loop(sample):
    labels, scores = sample
    lo, hi = metrics.bootstrap_auc_ci(labels, scores, n_boot=300, seed=5)
    aucs = []
    for idx in metrics.bootstrap_indices(labels.size, 300, 5):
        if 0 < labels[idx].sum() < labels.size:
            aucs.append(_pairwise_auc(labels[idx], scores[idx]))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])))
    assert lo < metrics.roc_auc(labels, scores) < hi


def test_bootstrap_ci_width_agrees_with_hanley_mcneil(sample):
    labels, scores = sample
    auc = metrics.roc_auc(labels, scores)
    n1, n0 = labels.sum(), (labels == 0).sum()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = np.sqrt(
        (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    )
    lo, hi = metrics.bootstrap_auc_ci(labels, scores, n_boot=2000, seed=0)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_roc_curve_runs_from_origin_to_one_and_integrates_to_the_auc(sample):
    labels, scores = sample
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores))


def test_threshold_for_sensitivity_is_the_highest_that_reaches_it(sample):
    labels, scores = sample
    t = metrics.threshold_for_sensitivity(labels, scores, 0.9)
    assert metrics.at_threshold(labels, scores, t).sensitivity >= 0.9
    higher = np.unique(scores[scores > t])
    if higher.size:
        assert metrics.at_threshold(labels, scores, higher[0]).sensitivity < 0.9
    s = metrics.threshold_for_specificity(labels, scores, 0.8)
    assert metrics.at_threshold(labels, scores, s).specificity >= 0.8


def test_calibration_bins_count_every_case_and_report_observed_rates():
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.05, 0.15, 0.95, 0.9, 0.55, 0.5])
    bins = metrics.calibration_bins(labels, scores, n_bins=10)
    assert sum(b.count for b in bins) == 6
    top = bins[-1]
    assert (top.lower, top.count, top.observed) == (0.9, 2, 1.0)
    # Per bin, count x |mean score - observed rate|: 0.05 and 0.15 (benign, alone in their
    # bins), 0.5 and 0.55 (one each: 2 x 0.025), 0.9 and 0.95 (malignant: 2 x 0.075).
    ece = (1 * 0.05 + 1 * 0.15 + 2 * 0.025 + 2 * 0.075) / 6
    assert metrics.expected_calibration_error(bins) == pytest.approx(ece)
    perfect = metrics.calibration_bins(np.array([0, 1]), np.array([0.0, 1.0]), n_bins=10)
    assert metrics.expected_calibration_error(perfect) == 0.0


def test_a_target_threshold_needs_the_class_it_measures():
    scores = np.array([0.1, 0.4, 0.8])
    with pytest.raises(metrics.MetricError, match="sensitivity needs at least one malignant"):
        metrics.threshold_for_sensitivity(np.zeros(3), scores, 0.9)
    with pytest.raises(metrics.MetricError, match="specificity needs at least one non-malignant"):
        metrics.threshold_for_specificity(np.ones(3), scores, 0.8)
