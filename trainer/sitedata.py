"""A site's training data: DICOM files in any folder layout plus one `labels.csv`.

`labels.csv` comes in one of two shapes, told apart by its columns:

* per image: `sop_instance_uid` or `path` (relative to the folder), `malignant` 0/1, optional
  `benign` 0/1, `split`, and `malignant_mask` / `benign_mask`: PNG outlines of the lesions on
  the image's pixel grid (what `trainer synth` writes), used by `finetune --mask-weight`;
* per breast: `study_instance_uid`, `laterality` (L/R), `malignant`, optional `benign` and
  `split`; every image of that breast gets the breast's label.

Headers are read without pixels. Laterality, view, UIDs and the patient id come from the DICOM
header, never from the CSV, so a label cannot silently attach to the wrong image. Every problem
gets its own error class and a message that says which row or file and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from models.mammogram import MammogramError
from models.reading import describe

LABELS_FILE = "labels.csv"
SPLITS = ("train", "val", "test")

_Label = tuple[int, int | None, str | None]
"""(malignant, benign, split) of one labels.csv row."""


class SiteDataError(ValueError):
    """Site data that cannot be used for training or evaluation."""


class LabelFileError(SiteDataError):
    """labels.csv is missing, has the wrong columns or a bad value."""


class UnknownImageError(SiteDataError):
    """A labels.csv row names an image that is not in the folder."""


class DuplicateImageError(SiteDataError):
    """The same image (SOP Instance UID) appears twice, in the folder or in labels.csv."""


class ConflictingLabelsError(SiteDataError):
    """One image or breast gets two different labels or splits."""


class MissingViewError(SiteDataError):
    """A labelled breast has no usable image in the folder."""


class MaskFileError(LabelFileError):
    """A lesion mask named in labels.csv is missing or contradicts the row's label."""


class UnreadableImageError(SiteDataError):
    """A DICOM file in the folder whose header cannot be used."""


@dataclass(frozen=True)
class SiteImage:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    laterality: str
    view: str
    malignant: int
    benign: int | None
    split: str | None
    """From labels.csv's `split` column, else None (assigned by `trainer.split`)."""
    malignant_mask: Path | None = None
    """PNG of the malignant lesion's pixels on this image's grid (nonzero = lesion), if given."""
    benign_mask: Path | None = None

    @property
    def lesion_masks(self) -> list[Path]:
        return [m for m in (self.malignant_mask, self.benign_mask) if m is not None]

    @property
    def breast_key(self) -> tuple[str, str]:
        return (self.study_instance_uid, self.laterality)


@dataclass(frozen=True)
class SiteData:
    root: Path
    images: tuple[SiteImage, ...]
    """Sorted by SOP Instance UID, so everything derived from it is order-independent."""
    label_level: str
    """"image" or "breast": the shape of labels.csv."""
    unlabelled: int
    """DICOM images in the folder that labels.csv does not mention (left out)."""

    @property
    def has_split_column(self) -> bool:
        return any(im.split is not None for im in self.images)

    def fingerprint(self) -> str:
        """SHA-256 over what training sees (UIDs, labels, splits, hashed patient ids), so a
        model card can say exactly which data it came from without naming anyone."""
        h = hashlib.sha256()
        for im in self.images:
            row = [
                im.sop_instance_uid,
                im.study_instance_uid,
                patient_hash(im.patient_id),
                im.laterality,
                im.view,
                im.malignant,
                im.benign,
                im.split,
            ]
            # Masks enter the fingerprint only where given, so mask-free data keeps its hash.
            row += [str(m.relative_to(self.root)) for m in im.lesion_masks]
            h.update(json.dumps(row).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, int | str]:
        """Counts only: safe to log and to store in a model card."""
        breasts = {im.breast_key for im in self.images}
        malignant_breasts = {im.breast_key for im in self.images if im.malignant}
        return {
            "label_level": self.label_level,
            "images": len(self.images),
            "malignant_images": sum(im.malignant for im in self.images),
            "benign_images": sum(1 for im in self.images if im.benign),
            "breasts": len(breasts),
            "malignant_breasts": len(malignant_breasts),
            "exams": len({im.study_instance_uid for im in self.images}),
            "patients": len({im.patient_id for im in self.images}),
            "images_with_lesion_masks": sum(1 for im in self.images if im.lesion_masks),
            "unlabelled_images_ignored": self.unlabelled,
        }


