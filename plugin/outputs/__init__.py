"""DICOM result objects for one analysed exam, built with highdicom.

    objects = build_outputs(exam, sources, [OutputKind.CAD_SR, OutputKind.SEG])
    for obj in objects:  # ResultObject: kind, dataset, source_sop_instance_uid
        ...

`sources` maps each analysed image's SOPInstanceUID to its dataset (with pixel data when the SC
heat-map is wanted; headers suffice otherwise). Every object lands in the source study, in a
series of its own kind, with UIDs derived from the input instances and the model versions, so
building the same exam twice gives the same UIDs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import pydicom

from models.results import ExamPrediction

from .cad_sr import MammographyCADSR, build_cad_sr
from .common import (
    DEFAULT_OPTIONS,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    ResultObject,
    derive_uid,
    ordered_images,
    source_for,
)
from .labelmap import build_labelmap_seg, build_labelmap_segs
from .sc import build_sc, build_scs, display_image
from .seg import MAX_FRACTIONAL_VALUE, build_seg, build_segs
from .tid1500 import build_tid1500, build_tid1500_scores

DEFAULT_KINDS: tuple[OutputKind, ...] = (
    OutputKind.CAD_SR,
    OutputKind.TID1500,
    OutputKind.SEG,
    OutputKind.SC,
)
"""What a site gets unless it configures otherwise; TID1500_SCORES is for machine consumers,
LABELMAP_SEG for OHIF."""

EXAM_LEVEL: dict[OutputKind, Callable[..., pydicom.Dataset]] = {
    OutputKind.CAD_SR: build_cad_sr,
    OutputKind.TID1500: build_tid1500,
    OutputKind.TID1500_SCORES: build_tid1500_scores,
}
"""One object per exam: `build(exam, sources, options)`."""
PER_IMAGE: dict[OutputKind, Callable[..., pydicom.Dataset]] = {
    OutputKind.SEG: build_seg,
    OutputKind.SC: build_sc,
    OutputKind.LABELMAP_SEG: build_labelmap_seg,
}
"""One object per source image: `build(exam, image, source, instance_number, options)`."""


def build_outputs(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    kinds: Collection[OutputKind | str] = DEFAULT_KINDS,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> list[ResultObject]:
    """All requested objects for `exam`, in the order of `OutputKind` (SRs first), per-view
    objects in hanging order."""
    wanted = {OutputKind(k) for k in kinds}
    out: list[ResultObject] = []
    for kind in OutputKind:
        if kind not in wanted:
            continue
        if kind in EXAM_LEVEL:
            out.append(ResultObject(kind, EXAM_LEVEL[kind](exam, sources, options)))
            continue
        for n, img in enumerate(ordered_images(exam), start=1):
            uid = img.sop_instance_uid
            ds = PER_IMAGE[kind](exam, img, source_for(sources, uid), n, options)
            out.append(ResultObject(kind, ds, uid))
    return out


__all__ = [
    "DEFAULT_KINDS",
    "EXAM_LEVEL",
    "MAX_FRACTIONAL_VALUE",
    "NOT_FOR_CLINICAL_USE",
    "PER_IMAGE",
    "MammographyCADSR",
    "OutputKind",
    "OutputOptions",
    "ResultObject",
    "build_cad_sr",
    "build_labelmap_seg",
    "build_labelmap_segs",
    "build_outputs",
    "build_sc",
    "build_scs",
    "build_seg",
    "build_segs",
    "build_tid1500",
    "build_tid1500_scores",
    "derive_uid",
    "display_image",
]
