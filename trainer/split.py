"""Train/val/test split by patient, stratified by outcome.

A pure function of the site data and a seed: `trainer finetune` and `trainer evaluate` compute
the same split independently, whatever order the files were found in. Patients are ordered by a
seeded hash of their id (not by Python's `hash`, which changes per process), then each stratum
(patients with any malignant image, patients without) is cut by the fractions. When labels.csv
has a `split` column, it is used as given (sitedata already checked one split per patient).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from .sitedata import SPLITS, SiteData, SiteDataError, SiteImage

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class Split:
    """SOP Instance UID → "train" | "val" | "test"."""

    assignment: dict[str, str]
    source: str
    """"labels.csv" or "seed=N fractions=…" — recorded in the model card."""

    def images(self, data: SiteData, which: str) -> list[SiteImage]:
        if which == "all":
            return list(data.images)
        if which not in SPLITS:
            raise SiteDataError(f"unknown split {which!r}; use one of {', '.join(SPLITS)} or all")
        return [im for im in data.images if self.assignment[im.sop_instance_uid] == which]

    def counts(self, data: SiteData) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for which in SPLITS:
            ims = self.images(data, which)
            out[which] = {
                "images": len(ims),
                "malignant_images": sum(im.malignant for im in ims),
                "patients": len({im.patient_id for im in ims}),
            }
        return out


def split_site_data(
    data: SiteData, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> Split:
    if data.has_split_column:
        missing = [im for im in data.images if im.split is None]
        if missing:
            raise SiteDataError(
                f"labels.csv has a `split` column but {len(missing)} rows leave it empty; "
                "fill it for every row or drop the column to split by --seed"
            )
        return Split({im.sop_instance_uid: str(im.split) for im in data.images}, "labels.csv")
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise SiteDataError(f"split fractions must be >= 0 and sum to 1, got {fractions}")

    positive: dict[str, bool] = defaultdict(bool)
    for im in data.images:
        positive[im.patient_id] |= bool(im.malignant)
    patient_split: dict[str, str] = {}
    for stratum in (True, False):
        patients = sorted(
            (p for p, pos in positive.items() if pos is stratum),
            key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest(),
        )
        for p, which in zip(patients, _allocate(len(patients), fractions), strict=True):
            patient_split[p] = which
    assignment = {im.sop_instance_uid: patient_split[im.patient_id] for im in data.images}
    return Split(assignment, f"seed={seed} fractions={list(fractions)} by patient, stratified")


def _allocate(n: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split sizes for n patients: val and test get their rounded share, at least one each
    when there are three or more patients (so every split can be scored), train the rest."""
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = max(n - n_val - n_test, 0)
    return (["test"] * n_test + ["val"] * n_val + ["train"] * n_train)[:n]
