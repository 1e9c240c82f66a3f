"""The whole service in one process: listener, store, exam assembly, worker, outbox and the
health/metrics endpoint.

Start-up order makes the listener the last thing to open, so nothing is acknowledged before
the models are loaded and every destination has a sender. SIGTERM (or SIGINT) drains: stop
accepting associations and let those in progress finish, let the running analysis commit, let
the sends in progress settle, then close the database. Whatever was still queued stays in the
database and continues at the next start.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from typing import Any

from models.ensemble import Ensemble
from plugin.config import Config
from plugin.delivery import make_sender
from plugin.dispatcher import Dispatcher
from plugin.exams import Assembler
from plugin.listener import Listener
from plugin.observability import AuditTrail, HealthServer, Metrics
from plugin.store import Store
from plugin.worker import Worker, ensemble_spec

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.audit = AuditTrail(config.observability.audit_log)
        self.store = Store(config.storage.database, config.storage.spool)
        self.listener: Listener | None = None
        self.http: HealthServer | None = None
        self.port: int | None = None
        self._stopped = threading.Event()
        self._started_at = time.time()

        recovered = self.store.recover(config.worker.max_attempts)
        if any(recovered.values()):
            log.info("recovered work from the last run", extra={"fields": recovered})
            self.audit.record("recovered", **recovered)

        self.ensemble = Ensemble(ensemble_spec(config.models))
        senders = {r.name: make_sender(r.destination) for r in config.destinations}
        self.dispatcher = Dispatcher(
            config.delivery,
            self.store,
            senders,
            audit=self.audit,
            metrics=self.metrics,
            batch=config.delivery.batch_size,
        )
        self.worker = Worker(
            config,
            self.store,
            self.ensemble,
            audit=self.audit,
            metrics=self.metrics,
            on_results=self.dispatcher.wake,
        )
        self.assembler = Assembler(
            config.exams,
            self.store,
            audit=self.audit,
            metrics=self.metrics,
            on_queued=self.worker.wake,
        )

    def start(self) -> None:
        self.dispatcher.start()
        self.worker.start()
        self.assembler.start()
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
        self.audit.record("started", port=self.port, ae_title=self.config.listener.ae_title)

    def refresh_gauges(self) -> None:
        self.metrics.set_queues(self.store.counts())
        self.metrics.disk_free_bytes.set(shutil.disk_usage(self.store.spool).free)

    def health(self) -> dict[str, Any]:
        """Liveness of each part, queue depths and free disk; `ok` is what /health's status
        code reflects."""
        free = shutil.disk_usage(self.store.spool).free
        parts = {
            "listener": self.listener is not None and self.listener.running,
            "assembler": self.assembler.alive,
            "worker": self.worker.alive,
            "dispatcher": self.dispatcher.alive,
        }
        counts = self.store.counts()
        disk_ok = free >= self.config.storage.min_free_mb * 2**20
        return {
            "ok": all(parts.values()) and disk_ok and not self._stopped.is_set(),
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
            "models": [f"{m.name} {m.version}" for m in self.ensemble.models],
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
            ("assembler", self.assembler),
            ("worker", self.worker),
            ("dispatcher", self.dispatcher),
            ("http", self.http),
        ):
            if part is not None:
                started = time.monotonic()
                part.stop()
                steps[name] = round(time.monotonic() - started, 3)
        log.info("drained", extra={"fields": {"seconds": steps}})
        self.audit.record("stopped")
        self.audit.close()
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
