"""Shared by the tests of plugin.outputs: predictions for synthetic exams, and the DICOM
validators (dciodvfy, dsrdump, PixelMed's DicomSRValidator) run as real peers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.mammogram import Laterality
from models.results import (
    BreastPrediction,
    ExamPrediction,
    ImagePrediction,
    ModelInfo,
    RegionOfInterest,
    map_levels,
)
from tests.support.maps import malignant_fields
from trainer.synth import SynthExam

SCREENING = ("R-CC", "L-CC", "R-MLO", "L-MLO")


def model_info(
    name: str = "test-gmic",
    version: str = "1.0",
    *,
    clinical_use: bool = False,
    operating_point: float | None = 0.5,
    family: str = "gmic",
) -> ModelInfo:
    return ModelInfo(
        name=name,
        version=version,
        family=family,
        clinical_use=clinical_use,
        intended_use="research",
        licence="Apache-2.0",
        operating_point=operating_point,
    )


def bump(shape: tuple[int, int], center: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    d2 = (rows + 0.5 - center[0]) ** 2 + (cols + 0.5 - center[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def mask_center(mask: np.ndarray) -> tuple[float, float]:
    """Continuous (row, col) centre of a mask's pixels."""
    r, c = ndimage.center_of_mass(mask)
    return (float(r) + 0.5, float(c) + 0.5)


def prediction_for(
    exam: SynthExam,
    *,
    models: Iterable[ModelInfo] = (model_info(),),
    scores: dict[str, float] | None = None,
    drop: Iterable[str] = (),
    benign: bool = True,
    rois: bool = False,
) -> tuple[ExamPrediction, dict[str, pydicom.Dataset]]:
    """An ExamPrediction whose malignant map peaks on each image's lesion (centre of the
    image when it has none), scaled by the image's score, as the ensemble hands it over
    (levels, fp32 peak); `rois` adds a box around it."""
    models = tuple(models)
    drop = set(drop)
    scores = scores or {}
    images, sources = [], {}
    for si in exam.images:
        if si.view_key in drop:
            continue
        ds = si.dataset
        shape = (int(ds.Rows), int(ds.Columns))
        p = scores.get(si.view_key, 0.7 if si.malignant else 0.1)
        center = mask_center(si.malignant_mask) if si.malignant else (shape[0] / 2, shape[1] / 2)
        sigma = shape[0] / 40
        m = bump(shape, center, sigma) * np.float32(p)
        box = (center[0] - 2 * sigma, center[1] - 2 * sigma, center[0] + 2 * sigma,
               center[1] + 2 * sigma)  # fmt: skip
        images.append(
            ImagePrediction(
                sop_instance_uid=str(ds.SOPInstanceUID),
                laterality=si.laterality,
                view=si.view,
                malignant=p,
                benign=0.2 if benign else None,
                per_model={m_.name: p for m_ in models},
                **malignant_fields(m),
                benign_map=map_levels(np.full(shape, 0.2, np.float32)) if benign else None,
                rois=(RegionOfInterest(box, 0.9, models[0].name),) if rois else (),
            )
        )
        sources[str(ds.SOPInstanceUID)] = ds
    return exam_prediction(exam.study_instance_uid, images, models, benign), sources


def exam_prediction(
    study: str, images: list[ImagePrediction], models: tuple[ModelInfo, ...], benign: bool = True
) -> ExamPrediction:
    breasts = []
    for lat in (Laterality.RIGHT, Laterality.LEFT):
        own = [i for i in images if i.laterality == lat]
        if own:
            breasts.append(
                BreastPrediction(
                    lat,
                    float(np.mean([i.malignant for i in own])),
                    0.2 if benign else None,
                    tuple(i.sop_instance_uid for i in own),
                )
            )
    present = {f"{i.laterality}-{i.view}" for i in images}
    return ExamPrediction(
        study_instance_uid=study,
        images=tuple(images),
        breasts=tuple(breasts),
        malignant=max(b.malignant for b in breasts),
        benign=0.2 if benign else None,
        missing_views=tuple(v for v in SCREENING if v not in present),
        models=models,
    )


# -- validators --------------------------------------------------------------------------------

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# JDK 17 stops PixelMed's XSLT at its default XPath limits (dicom-outputs.md §4).
PIXELMED_JDK_FLAGS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian packages dicom3tools / dcmtk)")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines (warnings are allowed: e.g. our private coding scheme)."""
    run = subprocess.run(
        [_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump_errors(path: Path) -> list[str]:
    """dcmtk's SR parser, which enforces the IOD's relationship constraints."""
    run = subprocess.run([_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=120)
    errors = [
        line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("E:", "F:"))
    ]
    if run.returncode != 0:
        errors.append(f"dsrdump exit status {run.returncode}")
    return errors


def pixelmed_report(path: Path) -> str:
    """PixelMed DicomSRValidator's output (template and IOD checks), content order included."""
    java = _tool("java")
    if not PIXELMED_JAR.exists():
        pytest.skip(f"{PIXELMED_JAR} missing: apt-get install pixelmed-apps default-jre-headless")
    run = subprocess.run(
        [
            java,
            *PIXELMED_JDK_FLAGS,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            "-checkcontentitemorder",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.stdout + run.stderr


def pixelmed_errors(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("Error")]


# -- SR tree walking -----------------------------------------------------------------------------


def concept(item: pydicom.Dataset) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None


def code_value(item: pydicom.Dataset) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def children(item: pydicom.Dataset, name: str | None = None, rel: str | None = None):
    out = []
    for child in item.get("ContentSequence", []):
        if name is not None and concept(child) != name:
            continue
        if rel is not None and child.RelationshipType != rel:
            continue
        out.append(child)
    return out


def only(items: list) -> pydicom.Dataset:
    assert len(items) == 1, f"expected one item, got {len(items)}"
    return items[0]


def referenced_uid(scoord: pydicom.Dataset) -> str:
    image = only([c for c in scoord.ContentSequence if c.ValueType == "IMAGE"])
    return str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def num_value(item: pydicom.Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)
