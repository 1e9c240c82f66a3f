"""DICOM result objects for one analysed exam, built with highdicom.

    objects = build_outputs(exam, sources, [OutputKind.CAD_SR, OutputKind.SEG])

`sources` maps each analysed image's SOPInstanceUID to its dataset (with pixel data when the SC
heat-map is wanted; headers suffice otherwise). Every object lands in the source study, in a
series of its own kind, with UIDs derived from the input instances and the model versions, so
building the same exam twice gives the same UIDs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pydicom

from models.results import ExamPrediction

from .cad_sr import MammographyCADSR, build_cad_sr
from .common import (
    DEFAULT_OPTIONS,
    NOT_FOR_CLINICAL_USE,
    OutputKind,
    OutputOptions,
    derive_uid,
    kind_for_series,
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


def build_outputs(
    exam: ExamPrediction,
    sources: Mapping[str, pydicom.Dataset],
    kinds: Collection[OutputKind | str] = DEFAULT_KINDS,
    options: OutputOptions = DEFAULT_OPTIONS,
) -> list[pydicom.Dataset]:
    """All requested objects for `exam`, in the order of `OutputKind` (SRs first)."""
    wanted = {OutputKind(k) for k in kinds}
    out: list[pydicom.Dataset] = []
    for kind in OutputKind:
        if kind not in wanted:
            continue
        if kind is OutputKind.CAD_SR:
            out.append(build_cad_sr(exam, sources, options))
        elif kind is OutputKind.TID1500:
            out.append(build_tid1500(exam, sources, options))
        elif kind is OutputKind.TID1500_SCORES:
            out.append(build_tid1500_scores(exam, sources, options))
        elif kind is OutputKind.SEG:
            out.extend(build_segs(exam, sources, options))
        elif kind is OutputKind.SC:
            out.extend(build_scs(exam, sources, options))
        elif kind is OutputKind.LABELMAP_SEG:
            out.extend(build_labelmap_segs(exam, sources, options))
    return out


def output_kind(ds: pydicom.Dataset) -> OutputKind:
    """Which kind a built object is, e.g. to name files or pick a destination."""
    return kind_for_series(ds.SeriesNumber)


def source_instance(ds: pydicom.Dataset) -> str | None:
    """The SOPInstanceUID of the one image a SEG or SC was made from; None for the SRs."""
    if "SourceImageSequence" in ds:
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    if "ReferencedSeriesSequence" in ds:
        series = ds.ReferencedSeriesSequence[0]
        return str(series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    return None


__all__ = [
    "DEFAULT_KINDS",
    "MAX_FRACTIONAL_VALUE",
    "NOT_FOR_CLINICAL_USE",
    "MammographyCADSR",
    "OutputKind",
    "OutputOptions",
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
    "kind_for_series",
    "output_kind",
    "source_instance",
]
