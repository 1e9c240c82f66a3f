"""The analysis worker: one exam job at a time on the configured device.

A job decodes its selected images, runs the ensemble, builds the result objects each
destination wants, writes them durably into the spool and records them with their deliveries
in one transaction. An image that fails in any stage (decoding, the models, an output builder)
is left out with its reason and the exam is analysed without it, as partial
(`plugin.isolation`); an exam with no usable image is quarantined at once, since trying again
cannot help. Any other failure is retried after `retry_delay_seconds`, at most `max_attempts`
times, then the job is quarantined with the reason; the queue moves on either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from plugin.config import Config, ModelsConfig
from plugin.decoding import decode
from plugin.durable import write_atomically
from plugin.isolation import NoUsableImage, analyse_isolated
from plugin.observability import AuditTrail, Metrics, cap
from plugin.outputs import output_kind
from plugin.outputs.common import OutputKind
from plugin.store import Job, NewResult, Store

log = logging.getLogger(__name__)


class UnanalysableExam(Exception):
    """Nothing in the exam can be analysed; retrying cannot help."""


def ensemble_spec(models: ModelsConfig) -> EnsembleSpec:
    return EnsembleSpec(
        members=tuple(MemberSpec(Path(m.path), tuple(m.flips)) for m in models.members),
        device=models.device,
        precision=models.precision,
        max_batch=models.max_batch,
    )


class Worker:
    """Claims due jobs from the store in a thread of its own; `run_once` is one job, for tests
    and for callers that drive the loop themselves."""

    def __init__(
        self,
        config: Config,
        store: Store,
        ensemble: Ensemble,
        *,
        audit: AuditTrail,
        metrics: Metrics,
        on_results: Callable[[], None] | None = None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.config = config
        self.store = store
        self.ensemble = ensemble
        self.audit = audit
        self.metrics = metrics
        self.on_results = on_results
        self.poll_seconds = poll_seconds
        self.results_dir = store.spool / "results"
        self.kinds: list[OutputKind] = config.output_kinds
        self.routes: Mapping[OutputKind, tuple[str, ...]] = {
            kind: tuple(r.name for r in config.destinations if kind in r.outputs)
            for kind in self.kinds
        }
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 120.0) -> None:
        """Let the job in progress finish (it commits or is retried after a restart)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the pass: a wake during the pass makes the wait return
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - the loop outlives database hiccups
                log.exception("worker pass failed")
                worked = False
            if not worked:
                self._wake.wait(self.poll_seconds)

    def run_once(self) -> bool:
        """Run the next due job, if any; True when one ran."""
        job = self.store.claim_job()
        if job is None:
            return False
        started = time.perf_counter()
        fields = {
            "study": job.study_instance_uid,
            "job_id": job.id,
            "version": job.version,
            "attempt": job.attempts,
        }
        try:
            results, summary = self._analyse(job)
            # Inside the try: a job whose results cannot be recorded is retried (same UIDs,
            # same files) rather than left running until the next restart.
            self.store.finish_job(job.id, results)
        except UnanalysableExam as exc:
            self._fail(job, str(exc), fields, retry=False)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure is retried, then quarantined
            log.exception("analysis failed", extra={"fields": fields})
            # The type only: exception messages may quote header values.
            self._fail(job, f"analysis failed ({type(exc).__name__})", fields, retry=True)
            return True
        elapsed = time.perf_counter() - started
        self.metrics.stage_seconds.labels("analyse").observe(elapsed)
        last_seen = max(
            (i.received_at for i in self.store.instances_by_id(job.instance_ids)),
            default=job.created_at,
        )
        self.metrics.stage_seconds.labels("turnaround").observe(max(0.0, time.time() - last_seen))
        outcome = "partial" if summary["missing"] else "complete"
        self.metrics.exams.labels(outcome).inc()
        self.audit.record(
            "analysed",
            outcome=outcome,
            seconds=round(elapsed, 3),
            objects=len(results),
            **summary,
            **fields,
        )
        log.info(
            "exam analysed",
            extra={"fields": {**fields, "outcome": outcome, "seconds": round(elapsed, 3)}},
        )
        if self.on_results is not None:
            self.on_results()
        return True

    def _analyse(self, job: Job) -> tuple[list[NewResult], dict[str, object]]:
        instances = self.store.instances_by_id(job.instance_ids)
        decoded = decode(
            [(i.sop_instance_uid, i.path) for i in instances if i.path is not None],
            keep_pixels=OutputKind.SC in self.kinds,
        )
        left_out = [(uid, "decode", reason) for uid, reason in decoded.failed]
        try:
            analysis = analyse_isolated(
                self.ensemble.predict_exam, decoded.mammograms, decoded.datasets, self.kinds
            )
        except NoUsableImage as exc:
            left_out += exc.left_out
            reasons = "; ".join(r for _, _, r in left_out) or "no image files"
            raise UnanalysableExam(cap(f"no usable image in the exam: {reasons}", 2000)) from None
        prediction, objects = analysis.prediction, analysis.objects
        left_out += analysis.left_out
        folder = self.results_dir / job.study_instance_uid / f"v{job.version}"
        results = []
        for ds in objects:
            kind = output_kind(ds)
            path = folder / f"{kind.value}-{ds.SOPInstanceUID}.dcm"
            size = write_atomically(path, partial(ds.save_as, enforce_file_format=True))
            results.append(
                NewResult(
                    kind=kind.value,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=path,
                    size=size,
                    destinations=self.routes.get(kind, ()),
                )
            )
        summary = {
            "views": sorted(f"{i.laterality}-{i.view}" for i in prediction.images),
            "missing": list(prediction.missing_views),
            "left_out": [
                {"sop_instance": uid, "stage": stage, "reason": reason}
                for uid, stage, reason in left_out
            ],
            "exam_score": round(float(prediction.malignant), 4),
        }
        return results, summary

    def _fail(self, job: Job, reason: str, fields: dict[str, object], *, retry: bool) -> None:
        retry_at = None
        if retry and job.attempts < self.config.worker.max_attempts:
            retry_at = time.time() + self.config.worker.retry_delay_seconds
        finished = self.store.fail_job(job.id, reason, retry_at=retry_at)
        if retry_at is not None:
            self.metrics.exams.labels("retried").inc()
            log.warning("analysis will be retried", extra={"fields": {**fields, "reason": reason}})
            return
        self.metrics.exams.labels("quarantined").inc()
        self.audit.record("quarantined", reason=reason, exam_state=finished.exam_state, **fields)
        log.error(
            "exam quarantined; `plugin retry --quarantined` requeues it",
            extra={"fields": {**fields, "reason": reason}},
        )
