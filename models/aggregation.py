"""From image scores to breast and exam scores: the one rule the ensemble reports and
`trainer evaluate` measures (DESIGN §3).

A breast scores the mean of its images (CC and MLO, or the one present): two views of one
breast are two looks at the same tissue. An exam scores the max over its breasts: one
suspicious breast makes a suspicious exam, whatever the other one looks like.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def breast_score(image_scores: Iterable[float]) -> float:
    """Mean of a breast's image scores."""
    scores = list(image_scores)
    if not scores:
        raise ValueError("a breast score needs at least one image score")
    return float(np.mean(scores))


def exam_score(breast_scores: Iterable[float]) -> float:
    """Max over an exam's breast scores."""
    scores = list(breast_scores)
    if not scores:
        raise ValueError("an exam score needs at least one breast score")
    return float(max(scores))
