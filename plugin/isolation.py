"""One bad view never sinks its exam: finding the image that makes the models or an output
builder fail, so that the exam is analysed without it.

Failures are rare, so the common path pays nothing: the exam is scored and its objects built
as a whole, and only when that fails is each image tried alone. An image that fails alone is
left out with its reason; a failure no single image explains is the job's, and is retried.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import pydicom

from models.mammogram import Mammogram
from models.results import ExamPrediction
from plugin.outputs import (
    OutputKind,
    OutputOptions,
    build_cad_sr,
    build_labelmap_seg,
    build_sc,
    build_seg,
    build_tid1500,
    build_tid1500_scores,
)
from plugin.outputs.common import DEFAULT_OPTIONS, ordered_images

log = logging.getLogger(__name__)

_EXAM_LEVEL: dict[OutputKind, Callable[..., pydicom.Dataset]] = {
    OutputKind.CAD_SR: build_cad_sr,
    OutputKind.TID1500: build_tid1500,
    OutputKind.TID1500_SCORES: build_tid1500_scores,
}
_PER_IMAGE: dict[OutputKind, Callable[..., pydicom.Dataset]] = {
    OutputKind.SEG: build_seg,
    OutputKind.SC: build_sc,
    OutputKind.LABELMAP_SEG: build_labelmap_seg,
}


@dataclass(frozen=True)
class Analysis:
    prediction: ExamPrediction
    objects: list[pydicom.Dataset]
    left_out: list[tuple[str, str, str]]
    """(SOPInstanceUID, stage: "analyse" or "output", reason) of each image left out."""


class NoUsableImage(Exception):
    """Every image failed; `left_out` says how."""

    def __init__(self, left_out: list[tuple[str, str, str]]) -> None:
        super().__init__("no usable image in the exam")
        self.left_out = left_out


def analyse_isolated(
    predict: Callable[[Sequence[Mammogram]], ExamPrediction],
    mammograms: Sequence[Mammogram],
    sources: Mapping[str, pydicom.Dataset],
    kinds: Collection[OutputKind],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> Analysis:
    """Score the exam and build its objects; an image that makes either fail on its own is
    left out and the exam analysed again without it. The one path of the service's worker
    and `plugin run`."""
    left_out: list[tuple[str, str, str]] = []
    usable = list(mammograms)
    while usable:
        try:
            prediction = predict(usable)
        except Exception:
            bad = culprits_of_prediction(predict, usable)
            if not bad:
                raise
            stage = "analyse"
        else:
            objects, bad = build_isolated(prediction, sources, kinds, options)
            if not bad:
                return Analysis(prediction, objects, left_out)
            stage = "output"
        left_out += [(uid, stage, reason) for uid, reason in bad.items()]
        usable = [m for m in usable if m.sop_instance_uid not in bad]
        log.warning("left images out of an exam", extra={"fields": {"images": len(bad)}})
    raise NoUsableImage(left_out)


def failure(stage: str, exc: BaseException) -> str:
    """A reason that names the stage and the error's type, never a message that may quote
    a header value."""
    return f"{stage} failed ({type(exc).__name__})"


def culprits_of_prediction(
    predict: Callable[[Sequence[Mammogram]], ExamPrediction], images: Sequence[Mammogram]
) -> dict[str, str]:
    """After `predict(images)` failed: the images that fail alone, with their reasons."""
    out = {}
    for image in images:
        try:
            predict([image])
        except Exception as exc:  # noqa: BLE001 - any failure of one image is its own
            log.warning("an image fails analysis on its own", exc_info=True)
            out[image.sop_instance_uid] = failure("analysis", exc)
    return out


def build_isolated(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    kinds: Collection[OutputKind],
    options: OutputOptions = DEFAULT_OPTIONS,
) -> tuple[list[pydicom.Dataset], dict[str, str]]:
    """All requested objects, in `OutputKind` order, and the images whose objects could not
    be built ({SOPInstanceUID: reason}). When that mapping is not empty the objects are
    incomplete: analyse the exam again without those images."""
    objects: list[pydicom.Dataset] = []
    failed: dict[str, str] = {}
    for kind in OutputKind:
        if kind not in kinds:
            continue
        if kind in _EXAM_LEVEL:
            build = _EXAM_LEVEL[kind]
            try:
                objects.append(build(exam, sources, options))
            except Exception:  # noqa: BLE001 - find the image that breaks it
                culprits = _exam_level_culprits(build, kind, exam, sources, options)
                if not culprits:
                    raise  # not one image's fault: the job fails and is retried
                failed.update(culprits)
            continue
        for n, img in enumerate(ordered_images(exam), start=1):
            try:
                objects.append(
                    _PER_IMAGE[kind](exam, img, sources[img.sop_instance_uid], n, options)
                )
            except Exception as exc:  # noqa: BLE001 - one view's object, one view's fault
                log.warning("a per-view result object cannot be built", exc_info=True)
                failed.setdefault(img.sop_instance_uid, failure(f"{kind.value} output", exc))
    return objects, failed


def _exam_level_culprits(
    build: Callable[..., pydicom.Dataset],
    kind: OutputKind,
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    options: OutputOptions,
) -> dict[str, str]:
    if len(exam.images) < 2:
        return {}
    out = {}
    for img in exam.images:
        alone = dataclasses.replace(exam, images=(img,))
        try:
            build(alone, sources, options)
        except Exception as exc:  # noqa: BLE001
            log.warning("an exam-level result object fails with one view", exc_info=True)
            out[img.sop_instance_uid] = failure(f"{kind.value} output", exc)
    return {} if len(out) == len(exam.images) else out
