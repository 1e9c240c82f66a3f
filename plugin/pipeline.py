"""The one analysis path: decode → ensemble → result objects → durable files, many exams in
flight, for the service's worker and `plugin run` alike.

    pipeline = Pipeline(ensemble, settings, on_outcome=commit)
    pipeline.submit(ExamRequest(files, folder, Naming.BY_UID, tag=job))
    ...
    pipeline.close()

Stages are joined by queues that the in-flight limit bounds (`submit` blocks while
`settings.in_flight` exams are between submission and outcome; `wait_for_room` lets a caller
claim work only as room frees):

- decode, in a process pool (`decode_processes`; 0: a thread of this process), an image a
  task, so that the pool's processes decode one exam's images side by side;
- the ensemble, in one thread of this process: it takes whatever exams are decoded, up to
  `max_batch` images or `max_batch_wait_ms`, and scores them in one `predict_exams` call, so
  that forwards batch across exams;
- result objects built and written durably (atomic, fsync'd) in a process pool
  (`output_processes`; 0: two threads, and the SRs in one process of their own), in parts
  (the SRs, then each view's objects) that the pool's processes build side by side, so a
  lone exam's objects take a fraction of the time;
- outcomes, one exam at a time, on one thread: `on_outcome` (the worker commits the exam's
  objects and deliveries there, in one transaction).

An image that fails in any stage is left out with its reason and the exam goes round again
without it (`plugin.isolation`); an exam with no usable image ends in `NoUsableImage`; any
other failure is the outcome's `error`. Nothing here is durable state: the caller's store
is, so a process killed anywhere re-runs its unfinished exams, and the result UIDs (derived
from the inputs and the models) and file names are the same the second time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pydicom

from models.ensemble import Ensemble
from models.mammogram import Mammogram
from models.results import ExamPrediction
from plugin.decoding import Decoded, decode
from plugin.isolation import LeftOut, NoUsableImage, predict_isolated
from plugin.object_output import (
    PIXELS_APART,
    BuiltPart,
    Naming,
    WrittenObject,
    build_and_write,
    child_started,
    object_parts,
)
from plugin.outputs import DEFAULT_KINDS, EXAM_LEVEL, OutputKind, OutputOptions
from plugin.outputs.common import ordered_images
from plugin.shared_payload import SharedPayload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    decode_processes: int = 0
    output_processes: int = 0
    in_flight: int = 4
    """Exams between `submit` and their outcome."""
    max_batch: int = 8
    """Images gathered into one `predict_exams` call."""
    max_batch_wait_ms: float = 0.0
    kinds: tuple[OutputKind, ...] = DEFAULT_KINDS
    options: OutputOptions = field(default_factory=OutputOptions)

    @property
    def keep_pixels(self) -> bool:
        """Only the heat-map needs the source pixels after decoding."""
        return OutputKind.SC in self.kinds

    @property
    def native_pixels(self) -> bool:
        """Kept source pixels travel between processes (decode or output pool): store them
        decoded, or the heat-map decodes them again (`plugin.decoding.decode`)."""
        return self.keep_pixels and (self.decode_processes > 0 or self.output_processes > 0)


@dataclass(frozen=True)
class ExamRequest:
    files: tuple[tuple[str, Path], ...]
    """(key, path) of the exam's chosen images; decode failures are reported by key."""
    folder: Path
    """Where the exam's objects are written."""
    naming: Naming = Naming.BY_UID
    tag: Any = None
    """The caller's handle (a job, a study), returned with the outcome."""


@dataclass(frozen=True)
class StageTimes:
    """Where one exam's time went, in seconds of wall time: each stage from the moment the
    exam was handed to it, waits for a free process or a batch included, so the stages add up
    to the exam's time from submission to outcome. An exam that went round again without some
    images adds its later rounds to the same stages."""

    decode: float = 0.0
    """Reading and decoding the images (and waiting for a decode process)."""
    ensemble: float = 0.0
    """Waiting for a batch, then the ensemble's call that scored it: preprocessing, forward
    passes and post-processing of every image in the batch."""
    objects: float = 0.0
    """Handing the exam to the output stage, building its objects and writing them."""
    build: float = 0.0
    """Building the objects, summed over the parts built side by side (so it can exceed
    `objects`), measured where they were built."""
    write: float = 0.0
    """Writing them durably (encoding included), summed like `build`."""


@dataclass(frozen=True)
class Outcome:
    request: ExamRequest
    prediction: ExamPrediction | None
    objects: tuple[WrittenObject, ...]
    left_out: tuple[LeftOut, ...]
    error: BaseException | None
    """None: analysed (maybe without some images); `NoUsableImage`: retrying cannot help;
    anything else: the attempt failed as a whole."""
    started: float
    """`time.monotonic()` at submission."""
    times: StageTimes = StageTimes()


