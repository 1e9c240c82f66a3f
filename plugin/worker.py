"""The analysis worker: claims exam jobs from the store as the pipeline has room for them.

Each job's selected images go through the analysis pipeline (`plugin.pipeline`: decode,
ensemble batched across exams, result objects written durably into the spool); when an exam's
objects are files, they are recorded with their deliveries in one transaction, the job's one
commit. An image that fails in any stage (decoding, the models, an output builder) is left out
with its reason and the exam is analysed without it, as partial (`plugin.isolation`); an exam
with no usable image is quarantined at once, since trying again cannot help. Any other failure
is retried after `retry_delay_seconds`, at most `max_attempts` times, then the job is
quarantined with the reason; the queue moves on either way.

Jobs are claimed only while the pipeline has room (`worker.max_exams_in_flight`), so a flood of
exams waits in the store, where another node may take it, not in this process's memory. A
process killed at any point leaves its claimed jobs running under its lease: they are queued
again at its restart (or when the lease runs out) and re-run into the same files with the same
result UIDs; nothing is recorded before the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from models.ensemble import Ensemble
from plugin.config import Config
from plugin.durable import remove_temporaries
from plugin.isolation import NoUsableImage
from plugin.observability import AuditTrail, Metrics, cap
from plugin.outputs import OutputOptions
from plugin.outputs.common import OutputKind
from plugin.pipeline import ExamRequest, Naming, Outcome, Pipeline, settings_for
from plugin.polling import PollingThread
from plugin.store import Job, NewResult, Store
from plugin.warm_up import WarmUp, warm_up

log = logging.getLogger(__name__)


class Worker:
    """Claims due jobs in a thread of its own and feeds them to the pipeline; the pipeline's
    outcome thread commits them."""

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
        self.settings = settings_for(config, self.kinds, OutputOptions())
        self.pipeline: Pipeline | None = None
        self._warming = config.worker.warm_up
        self._poller = PollingThread(
            "worker", self._claim, poll_seconds, log=log, failure="claiming a job failed"
        )

    def start(self) -> None:
        self.pipeline = Pipeline(self.ensemble, self.settings, self._commit)
        self._poller.start()

    @property
    def warming_up(self) -> bool:
        """Whether the start's warm-up (`plugin.warm_up`) is still to come or running."""
        return self._warming

    def wake(self) -> None:
        self._poller.wake()

    @property
    def alive(self) -> bool:
        return self._poller.alive and self.pipeline is not None and self.pipeline.alive

    def stop(self, timeout: float = 120.0) -> None:
        """Claim nothing more and let the exams in flight commit; those that do not within
        `timeout` are re-run after a restart (or by another node when the lease runs out)."""
        self._poller.stop(timeout)
        if self.pipeline is not None and not self.pipeline.close(timeout):
            log.warning(
                "stopped with exams in flight; they run again at the next start",
                extra={"fields": {"in_flight": self.pipeline.in_flight}},
            )

    def _claim(self) -> int:
        """One pass of the claiming thread: 1 when it submitted a job, already waited (for
        room in the pipeline) or warmed up (the first pass), so the next pass starts at once;
        0 when nothing was due."""
        assert self.pipeline is not None
        if self._warming:
            # One folder per worker process: a node may run one per device on one spool.
            where = f"{self.config.node.name}-{self.ensemble.device}".replace(":", "-")
            warm_up(self.pipeline, self.store.spool / "warm-up" / where)
            self._warming = False
            return 1
        if not self.pipeline.wait_for_room(self.poll_seconds):
            return 1
        job = self.store.claim_job()
        if job is None:
            return 0
        self._submit(job)
        return 1

    def _submit(self, job: Job) -> None:
        assert self.pipeline is not None
        try:
            instances = self.store.instances_by_id(job.instance_ids)
        except Exception as exc:  # noqa: BLE001 - retried like any failed attempt
            log.exception("reading a job's instances failed", extra={"fields": _fields(job)})
            self._fail(job, f"analysis failed ({type(exc).__name__})", _fields(job), retry=True)
            return
        files = tuple((i.sop_instance_uid, i.path) for i in instances if i.path is not None)
        folder = self.results_dir / job.study_instance_uid / f"v{job.version}"
        remove_temporaries(folder)  # an earlier attempt killed mid-write; the lease is ours now
        self.pipeline.submit(ExamRequest(files, folder, Naming.BY_UID, tag=job))

    def _commit(self, outcome: Outcome) -> None:
        """The pipeline's outcome for one job: its one commit, or a failed attempt."""
        if isinstance(outcome.request.tag, WarmUp):
            outcome.request.tag.finish(outcome)
            return
        job: Job = outcome.request.tag
        fields = _fields(job)
        left_out = [
            {"sop_instance": lo.sop_instance_uid, "stage": lo.stage, "reason": lo.reason}
            for lo in outcome.left_out
        ]
        if isinstance(outcome.error, NoUsableImage):
            reasons = "; ".join(lo.reason for lo in outcome.error.left_out) or "no image files"
            reason = cap(f"no usable image in the exam: {reasons}", 2000)
            self._fail(job, reason, fields, retry=False)
            return
        if outcome.error is not None:
            log.error(
                "analysis failed", exc_info=outcome.error, extra={"fields": fields}
            )  # the type only below: exception messages may quote header values
            self._fail(job, f"analysis failed ({type(outcome.error).__name__})", fields, retry=True)
            return
        prediction = outcome.prediction
        assert prediction is not None
        results = [
            NewResult(
                kind=o.kind.value,
                sop_instance_uid=o.sop_instance_uid,
                sop_class_uid=o.sop_class_uid,
                path=o.path,
                size=o.size,
                destinations=self.routes.get(o.kind, ()),
            )
            for o in outcome.objects
        ]
        try:
            self.store.finish_job(job.id, results)
        except Exception as exc:  # noqa: BLE001 - retried (same UIDs, same files)
            log.exception("recording the results failed", extra={"fields": fields})
            self._fail(job, f"analysis failed ({type(exc).__name__})", fields, retry=True)
            return
        elapsed = time.monotonic() - outcome.started
        self.metrics.stage_seconds.labels("analyse").observe(elapsed)
        for stage in ("decode", "ensemble", "objects"):
            self.metrics.stage_seconds.labels(stage).observe(getattr(outcome.times, stage))
        last_seen = max(
            (i.received_at for i in self.store.instances_by_id(job.instance_ids)),
            default=job.created_at,
        )
        self.metrics.stage_seconds.labels("turnaround").observe(max(0.0, time.time() - last_seen))
        outcome_name = "partial" if prediction.missing_views else "complete"
        self.metrics.exams.labels(outcome_name).inc()
        self.audit.record(
            "analysed",
            outcome=outcome_name,
            seconds=round(elapsed, 3),
            objects=len(results),
            views=sorted(f"{i.laterality}-{i.view}" for i in prediction.images),
            missing=list(prediction.missing_views),
            closed_by=job.selection.closed_by,
            skipped=[
                {"sop_instance": s.sop_instance_uid, "reason": s.reason}
                for s in job.selection.skipped
            ],
            left_out=left_out,
            exam_score=round(float(prediction.malignant), 4),
            **fields,
        )
        log.info(
            "exam analysed",
            extra={"fields": {**fields, "outcome": outcome_name, "seconds": round(elapsed, 3)}},
        )
        if self.on_results is not None:
            self.on_results()

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


def _fields(job: Job) -> dict[str, object]:
    return {
        "study": job.study_instance_uid,
        "job_id": job.id,
        "version": job.version,
        "attempt": job.attempts,
    }
