"""An exam's result objects built and written in parts, what the pipeline's output stage runs
in its threads and processes (`plugin.pipeline`), and how each pool process starts.

A module of its own, importing no torch: an output process unpickles its task (and the
prediction's types) from here and from `plugin.outputs`, so it starts in about a second and
holds no model code.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np
import pydicom

from models.results import ExamPrediction
from plugin.durable import write_atomically
from plugin.isolation import build_isolated
from plugin.outputs import EXAM_LEVEL, PER_IMAGE, OutputKind, OutputOptions, ResultObject
from plugin.outputs.common import header_copy, ordered_images
from plugin.shared_payload import SharedPayload


class Naming(StrEnum):
    """How an exam's object files are named in its folder."""

    BY_UID = "uid"
    """"seg-<SOPInstanceUID>.dcm": the spool, where versions of an exam have folders."""
    BY_VIEW = "view"
    """"cad_sr.dcm", "seg_R-CC.dcm": `plugin run`'s folder per study."""


@dataclass(frozen=True)
class WrittenObject:
    """A result object as a durable file."""

    kind: OutputKind
    source_sop_instance_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int


@dataclass(frozen=True)
class BuiltPart:
    """What one part's task gives back: its objects written, or the images that failed it."""

    objects: tuple[WrittenObject, ...]
    failed: dict[str, str]
    """Images whose objects could not be built: nothing was written."""
    build_seconds: float
    write_seconds: float


@dataclass(frozen=True)
class ObjectPart:
    """Some of an exam's objects, built and written by one task of the output stage: the
    exam-level objects (the SRs), or the per-view objects of one image."""

    kinds: tuple[OutputKind, ...]
    views: tuple[str, ...]
    """SOPInstanceUIDs whose per-view objects this part builds; () for the exam level."""

    def sources(self, sources: Mapping[str, pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
        """What the part's builders read: a view's own dataset (the heat-map needs its
        pixels); at the exam level every analysed image's header, which the SRs reference,
        without the pixels that would only travel to a process for nothing."""
        if not self.views:
            return {uid: header_copy(ds) for uid, ds in sources.items()}
        return {uid: sources[uid] for uid in self.views}


def object_parts(prediction: ExamPrediction, kinds: Collection[OutputKind]) -> list[ObjectPart]:
    """The exam-level part first (if any exam-level kind is wanted), then one part per view
    in hanging order (if any per-view kind is): independent tasks that the output pool's
    processes take as they come free, so that one exam's objects are built side by side."""
    exam_level = tuple(k for k in OutputKind if k in kinds and k in EXAM_LEVEL)
    per_view = tuple(k for k in OutputKind if k in kinds and k in PER_IMAGE)
    parts = [ObjectPart(exam_level, ())] if exam_level else []
    if per_view:
        parts += [ObjectPart(per_view, (i.sop_instance_uid,)) for i in ordered_images(prediction)]
    return parts


PIXEL_DATA = 0x7FE00010


def _pixels_apart(ds: pydicom.Dataset) -> tuple:
    """How a source dataset travels to an output process: its pixel data as an array, which
    `SharedPayload` puts in shared memory, and the rest pickled, without pydicom's
    decoded-pixel cache (a second copy of the pixels, keyed by object ids, unused there).
    The pixel data is native then (`Settings.native_pixels`), cheap to read again."""
    if PIXEL_DATA not in ds:
        return ds.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    element = ds[PIXEL_DATA]
    header = pydicom.Dataset({tag: e for tag, e in ds.items() if tag != PIXEL_DATA})
    if "file_meta" in vars(ds):
        header.file_meta = ds.file_meta
    return _pixels_joined, (header, element.VR, np.frombuffer(element.value, np.uint8))


def _pixels_joined(header: pydicom.Dataset, vr: str, pixels: np.ndarray) -> pydicom.Dataset:
    header.add_new(PIXEL_DATA, vr, pixels.tobytes())
    return header


PIXELS_APART = {pydicom.Dataset: _pixels_apart, pydicom.FileDataset: _pixels_apart}


def build_and_write(
    prediction: SharedPayload[ExamPrediction],
    sources: SharedPayload[Mapping[str, pydicom.Dataset]],
    kinds: Collection[OutputKind],
    options: OutputOptions,
    folder: Path,
    naming: Naming,
    views: Collection[str] | None = None,
) -> BuiltPart:
    """One part of an exam's output stage (in a pool process or thread): build the requested
    objects (per-view ones for `views` only, when given) and, when all could be built, write
    each durably."""
    started = time.perf_counter()
    exam = prediction.value
    objects, failed = build_isolated(exam, sources.value, kinds, options, views)
    built = time.perf_counter()
    if failed:
        return BuiltPart((), failed, built - started, 0.0)
    written = tuple(_write(obj, exam, folder, naming) for obj in objects)
    return BuiltPart(written, {}, built - started, time.perf_counter() - built)


def _write(obj: ResultObject, prediction: ExamPrediction, folder: Path, naming: Naming):
    ds = obj.dataset
    if naming is Naming.BY_UID:
        name = f"{obj.kind.value}-{ds.SOPInstanceUID}.dcm"
    elif obj.source_sop_instance_uid is None:
        name = f"{obj.kind.value}.dcm"
    else:
        img = prediction.image(obj.source_sop_instance_uid)
        name = f"{obj.kind.value}_{img.laterality}-{img.view}.dcm"
    path = folder / name
    size = write_atomically(path, partial(ds.save_as, enforce_file_format=True))
    return WrittenObject(
        obj.kind,
        obj.source_sop_instance_uid,
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        path,
        size,
    )


def child_started(parent: int) -> None:
    """In each pool process: freed image buffers are kept for reuse (`plugin.allocator`); the
    parent ends it (Ctrl-C and SIGTERM go to the whole process group, and the parent drains
    first), and it ends itself if the parent dies (kill -9 leaves no orphans)."""
    from plugin.allocator import keep_freed_memory
    from plugin.observability import quiet_pydicom

    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet_pydicom()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
