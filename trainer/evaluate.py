"""Scoring site images with one model file and reporting AUC per image, breast and exam.

Scores are the family's malignancy probability for each image, without test-time flips (the
model as trained). Aggregation follows the ensemble (DESIGN §3): a breast's score is the mean
of its images, an exam's the max over its breasts; a breast or exam is malignant when any of its
images is.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.family import ModelFamily

from . import metrics, plots
from .prepare import InputCache
from .sitedata import SiteImage

LEVELS = ("image", "breast", "exam")
TABLE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TABLE_SENSITIVITIES = (0.8, 0.85, 0.9, 0.95)


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA only; fp32 elsewhere."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def score_images(
    module: nn.Module,
    family: ModelFamily,
    cache: InputCache,
    images: Sequence[SiteImage],
    device: torch.device,
    batch_size: int = 4,
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """Malignancy probability per image, in `images` order (module put in eval mode)."""
    module.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="score", unit="batch", disable=not progress, leave=False):
        x = cache.batch(images[start : start + batch_size]).to(device)
        with autocast(device, precision):
            result = module(x)
        out.append(family.score_maps(result).malignant.float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@dataclass(frozen=True)
class Case:
    """One unit at a level: an image, a breast or an exam."""

    key: str
    label: int
    score: float


def aggregate(images: Sequence[SiteImage], scores: np.ndarray) -> dict[str, list[Case]]:
    breasts: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        breasts[im.breast_key].append(i)
    by_level: dict[str, list[Case]] = {
        "image": [
            Case(im.sop_instance_uid, im.malignant, float(s))
            for im, s in zip(images, scores, strict=True)
        ],
        "breast": [],
        "exam": [],
    }
    exams: dict[str, list[Case]] = defaultdict(list)
    for (study, side), idx in sorted(breasts.items()):
        case = Case(
            f"{study}/{side}",
            max(images[i].malignant for i in idx),
            float(np.mean([scores[i] for i in idx])),
        )
        by_level["breast"].append(case)
        exams[study].append(case)
    by_level["exam"] = [
        Case(study, max(c.label for c in cases), max(c.score for c in cases))
        for study, cases in sorted(exams.items())
    ]
    return by_level


@dataclass(frozen=True)
class LevelReport:
    level: str
    n: int
    positives: int
    auc: float | None
    ci95: tuple[float, float] | None
    note: str = ""

    def to_json(self) -> dict:
        return {
            "auc": self.auc,
            "ci95": list(self.ci95) if self.ci95 else None,
            "n": self.n,
            "positives": self.positives,
            **({"note": self.note} if self.note else {}),
        }


def level_report(level: str, cases: list[Case], n_boot: int = 2000, seed: int = 0) -> LevelReport:
    labels = np.array([c.label for c in cases], dtype=np.int64)
    scores = np.array([c.score for c in cases])
    positives = int(labels.sum())
    if positives == 0 or positives == len(cases):
        return LevelReport(
            level,
            len(cases),
            positives,
            None,
            None,
            "AUC undefined: every case has the same label",
        )
    auc = metrics.roc_auc(labels, scores)
    ci = metrics.bootstrap_auc_ci(labels, scores, n_boot=n_boot, seed=seed)
    return LevelReport(level, len(cases), positives, auc, ci)


def report(
    images: Sequence[SiteImage], scores: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, LevelReport]:
    cases = aggregate(images, scores)
    return {level: level_report(level, cases[level], n_boot, seed) for level in LEVELS}


def reports_to_json(reports: dict[str, LevelReport]) -> dict[str, dict]:
    return {level: r.to_json() for level, r in reports.items()}


def write_outputs(
    out_dir: Path,
    images: Sequence[SiteImage],
    scores: np.ndarray,
    reports: dict[str, LevelReport],
    title: str,
) -> list[Path]:
    """ROC and calibration PNGs, the sens/spec table, per-image scores and metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = aggregate(images, scores)
    written = []
    curves = {}
    for level in LEVELS:
        if reports[level].auc is None:
            continue
        labels = np.array([c.label for c in cases[level]])
        s = np.array([c.score for c in cases[level]])
        fpr, tpr, _ = metrics.roc_curve(labels, s)
        curves[f"{level} AUC {reports[level].auc:.3f}"] = (fpr, tpr)
    if curves:
        written.append(plots.roc_png(out_dir / "roc.png", curves, title))
    image_labels = np.array([c.label for c in cases["image"]])
    image_scores = np.array([c.score for c in cases["image"]])
    bins = metrics.calibration_bins(image_labels, image_scores)
    written.append(plots.calibration_png(out_dir / "calibration.png", bins, title + " (image)"))

    table = out_dir / "operating_points.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "criterion", "threshold", "sensitivity", "specificity", "called"])
        for level in LEVELS:
            if reports[level].auc is None:
                continue
            labels = np.array([c.label for c in cases[level]])
            s = np.array([c.score for c in cases[level]])
            rows = [(f"threshold {t}", t) for t in TABLE_THRESHOLDS]
            rows += [
                (f"sensitivity >= {q}", metrics.threshold_for_sensitivity(labels, s, q))
                for q in TABLE_SENSITIVITIES
            ]
            for criterion, t in rows:
                p = metrics.at_threshold(labels, s, t)
                w.writerow(
                    [
                        level,
                        criterion,
                        f"{t:.6g}",
                        f"{p.sensitivity:.4f}",
                        f"{p.specificity:.4f}",
                        p.positives,
                    ]
                )
    written.append(table)

    scores_csv = out_dir / "scores.csv"
    with scores_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["sop_instance_uid", "study_instance_uid", "laterality", "view", "malignant", "score"]
        )
        for im, s in zip(images, scores, strict=True):
            w.writerow(
                [
                    im.sop_instance_uid,
                    im.study_instance_uid,
                    im.laterality,
                    im.view,
                    im.malignant,
                    f"{s:.6f}",
                ]
            )
    written.append(scores_csv)

    metrics_json = out_dir / "metrics.json"
    calibration = [asdict(b) for b in bins]
    payload = {
        **reports_to_json(reports),
        "calibration": {
            "bins": calibration,
            "expected_calibration_error": metrics.expected_calibration_error(bins),
        },
    }
    metrics_json.write_text(json.dumps(payload, indent=2) + "\n")
    written.append(metrics_json)
    return written
