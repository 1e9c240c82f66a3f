"""Offline analysis: DICOM files and folders in, result objects in a folder out.

The same steps as the service, without the network and the store: group instances by study,
select one image per view with the service's selection policy, run the ensemble, build the
result objects, write them to one folder per study. The folder is named by a hash of the
StudyInstanceUID (no identifiers in file names or on the console); its `results.json` maps it
back and records the scores, the selection and every skipped instance with its reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from models.ensemble import Ensemble
from models.results import ExamPrediction

from .decoding import decode
from .isolation import NoUsableImage, analyse_isolated
from .outputs import (
    DEFAULT_KINDS,
    OutputKind,
    OutputOptions,
    output_kind,
    source_instance,
)
from .selection import Candidate, SelectionPolicy, select_views


@dataclass(frozen=True)
class Instance:
    path: Path
    header: pydicom.Dataset
    """Read without pixel data; the chosen images are read again in full."""


@dataclass
class StudyResult:
    study_instance_uid: str
    folder: Path
    prediction: ExamPrediction | None = None
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file path, reason) for every instance not analysed."""
    missing: tuple[str, ...] = ()
    error: str | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.folder.name


@dataclass(frozen=True)
class Scan:
    studies: dict[str, list[Instance]]
    not_dicom: list[Path]
    """Files that are not DICOM (labels, masks, notes): ignored."""


def study_folder_name(study_instance_uid: str) -> str:
    return "study-" + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


def scan(paths: Iterable[Path]) -> Scan:
    """Every DICOM file under `paths` (files, or folders searched recursively), by study."""
    studies: dict[str, list[Instance]] = {}
    not_dicom: list[Path] = []
    for path in _files(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError):
            not_dicom.append(path)
            continue
        study = str(header.get("StudyInstanceUID") or "")
        if not study or "SOPInstanceUID" not in header:
            not_dicom.append(path)
            continue
        studies.setdefault(study, []).append(Instance(path, header))
    return Scan(studies, not_dicom)


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return out


def analyse_study(
    instances: Sequence[Instance],
    ensemble: Ensemble,
    out_dir: Path,
    *,
    policy: SelectionPolicy | None = None,
    kinds: Sequence[OutputKind] = DEFAULT_KINDS,
    options: OutputOptions | None = None,
) -> StudyResult:
    """Select, decode, predict, build and write one study's objects."""
    started = time.perf_counter()
    study = str(instances[0].header.StudyInstanceUID)
    result = StudyResult(study, out_dir / study_folder_name(study))
    selection = select_views(
        instances, policy or SelectionPolicy(), candidate=lambda i: Candidate.from_dataset(i.header)
    )
    result.skipped = [(str(i.path), reason) for i, reason in selection.skipped]

    decoded = decode(
        [(key, inst.path) for key, inst in selection.chosen.items()],
        keep_pixels=OutputKind.SC in {OutputKind(k) for k in kinds},
    )
    for key, reason in decoded.failed:
        result.skipped.append((str(selection.chosen[key].path), f"{key}: {reason}"))
    if not decoded.mammograms:
        result.missing = selection.missing
        result.error = "no analysable image (see skipped)"
        result.seconds = time.perf_counter() - started
        return result

    paths = {str(inst.header.SOPInstanceUID): str(inst.path) for inst in selection.chosen.values()}
    try:
        analysis = analyse_isolated(
            ensemble.predict_exam,
            decoded.mammograms,
            decoded.datasets,
            {OutputKind(k) for k in kinds},
            options or OutputOptions(),
        )
    except NoUsableImage as exc:
        analysis, left_out = None, exc.left_out
    else:
        left_out = analysis.left_out
    for uid, stage, reason in left_out:
        result.skipped.append((paths.get(uid, uid), f"{stage}: {reason}"))
    if analysis is None:
        result.missing = selection.missing
        result.error = "no analysable image (see skipped)"
        result.seconds = time.perf_counter() - started
        return result
    prediction, objects = analysis.prediction, analysis.objects
    result.prediction = prediction
    result.missing = prediction.missing_views
    result.folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in objects:
        path = result.folder / _file_name(ds, prediction)
        ds.save_as(path, enforce_file_format=True)
        result.files.append(path)
        written.append({"file": path.name, "sop_instance_uid": str(ds.SOPInstanceUID)})
    _write_summary(result, selection.chosen, written)
    result.seconds = time.perf_counter() - started
    return result


def _file_name(ds: pydicom.Dataset, prediction: ExamPrediction) -> str:
    """ "cad_sr.dcm", "tid1500.dcm", "seg_R-CC.dcm", "sc_L-MLO.dcm", …"""
    kind = output_kind(ds)
    source = source_instance(ds)
    if source is None:
        return f"{kind.value}.dcm"
    img = prediction.image(source)
    return f"{kind.value}_{img.laterality}-{img.view}.dcm"


def _write_summary(
    result: StudyResult, chosen: dict[str, Instance], written: list[dict[str, str]]
) -> None:
    p = result.prediction
    assert p is not None
    summary = {
        "study_instance_uid": result.study_instance_uid,
        "exam": {"malignant": p.malignant, "benign": p.benign, "partial": p.partial},
        "missing_views": list(p.missing_views),
        "breasts": {
            str(b.laterality): {"malignant": b.malignant, "benign": b.benign} for b in p.breasts
        },
        "images": {
            f"{i.laterality}-{i.view}": {
                "sop_instance_uid": i.sop_instance_uid,
                "path": str(chosen[f"{i.laterality}-{i.view}"].path),
                "malignant": i.malignant,
                "benign": i.benign,
                "per_model": i.per_model,
            }
            for i in p.images
        },
        "skipped": [{"path": path, "reason": reason} for path, reason in result.skipped],
        "models": [
            {"name": m.name, "version": m.version, "clinical_use": m.clinical_use} for m in p.models
        ],
        "objects": written,
    }
    (result.folder / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
