"""The service: the roles a process runs (listener, assembler, worker, dispatcher; all by
default), the store they share, and the health/metrics endpoint.

Start-up order makes the listener the last thing to open, so nothing is acknowledged before
the models are loaded and every destination has a sender. SIGTERM (or SIGINT) drains: stop
accepting associations and let those in progress finish, let the running analysis commit, let
the sends in progress settle, then close the database. Whatever was still queued stays in the
database and continues at the next start, here or on another node.

Across nodes (PostgreSQL store, shared spool): a heartbeat thread renews the leases this
process holds and returns to the queue the rows of processes whose leases ran out; the
assembler runs only while this process holds the assembler's advisory lock, so exactly one is
active and a standby takes over when it dies.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from plugin.config import Config
from plugin.exams import Assembler
from plugin.observability import AuditTrail, HealthServer, Metrics
from plugin.store import Store
from plugin.store_db import ASSEMBLER_LOCK, Database

log = logging.getLogger(__name__)

ROLES = ("listener", "assembler", "worker", "dispatcher")


class NodeAuditTrail(AuditTrail):
    """The audit trail with the node that did each thing (several nodes may share it)."""

    def __init__(self, path: Any, node: str) -> None:
        super().__init__(path)
        self.node = node

    def record(self, event: str, **fields: Any) -> None:
        super().record(event, node=self.node, **fields)


class Service:
    def __init__(
        self, config: Config, *, roles: Sequence[str] = ROLES, claimant: str | None = None
    ) -> None:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown or not roles:
            raise ValueError(
                f"unknown role(s) {', '.join(unknown) or '(none given)'}; roles are "
                + ", ".join(ROLES)
            )
        self.config = config
        self.roles = tuple(r for r in ROLES if r in roles)
        self.node = claimant or config.node.name
        self.metrics = Metrics(node=self.node)
        self.audit = NodeAuditTrail(config.observability.audit_log, self.node)
        self.store = Store.open(
            config.storage, claimant=self.node, lease_seconds=config.storage.lease_seconds
        )
        self.store.register(self.roles)
        self.listener: Any = None
        self.http: HealthServer | None = None
        self.port: int | None = None
        self.worker: Any = None
        self.dispatcher: Any = None
        self.assembler: Assembler | None = None
        self._assembler_lock: Database | None = None
        self._stopped = threading.Event()
        self._started_at = time.time()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

        if "worker" in self.roles or "dispatcher" in self.roles:
            recovered = self.store.recover(config.worker.max_attempts)
            if any(recovered.values()):
                log.info("recovered work from the last run", extra={"fields": recovered})
                self.audit.record("recovered", **recovered)

        if "dispatcher" in self.roles:
            from plugin.delivery import make_sender
            from plugin.dispatcher import Dispatcher

            senders = {r.name: make_sender(r.destination) for r in config.destinations}
            self.dispatcher = Dispatcher(
                config.delivery,
                self.store,
                senders,
                audit=self.audit,
                metrics=self.metrics,
                batch=config.delivery.batch_size,
            )
        if "worker" in self.roles:
            from models.ensemble import Ensemble
            from plugin.config import ensemble_spec
            from plugin.worker import Worker

            self.ensemble = Ensemble(ensemble_spec(config.models))
            self.worker = Worker(
                config,
                self.store,
                self.ensemble,
                audit=self.audit,
                metrics=self.metrics,
                on_results=self.dispatcher.wake if self.dispatcher else None,
            )
        if "assembler" in self.roles:
            self.assembler = Assembler(
                config.exams,
                self.store,
                audit=self.audit,
                metrics=self.metrics,
                on_queued=self.worker.wake if self.worker else None,
            )

    @property
    def beat_seconds(self) -> float:
        return max(0.2, self.config.storage.lease_seconds / 4)

    def start(self) -> None:
        if self.dispatcher:
            self.dispatcher.start()
        if self.worker:
            self.worker.start()
        self._heartbeat.start()
        self._hold_assembler()
        if "listener" in self.roles:
            from plugin.listener import Listener

            self.listener = Listener(
                self.config.listener,
                self.store,
                min_free_bytes=self.config.storage.min_free_mb * 2**20,
                audit=self.audit,
                metrics=self.metrics,
                late_images=self.config.exams.late_images,
            )
            self.port = self.listener.start()
        obs = self.config.observability
        if obs.http_port is not None:
            self.http = HealthServer(obs.http_host, obs.http_port, self.metrics, self.health)
            self.http.start()
        self.refresh_gauges()
        self.audit.record(
            "started",
            roles=list(self.roles),
            port=self.port,
            ae_title=self.config.listener.ae_title,
        )

    def _beat(self) -> None:
        """Renew leases, take back expired ones, and hold (or wait for) the assembler lock."""
        while not self._stopped.wait(self.beat_seconds):
            try:
                self.store.heartbeat(self.roles)
                if self.worker or self.dispatcher:
                    taken = self.store.reclaim(self.config.worker.max_attempts)
                    if any(taken.values()):
                        log.warning("took back expired leases", extra={"fields": taken})
                        self.audit.record("leases_taken_back", **taken)
                        if self.worker:
                            self.worker.wake()
                        if self.dispatcher:
                            self.dispatcher.wake()
                self._hold_assembler()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the heartbeat
                log.exception("heartbeat failed")

    def _hold_assembler(self) -> None:
        if self.assembler is None or self._assembler_lock is not None:
            return
        lock = self.store.try_singleton(ASSEMBLER_LOCK)
        if lock is None:
            return
        if self._stopped.is_set():
            lock.close()
            return
        self._assembler_lock = lock
        log.info("this process is the active assembler")
        self.audit.record("assembler_active")
        self.assembler.start()

    def refresh_gauges(self) -> None:
        self.metrics.set_queues(self.store.counts())
        self.metrics.disk_free_bytes.set(shutil.disk_usage(self.store.spool).free)

    def health(self) -> dict[str, Any]:
        """Liveness of each role this process runs, queue depths and free disk; `ok` is what
        /health's status code reflects. A standby assembler (another node holds the lock) is
        healthy."""
        free = shutil.disk_usage(self.store.spool).free
        parts: dict[str, bool] = {}
        if self.listener is not None or "listener" in self.roles:
            parts["listener"] = self.listener is not None and self.listener.running
        if self.assembler is not None:
            parts["assembler"] = self._assembler_lock is None or self.assembler.alive
        if self.worker is not None:
            parts["worker"] = self.worker.alive
        if self.dispatcher is not None:
            parts["dispatcher"] = self.dispatcher.alive
        parts["heartbeat"] = self._heartbeat.is_alive()
        counts = self.store.counts()
        disk_ok = free >= self.config.storage.min_free_mb * 2**20
        return {
            "ok": all(parts.values()) and disk_ok and not self._stopped.is_set(),
            "node": self.node,
            "roles": list(self.roles),
            "assembler": (
                None
                if self.assembler is None
                else ("active" if self._assembler_lock is not None else "standby")
            ),
            "parts": parts,
            "disk_free_mb": free // 2**20,
            "disk_ok": disk_ok,
            "uptime_s": round(time.time() - self._started_at, 1),
            "queues": {
                "exams_collecting": counts["exams"].get("collecting", 0),
                "jobs_queued": counts["jobs"].get("queued", 0),
                "deliveries_pending": counts["deliveries"].get("pending", 0),
                "dead_letters": counts["deliveries"].get("dead", 0),
            },
            "models": (
                [f"{m.name} {m.version}" for m in self.ensemble.models] if self.worker else []
            ),
        }

    def stop(self) -> None:
        """Drain and close; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining")
        steps: dict[str, float] = {}
        for name, part in (
            ("listener", self.listener),
            ("assembler", self.assembler if self._assembler_lock is not None else None),
            ("worker", self.worker),
            ("dispatcher", self.dispatcher),
            ("http", self.http),
        ):
            if part is not None:
                started = time.monotonic()
                part.stop()
                steps[name] = round(time.monotonic() - started, 3)
        self._heartbeat.join(10)
        if self._assembler_lock is not None:
            self._assembler_lock.close()
        log.info("drained", extra={"fields": {"seconds": steps}})
        self.audit.record("stopped")
        self.audit.close()
        try:
            self.store.unregister()
        finally:
            self.store.close()
        log.info("stopped")

    def run_until_signal(self) -> None:
        """Block until SIGTERM/SIGINT, refreshing the queue gauges, then drain."""
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stop.wait(1.0):
                try:
                    self.refresh_gauges()
                except Exception:  # noqa: BLE001 - gauges are best effort
                    log.exception("refreshing gauges failed")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
