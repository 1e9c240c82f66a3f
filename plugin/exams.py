"""Exam assembly: turns the instances of a study into an analysis job at the right moment.

An exam closes early when the selection policy finds all four screening views and the study
has been quiet for `settle_seconds`; otherwise after `quiet_seconds` of quiet with what it has
(a partial exam), and at the latest `max_wait_seconds` after its round started. The timers are
computed from the timestamps in the store, never from in-memory state, so an exam that was
waiting when the process stopped closes on time after a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from plugin.config import ExamsConfig
from plugin.observability import AuditTrail, Metrics, hash_uid
from plugin.selection import select_views
from plugin.store import Exam, Instance, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the selection policy made of an exam's instances right now."""

    chosen: dict[str, Instance]
    """One instance per view key ("L-CC", …)."""
    skipped: list[tuple[Instance, str]]
    """Instances not analysed, each with the reason."""
    missing: tuple[str, ...]
    """Screening views with no usable image."""

    @property
    def complete(self) -> bool:
        return not self.missing and bool(self.chosen)

    def summary(self, closed_by: str) -> dict[str, object]:
        """What the job (and later the result objects) record about the selection."""
        return {
            "closed_by": closed_by,
            "chosen": {view: inst.sop_instance_uid for view, inst in sorted(self.chosen.items())},
            "skipped": [
                {"sop_instance_uid": inst.sop_instance_uid, "reason": reason}
                for inst, reason in self.skipped
            ],
            "missing": list(self.missing),
        }


def plan_exam(instances: list[Instance], options: dict[str, object]) -> Plan:
    """Apply the selection policy to the study's current instances. Instances the listener
    already ignored (non-mammography, unusable header) are carried as skipped with their
    reason."""
    ignored = [(i, i.reason or "ignored") for i in instances if i.status == "ignored"]
    candidates = [i for i in instances if i.status == "accepted"]
    selection = select_views(candidates, options)
    return Plan(
        chosen=dict(selection.chosen),
        skipped=ignored + list(selection.skipped),
        missing=tuple(selection.missing),
    )


def closing_reason(exam: Exam, plan: Plan, now: float, config: ExamsConfig) -> str | None:
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
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.on_queued = on_queued
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exams", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a database hiccup must not end assembly
                log.exception("exam assembly pass failed")
            self._stop.wait(self.poll_seconds)

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
        plan = plan_exam(self.store.instances(exam.study_instance_uid), self.config.selection)
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
            plan.summary(reason),
            partial=not plan.complete,
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
