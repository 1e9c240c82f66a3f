"""A first analysis when the worker starts, of a small synthetic exam whose results are thrown
away, so that the first real exam is not the slow one.

A fresh process pays on its first exam for what it does once: torch picks its kernels and
starts its OpenMP team, highdicom reads the standard's tables (JSON) when it first checks an
object, the allocator grows its heap, pool processes import their modules (and on a GPU, CUDA
sets up its context and cuDNN its plans). On 2 CPUs with the demo models that made the first
3328x2560 exam 1.1 s slower than the next ones (3.0 s against 1.9 s), the whole of
`bench/pipeline.py`'s lone p95. The warm-up exam goes through the worker's own pipeline, so
every stage, pool and output kind is warmed; the models' inputs have a fixed size, so a small
exam warms the forwards of a full-size one.

The worker claims no job until the warm-up is over, so exams that arrive meanwhile wait in the
store (`worker.warm_up: false` starts claiming at once). A warm-up that fails is logged and
changes nothing else: the first exam then pays as before.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from plugin.pipeline import ExamRequest, Naming, Outcome, Pipeline

log = logging.getLogger(__name__)

ROWS, COLS = 512, 416
"""The synthetic exam's images: small to make, a breast the crop stages find."""
TIMEOUT_SECONDS = 600.0
"""After this the worker claims jobs even though the warm-up has not come back."""


@dataclass
class WarmUp:
    """The tag of the warm-up exam's request: its outcome comes back here (`finish`), never to
    the store."""

    folder: Path
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None

    def request(self) -> ExamRequest:
        """A four-view synthetic exam written into `folder`, its results to go there too."""
        from trainer.synth import synth_exam

        images = self.folder / "images"
        images.mkdir(parents=True)
        files = []
        for n, ds in enumerate(synth_exam(0, rows=ROWS, cols=COLS, malignant=True).datasets):
            path = images / f"{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append((str(ds.SOPInstanceUID), path))
        return ExamRequest(tuple(files), self.folder / "results", Naming.BY_UID, tag=self)

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


def warm_up(pipeline: Pipeline, folder: Path, timeout: float = TIMEOUT_SECONDS) -> float | None:
    """Analyse a synthetic exam through `pipeline` in `folder` (made afresh, removed after);
    the seconds it took, or None when it failed or did not come back within `timeout`.
    `pipeline`'s outcome callback must hand a `WarmUp`-tagged outcome to `WarmUp.finish`."""
    shutil.rmtree(folder, ignore_errors=True)  # left by a process killed while warming up
    started = time.monotonic()
    tag = WarmUp(folder)
    try:
        pipeline.submit(tag.request())
        finished = tag.done.wait(timeout)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the worker
        log.warning("warm-up analysis failed; the first exam will be slower (%s)", exc)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = round(time.monotonic() - started, 3)
    if not finished:  # what it still writes is removed at the next start
        log.warning("warm-up analysis still running after %s s; claiming exams", timeout)
        return None
    if tag.outcome is not None and tag.outcome.error is not None:
        error = tag.outcome.error
        log.warning(
            "warm-up analysis failed; the first exam will be slower (%s)", type(error).__name__
        )
        return None
    log.info("warm-up analysis done", extra={"fields": {"seconds": seconds}})
    return seconds
