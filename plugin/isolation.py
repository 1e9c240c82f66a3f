"""One bad view never sinks its exam: finding the image that makes the models or an output
builder fail, so that the exam is analysed without it.

Failures are rare, so the common path pays nothing: the exam is scored and its objects built
as a whole, and only when that fails is each image tried alone. An image that fails alone is
left out with its reason; a failure no single image explains is the job's, and is retried.
The pipeline (`plugin.pipeline`) calls these steps for the worker and `plugin run` alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import pydicom

from models.mammogram import Mammogram
from models.results import ExamPrediction
from plugin.outputs import EXAM_LEVEL, PER_IMAGE, OutputKind, OutputOptions, ResultObject
from plugin.outputs.common import DEFAULT_OPTIONS, ordered_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeftOut:
    """An image the exam was analysed without."""

    sop_instance_uid: str
    """Or, for an image that could not be decoded, the caller's key for it."""
    stage: str
    """"decode", "analyse" or "output"."""
    reason: str
    """Names the stage and the error's type, never a header value (it reaches the audit)."""


class NoUsableImage(Exception):
    """Every image failed; `left_out` says how."""

    def __init__(self, left_out: Sequence[LeftOut]) -> None:
        super().__init__("no usable image in the exam")
        self.left_out = list(left_out)


def failure(stage: str, exc: BaseException) -> str:
    """A reason that names the stage and the error's type, never a message that may quote
    a header value."""
    return f"{stage} failed ({type(exc).__name__})"


def predict_isolated(
    predict: Callable[[Sequence[Mammogram]], ExamPrediction], images: Sequence[Mammogram]
) -> tuple[ExamPrediction, list[LeftOut]]:
    """`predict(images)`, leaving out each image that makes it fail on its own. Raises
    `NoUsableImage` when every image fails, and the original error when no single image
    explains the failure (the job's fault: it is retried)."""
    left_out: list[LeftOut] = []
    usable = list(images)
    while usable:
        try:
            return predict(usable), left_out
        except Exception:
            bad = culprits_of_prediction(predict, usable)
            if not bad:
                raise
        left_out += [LeftOut(uid, "analyse", reason) for uid, reason in bad.items()]
        usable = [m for m in usable if m.sop_instance_uid not in bad]
        log.warning("left images out of an exam", extra={"fields": {"images": len(bad)}})
    raise NoUsableImage(left_out)


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
    views: Collection[str] | None = None,
) -> tuple[list[ResultObject], dict[str, str]]:
    """All requested objects, in `OutputKind` order, and the images whose objects could not
    be built ({SOPInstanceUID: reason}). When that mapping is not empty the objects are
    incomplete: analyse the exam again without those images.

    `views` (SOPInstanceUIDs) limits the per-view objects to those images, numbered as in
    the whole exam, so that an exam's objects can be built in parts (`plugin.pipeline`)."""
    objects: list[ResultObject] = []
    failed: dict[str, str] = {}
    for kind in OutputKind:
        if kind not in kinds:
            continue
        if kind in EXAM_LEVEL:
            build = EXAM_LEVEL[kind]
            try:
                objects.append(ResultObject(kind, build(exam, sources, options)))
            except Exception:  # noqa: BLE001 - find the image that breaks it
                culprits = _exam_level_culprits(build, kind, exam, sources, options)
                if not culprits:
                    raise  # not one image's fault: the job fails and is retried
                failed.update(culprits)
            continue
        for n, img in enumerate(ordered_images(exam), start=1):
            uid = img.sop_instance_uid
            if views is not None and uid not in views:
                continue
            try:
                ds = PER_IMAGE[kind](exam, img, sources[uid], n, options)
            except Exception as exc:  # noqa: BLE001 - one view's object, one view's fault
                log.warning("a per-view result object cannot be built", exc_info=True)
                failed.setdefault(uid, failure(f"{kind.value} output", exc))
                continue
            objects.append(ResultObject(kind, ds, uid))
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
