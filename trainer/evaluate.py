"""Scoring site images and reporting AUC per image, breast and exam, honestly.

One model file is scored as trained: the family's malignancy probability per image, without
test-time flips, from the same cached inputs `trainer finetune` validates on. Several members,
or flips, are scored as the service scores them (`models.ensemble`), which also gives the maps
on the source grid for the localisation figure. Aggregation is the ensemble's own
(`models.aggregation`: a breast scores the mean of its images, an exam the max over its
breasts); a breast or exam is malignant when any of its images is.

A figure that cannot bear weight says so: every level report carries warnings for too few
cases of a class, scores that are all equal, or a bootstrap interval that collapsed to a point.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.aggregation import breast_score, exam_score
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec, resolve_device
from models.family import ModelFamily, get_family
from models.modelfile import load_model, read_card
from models.numerics import autocast
from models.pixels import read_mammogram_file

from . import metrics, plots
from .localisation import (
    DEFAULT_WITHIN_MM,
    LocalisationReport,
    PeakDistance,
    localisation_report,
    peak_distance,
)
from .operating import Criterion, write_operating_point
from .prepare import InputCache
from .progress import progress as progress_bar
from .sitedata import SiteImage, load_site_data
from .split import split_site_data

LEVELS = ("image", "breast", "exam")
TABLE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TABLE_SENSITIVITIES = (0.8, 0.85, 0.9, 0.95)
MIN_CLASS_CASES = 10
"""Below this many malignant or non-malignant cases an AUC and its interval are anecdotes."""


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
    for start in progress_bar(starts, "score", "batch", enabled=progress):
        x = cache.batch(images[start : start + batch_size]).to(device)
        with autocast(device, precision):
            result = module(x)
        out.append(family.score_maps(result).malignant.float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def ensemble_scores(
    spec: EnsembleSpec, images: Sequence[SiteImage], progress: bool = False
) -> tuple[np.ndarray, list[PeakDistance]]:
    """Score each image as the service does (members, flips, maps on the source grid) and
    measure, for each malignant image with a lesion mask, how far its map's peak lies from the
    lesion. Scores are in `images` order. An image's score and map do not depend on the other
    views of its exam, so images are scored one at a time (bounded memory)."""
    ensemble = Ensemble(spec)
    scores = np.zeros(len(images))
    distances = []
    for i, im in enumerate(progress_bar(images, "score", "img", enabled=progress)):
        mammogram = read_mammogram_file(im.path)
        prediction = ensemble.predict_exam([mammogram]).images[0]
        scores[i] = prediction.malignant
        if im.malignant and im.malignant_mask is not None:
            distances.append(peak_distance(im, prediction, mammogram.pixel_spacing_mm))
    return scores, distances


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
            breast_score(scores[i] for i in idx),
        )
        by_level["breast"].append(case)
        exams[study].append(case)
    by_level["exam"] = [
        Case(study, max(c.label for c in cases), exam_score(c.score for c in cases))
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
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "auc": self.auc,
            "ci95": list(self.ci95) if self.ci95 else None,
            "n": self.n,
            "positives": self.positives,
            **({"note": self.note} if self.note else {}),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }


def _warnings(
    level: str, labels: np.ndarray, scores: np.ndarray, ci: tuple[float, float] | None
) -> tuple[str, ...]:
    found = []
    positives = int(labels.sum())
    for count, kind in ((positives, "malignant"), (labels.size - positives, "non-malignant")):
        if count < MIN_CLASS_CASES:
            found.append(
                f"{level}: only {count} {kind} case(s) (fewer than {MIN_CLASS_CASES}); the AUC "
                "and its interval rest on too few cases to trust: evaluate on more data"
            )
    if scores.size and np.all(scores == scores[0]):
        found.append(
            f"{level}: every score is {scores[0]:.6g}; the model does not rank these cases at "
            "all (wrong model file, preprocessing or data?)"
        )
    if ci is not None and ci[0] == ci[1]:
        found.append(
            f"{level}: the 95% CI collapsed to {ci[0]:.3f}; every resample gave the same AUC, "
            "which shows too few or tied cases, not certainty"
        )
    return tuple(found)


def level_report(
    level: str, cases: list[Case], n_boot: int = metrics.DEFAULT_N_BOOT
) -> LevelReport:
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
            _warnings(level, labels, scores, None),
        )
    auc = metrics.roc_auc(labels, scores)
    ci = metrics.bootstrap_auc_ci(labels, scores, n_boot=n_boot)
    return LevelReport(
        level, len(cases), positives, auc, ci, "", _warnings(level, labels, scores, ci)
    )


def report(
    images: Sequence[SiteImage], scores: np.ndarray, n_boot: int = metrics.DEFAULT_N_BOOT
) -> dict[str, LevelReport]:
    cases = aggregate(images, scores)
    return {level: level_report(level, cases[level], n_boot) for level in LEVELS}


def reports_to_json(reports: dict[str, LevelReport]) -> dict[str, dict]:
    return {level: r.to_json() for level, r in reports.items()}


def write_outputs(
    out_dir: Path,
    images: Sequence[SiteImage],
    scores: np.ndarray,
    reports: dict[str, LevelReport],
    title: str,
    threshold: float | None = None,
    localisation: LocalisationReport | None = None,
) -> list[Path]:
    """ROC and calibration PNGs, the sens/spec table, per-image scores and metrics.json.

    The ROC legend gives each level's n; the image-level curve gets its bootstrap band and,
    with `threshold` (the model's image-level operating point), that point marked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = aggregate(images, scores)
    measured = {level: _arrays(cases[level]) for level in LEVELS if reports[level].auc is not None}
    bins = metrics.calibration_bins(*_arrays(cases["image"]))
    roc = _roc_png(out_dir / "roc.png", measured, reports, title, threshold)
    written = [] if roc is None else [roc]
    written.append(plots.calibration_png(out_dir / "calibration.png", bins, title + " (image)"))
    written.append(_operating_points_csv(out_dir / "operating_points.csv", measured))
    written.append(_scores_csv(out_dir / "scores.csv", images, scores))
    payload = {
        **reports_to_json(reports),
        **({"localisation": localisation.to_json()} if localisation else {}),
        "calibration": {
            "bins": [asdict(b) for b in bins],
            "expected_calibration_error": metrics.expected_calibration_error(bins),
        },
    }
    metrics_json = out_dir / "metrics.json"
    metrics_json.write_text(json.dumps(payload, indent=2) + "\n")
    written.append(metrics_json)
    return written


def _arrays(cases: Sequence[Case]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of one level's cases."""
    return np.array([c.label for c in cases]), np.array([c.score for c in cases])


def _roc_png(
    path: Path,
    measured: dict[str, tuple[np.ndarray, np.ndarray]],
    reports: dict[str, LevelReport],
    title: str,
    threshold: float | None,
) -> Path | None:
    """One ROC curve per level that has an AUC; None when none has."""
    if not measured:
        return None
    curves = {}
    for level, (labels, s) in measured.items():
        fpr, tpr, _ = metrics.roc_curve(labels, s)
        r = reports[level]
        curves[f"{level} AUC {r.auc:.3f}, n={r.n} ({r.positives} malignant)"] = (fpr, tpr)
    band = point = None
    if "image" in measured:
        labels, s = measured["image"]
        band = metrics.bootstrap_roc_band(labels, s)
        if threshold is not None:
            p = metrics.at_threshold(labels, s, threshold)
            point = (1 - p.specificity, p.sensitivity, f"operating point {threshold:.3g}")
    return plots.roc_png(path, curves, title, band, point)


def _operating_points_csv(path: Path, measured: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Sensitivity and specificity at fixed thresholds and at target sensitivities."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "criterion", "threshold", "sensitivity", "specificity", "called"])
        for level, (labels, s) in measured.items():
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
    return path


def _scores_csv(path: Path, images: Sequence[SiteImage], scores: np.ndarray) -> Path:
    """One row per image with its score in full (round-trip) precision: six decimals can tie
    distinct scores, and an AUC recomputed from the file then differs from the reported one."""
    with path.open("w", newline="") as f:
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
                    repr(float(s)),
                ]
            )
    return path


# -- the whole evaluation ---------------------------------------------------------------------


@dataclass
class Evaluation:
    """What `evaluate` measured on one split of a site's data."""

    title: str
    """The model (or ensemble) as "name version [flips] + …"."""
    split: str
    split_source: str
    seed: int
    fingerprint: str
    """The site data's fingerprint: an operating point records what it was chosen on."""
    images: list[SiteImage]
    scores: np.ndarray
    reports: dict[str, LevelReport]
    localisation: LocalisationReport


def evaluate(
    members: Sequence[MemberSpec],
    site_data: Path,
    *,
    split: str = "test",
    seed: int | None = None,
    device: str = "auto",
    batch_size: int = 4,
    n_boot: int = metrics.DEFAULT_N_BOOT,
    within_mm: float = DEFAULT_WITHIN_MM,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score one split of a site's data with a model file (or an ensemble of them) and report
    AUC with CIs per image, breast and exam, and how close the maps peak to the lesions.

    The split is recomputed exactly as `trainer finetune` made it: with the seed in the first
    model's card when that model was trained on this data, unless `seed` is given."""
    cards = [read_card(m.path) for m in members]
    card = cards[0]
    data = load_site_data(site_data)
    seed = _split_seed(card.provenance, data.fingerprint(), seed)
    made = split_site_data(data, seed=seed)
    images = made.images(data, split)
    if not images:
        raise ValueError(f"the {split} split is empty; use --split all or another split")
    spec = EnsembleSpec(tuple(members), device=device, max_batch=batch_size)
    if len(members) == 1 and members[0].flips == ("none",):
        family = get_family(card.family)
        on = resolve_device(device)
        module = load_model(members[0].path, device=on)
        cache = InputCache(family, card.preprocessing, cache_dir)
        cache.prepare(images, progress=progress)
        scores = score_images(module, family, cache, images, on, batch_size, progress=progress)
        lesions = [im for im in images if im.malignant and im.malignant_mask is not None]
        _, distances = ensemble_scores(spec, lesions, progress) if lesions else (None, [])
    else:
        scores, distances = ensemble_scores(spec, images, progress)
    title = " + ".join(
        f"{c.name} {c.version}" + ("" if m.flips == ("none",) else f" [{','.join(m.flips)}]")
        for c, m in zip(cards, members, strict=True)
    )
    return Evaluation(
        title=title,
        split=split,
        split_source=made.source,
        seed=seed,
        fingerprint=data.fingerprint(),
        images=images,
        scores=scores,
        reports=report(images, scores, n_boot=n_boot),
        localisation=localisation_report(distances, within_mm),
    )


def _split_seed(card_provenance: dict, fingerprint: str, given: int | None) -> int:
    if given is not None:
        return given
    data = card_provenance.get("training_data", {})
    if data.get("fingerprint_sha256") == fingerprint:
        return int(data.get("split", {}).get("seed", 0))
    return 0


def set_operating_point(
    evaluation: Evaluation, path: Path, criterion: Criterion, level: str
) -> tuple[float, metrics.OperatingPoint]:
    """Choose the `level` threshold that meets `criterion` on the evaluated split and write it
    into the model file at `path` as its default operating point, with what it was chosen on."""
    cases = aggregate(evaluation.images, evaluation.scores)[level]
    labels = np.array([c.label for c in cases])
    scores = np.array([c.score for c in cases])
    if criterion.kind != "threshold" and evaluation.reports[level].auc is None:
        raise ValueError(
            f"cannot choose an operating point at {level} level: {evaluation.reports[level].note}"
        )
    threshold = criterion.threshold(labels, scores)
    achieved = metrics.at_threshold(labels, scores, threshold)
    write_operating_point(
        path,
        threshold,
        {
            "criterion": str(criterion),
            "level": level,
            "split": evaluation.split,
            "split_seed": evaluation.seed,
            "data_fingerprint_sha256": evaluation.fingerprint,
            "n": len(cases),
            "sensitivity": achieved.sensitivity,
            "specificity": achieved.specificity,
        },
    )
    return threshold, achieved
