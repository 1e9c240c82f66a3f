"""Exam assembly: turns the instances of a study into an analysis job at the right moment.

An exam closes early when the selection policy finds all four screening views and the study
has been quiet for `settle_seconds`; otherwise after `quiet_seconds` of quiet with what it has
(a partial exam), and at the latest `max_wait_seconds` after its round started. The timers are
computed from the timestamps in the store, never from in-memory state, so an exam that was
waiting when the process stopped closes on time after a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from plugin.config import ExamsConfig
from plugin.observability import AuditTrail, Metrics, hash_uid
from plugin.polling import PollingThread
from plugin.selection import Selection, SelectionPolicy, SelectionRecord, select_views
from plugin.store import Exam, Instance, Store

log = logging.getLogger(__name__)


def plan_exam(instances: list[Instance], policy: SelectionPolicy) -> Selection[Instance]:
    """Apply the selection policy to the study's current instances. Instances the listener
    already ignored (non-mammography, unusable header) are carried as skipped with their
    reason."""
    ignored = [(i, i.reason or "ignored") for i in instances if i.status == "ignored"]
    selection = select_views([i for i in instances if i.status == "accepted"], policy)
    return replace(selection, skipped=ignored + selection.skipped)


def closing_reason(
    exam: Exam, plan: Selection[Instance], now: float, config: ExamsConfig
) -> str | None:
    """Why the exam should be analysed now, or None to keep waiting."""
    quiet_for = now - exam.last_seen
    if plan.complete and quiet_for >= config.settle_seconds:
        return "complete"
    if quiet_for >= config.quiet_seconds:
        return "quiet timeout"
    if now - exam.round_started >= config.max_wait_seconds:
        return "maximum wait"
    return None


class Assembler:
    """Polls the collecting exams and queues a job for each one that is due."""

    def __init__(
        self,
        config: ExamsConfig,
        store: Store,
        *,
        audit: AuditTrail,
        metrics: Metrics,
        on_queued: Callable[[], None] | None = None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.config = config
        self.policy = SelectionPolicy.from_mapping(config.selection)
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.on_queued = on_queued
        self._poller = PollingThread(
            "exams", self.run_once, poll_seconds, log=log, failure="exam assembly pass failed"
        )

    def start(self) -> None:
        self._poller.start()

    @property
    def alive(self) -> bool:
        return self._poller.alive

    def stop(self, timeout: float = 10.0) -> None:
        self._poller.stop(timeout)

    def run_once(self, now: float | None = None) -> int:
        """One pass; returns how many exams were closed (queued or skipped)."""
        now = time.time() if now is None else now
        closed = 0
        for exam in self.store.collecting_exams():
            try:
                closed += self._consider(exam, now)
            except Exception:  # noqa: BLE001 - one bad exam must not block the others
                log.exception(
                    "exam assembly failed", extra={"fields": {"study": exam.study_instance_uid}}
                )
        return closed

    def _consider(self, exam: Exam, now: float) -> int:
        plan = plan_exam(self.store.instances(exam.study_instance_uid), self.policy)
        reason = closing_reason(exam, plan, now, self.config)
        if reason is None:
            return 0
        fields = {"study": exam.study_instance_uid, "closed_by": reason}
        # `seen`: an image recorded after `instances()` was read keeps the round open rather
        # than being left out of this job (or out of the decision to skip the exam).
        if not plan.chosen:
            why = "; ".join(sorted({r for _, r in plan.skipped})) or "no analysable image"
            if not self.store.skip_exam(exam.id, why, seen=exam.last_seen):
                return 0
            self.metrics.exams.labels("skipped").inc()
            self.audit.record("exam_skipped", reason=why, **fields)
            log.info("exam skipped", extra={"fields": {**fields, "reason": why}})
            return 1
        job = self.store.queue_job(
            exam.id,
            [inst.id for inst in plan.chosen.values()],
            SelectionRecord.of(plan, reason),
            seen=exam.last_seen,
            now=now,
        )
        if job is None:
            return 0
        self.metrics.stage_seconds.labels("wait").observe(max(0.0, now - exam.last_seen))
        self.audit.record(
            "exam_queued",
            version=job.version,
            views=sorted(plan.chosen),
            missing=list(plan.missing),
            skipped=[
                {"sop_instance": hash_uid(i.sop_instance_uid), "reason": r} for i, r in plan.skipped
            ],
            **fields,
        )
        log.info(
            "exam queued",
            extra={"fields": {**fields, "version": job.version, "missing": list(plan.missing)}},
        )
        if self.on_queued is not None:
            self.on_queued()
        return 1
