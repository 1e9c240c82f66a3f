"""Offline analysis: DICOM files and folders in, result objects in a folder out.

The same steps as the service, without the network and the store: group instances by study,
select one image per view with the service's selection policy, and send the studies through
the service's analysis pipeline (`plugin.pipeline`: decode, ensemble, result objects written
durably), to one folder per study. The folder is named by a hash of the
StudyInstanceUID (no identifiers in file names or on the console); its `results.json` maps it
back and records the scores, the selection and every skipped instance with its reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from models.ensemble import Ensemble
from models.results import ExamPrediction

from .durable import write_atomically
from .isolation import NoUsableImage
from .pipeline import ExamRequest, Naming, Outcome, Pipeline, Settings
from .selection import Candidate, Selection, SelectionPolicy, select_views


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


def analyse_studies(
    studies: Iterable[Sequence[Instance]],
    ensemble: Ensemble,
    out_dir: Path,
    settings: Settings,
    *,
    policy: SelectionPolicy | None = None,
    on_result: Callable[[StudyResult], None] | None = None,
) -> list[StudyResult]:
    """Select each study's images and analyse the studies through one pipeline, several at
    once; results in the order given. `on_result` sees each as it finishes."""
    policy = policy or SelectionPolicy()
    results: list[StudyResult] = []

    def finished(result: StudyResult) -> None:
        if on_result is not None:
            on_result(result)

    def done(outcome: Outcome) -> None:
        result, selection = outcome.request.tag
        _record(result, selection, outcome)
        finished(result)

    pipeline = Pipeline(ensemble, settings, done)
    try:
        for instances in studies:
            study = str(instances[0].header.StudyInstanceUID)
            result = StudyResult(study, out_dir / study_folder_name(study))
            results.append(result)
            selection = select_views(
                instances, policy, candidate=lambda i: Candidate.from_dataset(i.header)
            )
            result.skipped = [(str(i.path), reason) for i, reason in selection.skipped]
            if not selection.chosen:
                result.missing = selection.missing
                result.error = "no analysable image (see skipped)"
                finished(result)
                continue
            files = tuple((key, inst.path) for key, inst in selection.chosen.items())
            pipeline.submit(
                ExamRequest(files, result.folder, Naming.BY_VIEW, tag=(result, selection))
            )
        pipeline.wait_idle()
    finally:
        pipeline.close()
    return results


def _record(result: StudyResult, selection: Selection[Instance], outcome: Outcome) -> None:
    """What the pipeline made of one study, and its `results.json`."""
    result.seconds = time.monotonic() - outcome.started
    paths = {str(i.header.SOPInstanceUID): str(i.path) for i in selection.chosen.values()}
    for lo in outcome.left_out:
        if lo.stage == "decode":  # keyed by view: the image could not be read
            path = str(selection.chosen[lo.sop_instance_uid].path)
            result.skipped.append((path, f"{lo.sop_instance_uid}: {lo.reason}"))
        else:
            path = paths.get(lo.sop_instance_uid, lo.sop_instance_uid)
            result.skipped.append((path, f"{lo.stage}: {lo.reason}"))
    if isinstance(outcome.error, NoUsableImage):
        result.missing = selection.missing
        result.error = "no analysable image (see skipped)"
        return
    if outcome.error is not None:
        result.missing = selection.missing
        result.error = f"analysis failed ({type(outcome.error).__name__})"
        return
    result.prediction = outcome.prediction
    assert result.prediction is not None
    result.missing = result.prediction.missing_views
    result.files = [o.path for o in outcome.objects]
    written = [
        {"file": o.path.name, "sop_instance_uid": o.sop_instance_uid} for o in outcome.objects
    ]
    _write_summary(result, selection.chosen, written)


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
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(result.folder / "results.json", lambda fp: fp.write(text.encode()))
