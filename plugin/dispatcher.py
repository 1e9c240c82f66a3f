"""The outbox loop: sends each due (result object, destination) row with that destination's
sender, backs off exponentially on retryable failures and turns the rest into dead letters.

One thread per destination, so a destination that is down (connect timeouts) never delays
the others. A row is claimed (state `sending`) before the send and settled after it; a crash in
between leaves it `sending`, and `Store.recover()` makes it pending again at start-up.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping

from plugin.config import DeliveryConfig
from plugin.delivery import Sender, SendOutcome
from plugin.delivery.backoff import next_delay, should_dead_letter
from plugin.observability import AuditTrail, Metrics
from plugin.polling import PollingThread
from plugin.store import Delivery, Store

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        config: DeliveryConfig,
        store: Store,
        senders: Mapping[str, Sender],
        *,
        audit: AuditTrail,
        metrics: Metrics,
        batch: int = 1,
    ) -> None:
        self.config = config
        self.store = store
        self.senders = dict(senders)
        self.audit = audit
        self.metrics = metrics
        self.batch = batch
        self._pollers = [
            PollingThread(
                f"deliver-{name}",
                functools.partial(self.run_once, name),
                config.poll_seconds,
                log=log,
                failure="delivery pass failed",
                fields={"destination": name},
            )
            for name in self.senders
        ]

    def start(self) -> None:
        for poller in self._pollers:
            poller.start()

    def wake(self) -> None:
        """New rows were queued: look now rather than at the next poll."""
        for poller in self._pollers:
            poller.wake()

    @property
    def alive(self) -> bool:
        return all(p.alive for p in self._pollers)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the sends in progress, then return; pending rows stay for the next start."""
        for poller in self._pollers:
            poller.request_stop()
        deadline = time.monotonic() + timeout
        for poller in self._pollers:
            poller.join(max(0.0, deadline - time.monotonic()))
        for sender in self.senders.values():
            try:
                sender.close()
            except Exception:  # noqa: BLE001 - closing must not hide the shutdown
                log.exception("closing a sender failed")

    def run_once(self, destination: str, *, now: float | None = None) -> int:
        """Send this destination's due rows (one batch); returns how many were attempted."""
        due = self.store.due_deliveries(destination=destination, now=now, limit=self.batch)
        claimed = [d for d in (self.store.claim_delivery(d.id) for d in due) if d is not None]
        if not claimed:
            return 0
        sender = self.senders[destination]
        claimed = self._skip_delivered(sender, claimed)
        if not claimed:
            return 1
        started = time.perf_counter()
        try:
            outcomes = sender.send([d.path for d in claimed])
        except Exception as exc:  # noqa: BLE001 - senders should not raise; treat as transient
            log.exception("sender raised", extra={"fields": {"destination": destination}})
            outcomes = [
                SendOutcome(
                    d.sop_instance_uid,
                    ok=False,
                    retryable=True,
                    detail=f"sender error: {type(exc).__name__}: {exc}",
                )
                for d in claimed
            ]
        elapsed = time.perf_counter() - started
        if len(outcomes) != len(claimed):
            detail = f"sender returned {len(outcomes)} outcomes for {len(claimed)} files"
            outcomes = [SendOutcome(d.sop_instance_uid, False, True, detail) for d in claimed]
        for delivery, outcome in zip(claimed, outcomes, strict=True):
            self.metrics.stage_seconds.labels("deliver").observe(elapsed / len(claimed))
            self._settle(delivery, outcome)
        return len(claimed)

    def _skip_delivered(self, sender: Sender, claimed: list[Delivery]) -> list[Delivery]:
        """Rows sent before (attempts > 1) may have reached the destination even though the
        outcome was never recorded (a crash, a lost response): ask the destination, settle
        what it already holds, and send only the rest. Delivery stays at-least-once; this
        keeps duplicates rare."""
        again = [d for d in claimed if d.attempts > 1]
        if not again:
            return claimed
        try:
            there = sender.present([d.path for d in again])
        except Exception:  # noqa: BLE001 - asking is an optimisation: send when it fails
            log.warning("could not ask the destination what it holds", exc_info=True)
            return claimed
        rest = []
        for d in claimed:
            if d.attempts > 1 and d.sop_instance_uid in there:
                detail = "already at the destination (an earlier attempt reached it); not resent"
                self._settle(d, SendOutcome(d.sop_instance_uid, True, False, detail))
            else:
                rest.append(d)
        return rest

    def _settle(self, delivery: Delivery, outcome: SendOutcome) -> None:
        fields = {
            "destination": delivery.destination,
            "delivery_id": delivery.id,
            "kind": delivery.kind,
            "study": delivery.study_instance_uid,
            "result": delivery.sop_instance_uid,
            "attempt": delivery.attempts,
            "detail": outcome.detail,
        }
        if outcome.ok:
            self.store.delivery_succeeded(delivery.id)
            self.metrics.delivery_attempts.labels(delivery.destination, "delivered").inc()
            self.audit.record("delivered", **fields)
            log.info("delivered", extra={"fields": fields})
            return
        if should_dead_letter(delivery.attempts, self.config.max_attempts, outcome):
            self.store.delivery_failed(delivery.id, outcome.detail, retry_at=None)
            self.metrics.delivery_attempts.labels(delivery.destination, "dead").inc()
            self.audit.record("dead_letter", **fields)
            log.warning(
                "delivery dead-lettered; `plugin retry` requeues it", extra={"fields": fields}
            )
            return
        delay = next_delay(
            delivery.attempts,
            self.config.initial_delay_seconds,
            self.config.multiplier,
            self.config.max_delay_seconds,
            jitter=0.1,
        )
        self.store.delivery_failed(delivery.id, outcome.detail, retry_at=time.time() + delay)
        self.metrics.delivery_attempts.labels(delivery.destination, "retry").inc()
        log.warning(
            "delivery failed; will retry",
            extra={"fields": {**fields, "retry_in_s": round(delay, 1)}},
        )