@dataclass
class _Exam:
    """One exam on its way through the stages."""

    request: ExamRequest
    started: float
    mammograms: list[Mammogram] = field(default_factory=list)
    sources: dict[str, pydicom.Dataset] = field(default_factory=dict)
    left_out: list[LeftOut] = field(default_factory=list)
    prediction: ExamPrediction | None = None
    passed_on: bool = False
    """Handed to the output stage or to the outcomes (so a stage's failure fails it once)."""
    stage: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Seconds so far per `StageTimes` field."""
    since: float = 0.0
    """`time.monotonic()` when the exam entered its current stage."""

    def leaves(self, stage: str) -> None:
        """The exam leaves `stage` (its time there is added) for the next one."""
        now = time.monotonic()
        self.stage[stage] += now - self.since
        self.since = now

    def drop(self, bad: Mapping[str, str], stage: str) -> None:
        self.left_out += [LeftOut(uid, stage, reason) for uid, reason in bad.items()]
        self.mammograms = [m for m in self.mammograms if m.sop_instance_uid not in bad]


class Pipeline:
    def __init__(
        self,
        ensemble: Ensemble,
        settings: Settings,
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self.ensemble = ensemble
        self.settings = settings
        self.on_outcome = on_outcome
        self._decoders = _Pool("decode", settings.decode_processes)
        self._builders = _Pool("output", settings.output_processes, threads=OUTPUT_THREADS)
        self._exam_level_builders = (
            _Pool("exam-level output", 1)
            if settings.output_processes == 0 and any(k in EXAM_LEVEL for k in settings.kinds)
            else self._builders
        )
        # Every queue holds at most the exams in flight, so none needs a bound of its own.
        self._decoded: queue.Queue[_Exam] = queue.Queue()
        self._done: queue.Queue[tuple[_Exam, list[Future] | BaseException]] = queue.Queue()
        self._room = threading.Condition()
        self._in_flight = 0
        self._decoding = 0
        """Exams submitted and not yet decoded: those a batch may still wait for."""
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._ensemble_stage, name="ensemble", daemon=True),
            threading.Thread(target=self._outcome_stage, name="outcomes", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the caller's side -----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def wait_for_room(self, timeout: float) -> bool:
        """True once another exam may be submitted without blocking."""
        with self._room:
            return self._room.wait_for(
                lambda: self._in_flight < self.settings.in_flight, timeout=timeout
            )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once every submitted exam has had its outcome."""
        with self._room:
            return self._room.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    def submit(self, request: ExamRequest) -> None:
        """Start one exam; blocks while the pipeline holds as many as it may."""
        with self._room:
            self._room.wait_for(lambda: self._in_flight < self.settings.in_flight)
            self._in_flight += 1
        now = time.monotonic()
        exam = _Exam(request, now, since=now)
        read = partial(
            decode, keep_pixels=self.settings.keep_pixels, native_pixels=self.settings.native_pixels
        )
        futures: list[Future] = []
        with self._room:
            self._decoding += 1
        try:  # one task per image, so that the pool's processes decode an exam side by side
            futures += [self._decoders.submit(read, (file,)) for file in request.files]
        except BaseException as exc:  # noqa: BLE001 - the exam's outcome carries it
            self._done.put((exam, exc))
            self._decode_ended()
            return
        _when_all(futures, partial(self._decoded_all, exam))

    def close(self, timeout: float | None = None) -> bool:
        """Let the exams in flight reach their outcomes (at most `timeout` seconds), then stop
        the stages and their processes. False when some were still in flight: their work
        is lost with this process, as in a crash, and the caller's store re-runs it."""
        drained = self.wait_idle(timeout)
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._decoders.shutdown()
        self._builders.shutdown()
        if self._exam_level_builders is not self._builders:
            self._exam_level_builders.shutdown()
        return drained

    # -- stages ------------------------------------------------------------------------------

    def _decoded_all(self, exam: _Exam, futures: list[Future]) -> None:
        parts: list[Decoded] = []
        for future in futures:
            try:
                parts.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - a broken pool fails this attempt only
                self._done.put((exam, exc))
                self._decode_ended()
                return
        exam.leaves("decode")
        exam.mammograms = [m for d in parts for m in d.mammograms]
        exam.sources = {uid: ds for d in parts for uid, ds in d.datasets.items()}
        exam.left_out = [LeftOut(key, "decode", why) for d in parts for key, why in d.failed]
        self._decoded.put(exam)
        self._decode_ended()

    def _decode_ended(self) -> None:
        """An exam has left the decode stage (after it is queued on: a batch waiting for it
        must find it there)."""
        with self._room:
            self._decoding -= 1

    def _ensemble_stage(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            try:
                self._score(batch)
            except Exception as exc:  # noqa: BLE001 - the stage outlives one batch
                log.exception("the ensemble stage failed a batch")
                for exam in batch:
                    if not exam.passed_on:
                        self._fail(exam, exc)

    def _next_batch(self) -> list[_Exam]:
        """The decoded exams up to `max_batch` images, waiting `max_batch_wait_ms` at most
        for more once the first is there, while some exam is still being decoded (a lone exam
        is scored at once)."""
        try:
            batch = [self._decoded.get(timeout=0.2)]
        except queue.Empty:
            return []
        images = len(batch[0].mammograms)
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000
        while images < self.settings.max_batch and (self._decoding or not self._decoded.empty()):
            try:
                exam = self._decoded.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            batch.append(exam)
            images += len(exam.mammograms)
        return batch

    def _score(self, batch: list[_Exam]) -> None:
        usable = []
        for exam in batch:
            if exam.mammograms:
                usable.append(exam)
            else:
                self._fail(exam, NoUsableImage(exam.left_out))
        if not usable:
            return
        try:
            predictions = self.ensemble.predict_exams([e.mammograms for e in usable])
        except Exception:  # noqa: BLE001 - find the exams, and in them the images, at fault
            log.warning("a batch of exams failed in the ensemble; scoring them one at a time")
            predictions = [None] * len(usable)
        for exam, prediction in zip(usable, predictions, strict=True):
            if prediction is None:
                try:
                    prediction, left_out = predict_isolated(
                        self.ensemble.predict_exam, exam.mammograms
                    )
                except Exception as exc:  # noqa: BLE001 - NoUsableImage, or the job's fault
                    if isinstance(exc, NoUsableImage):
                        exam.left_out += exc.left_out
                        exc = NoUsableImage(exam.left_out)
                    self._fail(exam, exc)
                    continue
                exam.left_out += left_out
                analysed = {i.sop_instance_uid for i in prediction.images}
                exam.mammograms = [m for m in exam.mammograms if m.sop_instance_uid in analysed]
            exam.prediction = prediction
            exam.leaves("ensemble")
            self._build(exam)

    def _build(self, exam: _Exam) -> None:
        """Hand the exam's objects to the output stage in parts (`object_parts`), which the
        pool's processes build side by side; the outcome stage gets them once all are done.
        A process pool receives the prediction (once for all per-view parts) and each part's
        sources through shared memory (`SharedPayload`). The exam-level part reads no maps:
        it gets the prediction without them (`ExamPrediction.without_maps`), so a process
        building the SRs is not handed 70 MB an exam (on 2 CPUs that copy made a lone exam's
        objects take 0.61 s against 0.50 s without it)."""
        assert exam.prediction is not None
        payloads: list[SharedPayload] = []

        def shared(value: Any, **kwargs: Any) -> SharedPayload:
            payloads.append(SharedPayload(value, **kwargs))
            return payloads[-1]

        futures: list[Future] = []
        try:
            per_view = shared(exam.prediction)
            for part in object_parts(exam.prediction, self.settings.kinds):
                if part.views:
                    pool, prediction = self._builders, per_view
                else:  # the one exam-level part
                    pool = self._exam_level_builders
                    prediction = shared(exam.prediction.without_maps())
                sources = shared(part.sources(exam.sources), reducers=PIXELS_APART)
                futures.append(
                    pool.submit(
                        build_and_write,
                        prediction,
                        sources,
                        part.kinds,
                        self.settings.options,
                        exam.request.folder,
                        exam.request.naming,
                        part.views,
                    )
                )
        except BaseException as exc:  # noqa: BLE001
            for future in futures:
                future.cancel()
            _when_all(futures, lambda _: _release(payloads))
            self._fail(exam, exc)
            return
        exam.passed_on = True

        def built(done: list[Future]) -> None:
            _release(payloads)
            self._done.put((exam, done))

        _when_all(futures, built)

    def _fail(self, exam: _Exam, error: BaseException) -> None:
        exam.passed_on = True
        self._done.put((exam, error))

    def _outcome_stage(self) -> None:
        while not self._stop.is_set():
            try:
                exam, result = self._done.get(timeout=0.2)
            except queue.Empty:
                continue
            outcome = self._outcome(exam, result)
            if outcome is None:
                continue  # back to the ensemble without the images whose objects failed
            try:
                self.on_outcome(outcome)
            except Exception:  # noqa: BLE001 - the caller's store re-runs the exam
                log.exception("recording an exam's outcome failed")
            finally:
                with self._room:
                    self._in_flight -= 1
                    self._room.notify_all()

    def _outcome(self, exam: _Exam, result: list[Future] | BaseException) -> Outcome | None:
        def outcome(objects=(), error=None) -> Outcome:
            return Outcome(
                exam.request,
                None if error else exam.prediction,
                tuple(objects),
                tuple(exam.left_out),
                error,
                exam.started,
                StageTimes(**exam.stage),
            )

        if isinstance(result, BaseException):
            return outcome(error=result)
        exam.leaves("objects")
        parts: list[BuiltPart] = []
        error: BaseException | None = None
        for future in result:
            try:
                parts.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - the attempt fails, the stages go on
                error = error or exc
        exam.stage["build"] += sum(p.build_seconds for p in parts)
        exam.stage["write"] += sum(p.write_seconds for p in parts)
        failed = {uid: why for p in parts for uid, why in p.failed.items()}
        written = [o for p in parts for o in p.objects]
        if error is None and not failed:
            return outcome(sorted(written, key=_object_order(exam.prediction)))
        # An attempt that fails leaves none of its objects behind: the next one may not
        # make the same (without an image, the exam's result UIDs change).
        for o in written:
            o.path.unlink(missing_ok=True)
        if error is not None:
            return outcome(error=error)
        exam.drop(failed, "output")
        log.warning("left images out of an exam", extra={"fields": {"images": len(failed)}})
        if not exam.mammograms:
            return outcome(error=NoUsableImage(exam.left_out))
        exam.prediction, exam.passed_on = None, False
        exam.since = time.monotonic()
        self._decoded.put(exam)
        return None


def _when_all(futures: list[Future], then: Callable[[list[Future]], None]) -> None:
    """`then(futures)` once every one of them is done (at once for none).

    Each future keeps its callback, so a callback that held the futures (and, through
    `then`, the exam with its pixels and maps) would be a reference cycle, freed only when the
    cyclic garbage collector next ran: hundreds of MB per exam piled up, and each new exam's
    buffers were page-faulted afresh. The last callback lets go of both."""
    if not futures:
        then(futures)
        return
    waiting: dict[str, Any] = {"futures": futures, "then": then, "remaining": len(futures)}
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            waiting["remaining"] -= 1
            if waiting["remaining"]:
                return
            done, after = waiting.pop("futures"), waiting.pop("then")
        after(done)

    for future in futures:
        future.add_done_callback(one_done)


def _release(payloads: list[SharedPayload]) -> None:
    for payload in payloads:
        payload.release()


def _object_order(prediction: ExamPrediction) -> Callable[[WrittenObject], tuple[int, int]]:
    """The order `build_isolated` gives one exam's objects: by kind, then hanging order."""
    kinds = {k: n for n, k in enumerate(OutputKind)}
    views = {i.sop_instance_uid: n for n, i in enumerate(ordered_images(prediction))}
    return lambda o: (kinds[o.kind], views.get(o.source_sop_instance_uid or "", -1))


# -- process pools ------------------------------------------------------------------------------


OUTPUT_THREADS = 2
"""Threads that build the per-view objects when the output stage has no processes (below 4
CPUs): numpy, the heat-map's JPEG encoder (`plugin.outputs.jpeg`) and the SEG's JPEG-LS
encoder (`plugin.outputs.jpegls`) release the GIL, so one view's heat-map overlaps another's
SEG (highdicom and pydicom's writer hold it). The exam-level SRs are pure Python, which held
the GIL against the views: they are built in one process of their own (torch-free,
`plugin.object_output`), which gets the prediction without its maps; on 2 CPUs a lone exam's
objects took 0.48 s against 0.59 s with the SRs in the threads."""


class _Pool:
    """A process pool (or, for 0 processes, `threads` threads) that is started again when a
    process of it dies (killed for memory, a codec crash): the exams it held fail their
    attempt, the next ones run."""

    def __init__(self, name: str, processes: int, threads: int = 1) -> None:
        self.name = name
        self.processes = processes
        self.threads = threads
        self._lock = threading.Lock()
        self._executor = self._new()

    def _new(self) -> Executor:
        if self.processes == 0:
            return ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
        executor = ProcessPoolExecutor(
            self.processes,
            mp_context=get_context("spawn"),  # no fork of a process running torch threads
            initializer=child_started,
            initargs=(os.getpid(),),
        )
        # Start the processes now (each imports pydicom, highdicom and the codecs, about a
        # second), not when the first exam arrives.
        executor.submit(os.getpid)
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with self._lock:
            try:
                return self._executor.submit(fn, *args)
            except BrokenProcessPool:
                log.error("a %s process died; starting the pool again", self.name)
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new()
                return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)


def settings_for(config: Any, kinds: Sequence[OutputKind], options: OutputOptions) -> Settings:
    """The pipeline a service config asks for."""
    worker, models = config.worker, config.models
    return Settings(
        decode_processes=worker.decoders,
        output_processes=worker.builders,
        in_flight=worker.in_flight(models.max_batch),
        max_batch=models.max_batch,
        max_batch_wait_ms=models.max_batch_wait_ms,
        kinds=tuple(kinds),
        options=options,
    )