def patient_hash(patient_id: str) -> str:
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    laterality: str
    view: str


@dataclass(frozen=True)
class _Broken:
    """A DICOM image whose header `describe` rejects; an error only if it is labelled."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    reason: str
    not_screening: bool = False
    """A readable header of a view the models do not analyse (For Processing, spot, …); a
    per-breast label leaves it out instead of failing the breast."""


def load_site_data(root: str | Path) -> SiteData:
    """Scan `root` for DICOM files, read labels.csv, and join them."""
    root = Path(root)
    if not root.is_dir():
        raise SiteDataError(f"{root}: site data folder not found")
    labels_path = root / LABELS_FILE
    if not labels_path.is_file():
        raise LabelFileError(
            f"{labels_path}: missing; put a labels.csv with one row per image "
            "(sop_instance_uid or path, malignant) or per breast "
            "(study_instance_uid, laterality, malignant) in the site data folder"
        )
    headers, broken = _scan(root)
    if not headers and not broken:
        raise SiteDataError(f"{root}: no DICOM mammograms found (searched all subfolders)")
    rows, columns = _read_csv(labels_path)
    if "sop_instance_uid" in columns or "path" in columns:
        images = _join_per_image(root, labels_path, rows, headers, broken)
        level = "image"
    elif {"study_instance_uid", "laterality"} <= columns:
        images = _join_per_breast(root, labels_path, rows, headers, broken)
        level = "breast"
    else:
        raise LabelFileError(
            f"{labels_path}: needs a `sop_instance_uid` or `path` column (one row per image) "
            f"or `study_instance_uid` and `laterality` columns (one row per breast); "
            f"found {sorted(columns)}"
        )
    images.sort(key=lambda im: im.sop_instance_uid)
    return SiteData(root, tuple(images), level, len(headers) + len(broken) - len(images))


def _scan(root: Path) -> tuple[dict[str, _Header], list[_Broken]]:
    headers: dict[str, _Header] = {}
    broken: list[_Broken] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name == LABELS_FILE:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError):
                continue  # masks, notes, thumbnails: not DICOM, not ours to judge
            if "Rows" not in ds:
                continue  # SR, presentation states and other non-image objects
            try:
                d = describe(ds)
            except MammogramError as exc:
                broken.append(
                    _Broken(
                        path,
                        str(ds.get("SOPInstanceUID", "")),
                        str(ds.get("StudyInstanceUID", "")),
                        str(exc),
                    )
                )
                continue
            if not d.screening_view:
                broken.append(
                    _Broken(
                        path,
                        d.sop_instance_uid,
                        d.study_instance_uid,
                        f"not a screening view the models analyse ({d.not_screening_reason})",
                        not_screening=True,
                    )
                )
                continue
            header = _Header(
                path=path,
                sop_instance_uid=d.sop_instance_uid,
                study_instance_uid=d.study_instance_uid,
                patient_id=str(ds.get("PatientID", "") or ""),
                laterality=str(d.laterality),
                view=str(d.view),
            )
            if not header.patient_id:
                broken.append(
                    _Broken(
                        path,
                        d.sop_instance_uid,
                        d.study_instance_uid,
                        "no PatientID in the header; it is needed to keep each patient "
                        "in one split",
                    )
                )
                continue
            prior = headers.get(header.sop_instance_uid)
            if prior is not None:
                raise DuplicateImageError(
                    f"{path.relative_to(root)} and {prior.path.relative_to(root)} have the same "
                    "SOP Instance UID; remove one copy"
                )
            headers[header.sop_instance_uid] = header
    return headers, broken


def _raise_broken(root: Path, b: _Broken) -> None:
    raise UnreadableImageError(
        f"{b.path.relative_to(root)} is labelled but unusable: {b.reason}; fix the header or "
        "delete its row"
    )


def _read_csv(path: Path) -> tuple[list[dict[str, str]], set[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise LabelFileError(f"{path}: empty file; it needs a header row")
        columns = {c.strip() for c in reader.fieldnames}
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "malignant" not in columns:
        raise LabelFileError(f"{path}: no `malignant` column (0 or 1 per row)")
    if not rows:
        raise LabelFileError(f"{path}: no rows")
    return rows, columns


def _flag(path: Path, line: int, row: dict[str, str], column: str) -> int | None:
    value = row.get(column, "")
    if value == "" and column != "malignant":
        return None
    if value not in ("0", "1"):
        raise LabelFileError(f"{path}:{line}: `{column}` must be 0 or 1, got {value!r}")
    return int(value)


def _split_value(path: Path, line: int, row: dict[str, str]) -> str | None:
    value = row.get("split", "").lower()
    if value == "":
        return None
    if value not in SPLITS:
        raise LabelFileError(
            f"{path}:{line}: `split` must be one of {', '.join(SPLITS)} or empty, got {value!r}"
        )
    return value


def _row_label(path: Path, line: int, row: dict[str, str]) -> _Label:
    return (
        _flag(path, line, row, "malignant"),
        _flag(path, line, row, "benign"),
        _split_value(path, line, row),
    )


def _image(
    h: _Header,
    malignant: int,
    benign: int | None,
    split: str | None,
    masks: tuple[Path | None, Path | None] = (None, None),
) -> SiteImage:
    return SiteImage(
        path=h.path,
        sop_instance_uid=h.sop_instance_uid,
        study_instance_uid=h.study_instance_uid,
        patient_id=h.patient_id,
        laterality=h.laterality,
        view=h.view,
        malignant=malignant,
        benign=benign,
        split=split,
        malignant_mask=masks[0],
        benign_mask=masks[1],
    )


def _mask_paths(
    root: Path, labels_path: Path, line: int, row: dict[str, str], label: _Label
) -> tuple[Path | None, Path | None]:
    """The row's `malignant_mask` and `benign_mask` files; a mask must exist and belong to a
    finding the row says is there."""
    found: list[Path | None] = []
    for column, flag in (("malignant_mask", label[0]), ("benign_mask", label[1])):
        rel = row.get(column, "")
        if not rel:
            found.append(None)
            continue
        kind = column.removesuffix("_mask")
        if flag != 1:
            raise MaskFileError(
                f"{labels_path}:{line}: `{column}` names {rel} but `{kind}` is not 1; a mask "
                f"outlines a {kind} finding, so set `{kind}` to 1 or clear `{column}`"
            )
        path = root / rel
        if not path.is_file():
            raise MaskFileError(
                f"{labels_path}:{line}: `{column}` {rel} not found; mask paths are relative "
                "to the site data folder"
            )
        found.append(path)
    return found[0], found[1]


def _join_per_image(
    root: Path,
    labels_path: Path,
    rows: list[dict[str, str]],
    headers: dict[str, _Header],
    broken: list[_Broken],
) -> list[SiteImage]:
    by_path = {h.path.resolve(): h for h in headers.values()}
    broken_uid = {b.sop_instance_uid: b for b in broken}
    broken_path = {b.path.resolve(): b for b in broken}
    labelled: dict[str, tuple[int, _Label]] = {}
    masks: dict[str, tuple[Path | None, Path | None]] = {}
    for line, row in enumerate(rows, start=2):
        uid, rel = row.get("sop_instance_uid", ""), row.get("path", "")
        header = None
        if uid:
            header = headers.get(uid)
            if uid in broken_uid:
                _raise_broken(root, broken_uid[uid])
            if header is None:
                raise UnknownImageError(
                    f"{labels_path}:{line}: no DICOM file in {root} has SOP Instance UID "
                    f"{uid}; add the file or delete the row"
                )
        if rel:
            resolved = (root / rel).resolve()
            if resolved in broken_path:
                _raise_broken(root, broken_path[resolved])
            by_rel = by_path.get(resolved)
            if by_rel is None:
                raise UnknownImageError(
                    f"{labels_path}:{line}: {rel} is not a DICOM mammogram in {root}; "
                    "paths are relative to the site data folder"
                )
            if header is not None and by_rel is not header:
                raise ConflictingLabelsError(
                    f"{labels_path}:{line}: path {rel} holds SOP Instance UID "
                    f"{by_rel.sop_instance_uid}, not {uid}"
                )
            header = by_rel
        if header is None:
            raise LabelFileError(f"{labels_path}:{line}: needs a sop_instance_uid or a path")
        label = _row_label(labels_path, line, row)
        prior = labelled.get(header.sop_instance_uid)
        if prior is not None:
            kind = ConflictingLabelsError if prior[1] != label else DuplicateImageError
            what = "with a different label or split" if prior[1] != label else "again"
            raise kind(
                f"{labels_path}:{line}: image {header.sop_instance_uid} was already labelled "
                f"on line {prior[0]}; it appears {what}; keep one row per image"
            )
        labelled[header.sop_instance_uid] = (line, label)
        masks[header.sop_instance_uid] = _mask_paths(root, labels_path, line, row, label)
    _check_one_split_per_patient(labels_path, labelled, headers)
    return [_image(headers[uid], *lab, masks[uid]) for uid, (_, lab) in labelled.items()]


def _join_per_breast(
    root: Path,
    labels_path: Path,
    rows: list[dict[str, str]],
    headers: dict[str, _Header],
    broken: list[_Broken],
) -> list[SiteImage]:
    images_of: dict[tuple[str, str], list[_Header]] = defaultdict(list)
    for h in headers.values():
        images_of[(h.study_instance_uid, h.laterality)].append(h)
    labelled: dict[tuple[str, str], tuple[int, _Label]] = {}
    for line, row in enumerate(rows, start=2):
        study, side = row.get("study_instance_uid", ""), row.get("laterality", "").upper()
        if not study:
            raise LabelFileError(f"{labels_path}:{line}: empty study_instance_uid")
        if side not in ("L", "R"):
            raise LabelFileError(
                f"{labels_path}:{line}: `laterality` must be L or R, got {row.get('laterality')!r}"
            )
        key = (study, side)
        label = _row_label(labels_path, line, row)
        prior = labelled.get(key)
        if prior is not None:
            kind = ConflictingLabelsError if prior[1] != label else DuplicateImageError
            raise kind(
                f"{labels_path}:{line}: breast {side} of study {study} was already labelled on "
                f"line {prior[0]}; keep one row per breast"
            )
        for b in broken:
            if b.study_instance_uid == study and not b.not_screening:
                _raise_broken(root, b)
        if key not in images_of:
            sides = sorted(
                {h.laterality for h in headers.values() if h.study_instance_uid == study}
            )
            found = (
                f"the study has only {'/'.join(sides)} images"
                if sides
                else "no image of that study is in the folder"
            )
            raise MissingViewError(
                f"{labels_path}:{line}: breast {side} of study {study} has no For Presentation "
                f"CC or MLO image ({found}); add its images or delete the row"
            )
        labelled[key] = (line, label)
    flat = {
        h.sop_instance_uid: (line, lab)
        for key, (line, lab) in labelled.items()
        for h in images_of[key]
    }
    _check_one_split_per_patient(labels_path, flat, headers)
    return [_image(headers[uid], *lab) for uid, (_, lab) in flat.items()]


def _check_one_split_per_patient(
    labels_path: Path,
    labelled: dict[str, tuple[int, _Label]],
    headers: dict[str, _Header],
) -> None:
    splits: dict[str, Counter[str | None]] = defaultdict(Counter)
    lines: dict[str, list[int]] = defaultdict(list)
    for uid, (line, (_, _, split)) in labelled.items():
        pid = headers[uid].patient_id
        splits[pid][split] += 1
        lines[pid].append(line)
    for pid, counts in splits.items():
        if len(counts) > 1:
            raise ConflictingLabelsError(
                f"{labels_path}: lines {sorted(set(lines[pid]))[:6]} belong to one patient but "
                f"name different splits ({', '.join(sorted(str(s) for s in counts))}); a "
                "patient must be in exactly one split"
            )
