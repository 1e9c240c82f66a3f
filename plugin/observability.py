"""What operators and the site can see: JSON logs, the audit trail, Prometheus metrics and a
health endpoint.

Logs are for operators and never carry patient identifiers: UIDs appear only as short salted
hashes (`hash_uid`), enough to follow one study through the logs without naming it. The audit
trail (one JSON object a line) is for the site: every instance received, skipped with the
reason, every exam analysed and every object delivered.

Every value written is capped (`cap`), so no input can make a line longer than `MAX_LINE`
characters: a header of hundreds of kilobytes once made a 28 MB audit line. Messages of the
DICOM libraries quote the values they reject ("Invalid value … '19610412'"); those quotes are
redacted before a line is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

_UID_SALT = b"mammo-ai-plugin/uid/v1"

# Fields whose values are DICOM UIDs: hashed wherever they are written.
UID_FIELDS = frozenset({"study", "series", "sop_instance", "result"})

MAX_VALUE = 512
"""Characters kept of one string value in a log line or audit event."""
MAX_ITEMS = 32
"""Items kept of one list value."""
MAX_MESSAGE = 2048
MAX_TRACEBACK = 8192
MAX_LINE = 16384


def cap(text: str, limit: int = MAX_VALUE) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"…[{len(text) - limit} more chars]"
    return text[: max(0, limit - len(note))] + note


# What pydicom and pynetdicom put around a value they reject: "value '…'", "value: '…'",
# "VR DA: '…'", "(UI) '…'".
_QUOTED_VALUE = re.compile(
    r"""((?:value|VR \w\w|\(\w\w\))\s*:?\s*)(['"]).*?\2""", re.IGNORECASE | re.DOTALL
)


def redact_values(text: str) -> str:
    """Library messages with the rejected values taken out."""
    return _QUOTED_VALUE.sub(lambda m: f"{m.group(1)}<redacted>", text)


def hash_uid(uid: str) -> str:
    """A stable 16-hex-digit pseudonym for a UID, for logs and the audit trail."""
    return hashlib.sha256(_UID_SALT + uid.encode()).hexdigest()[:16]


class JsonFormatter(logging.Formatter):
    """One JSON object a line; `extra={"fields": {...}}` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": cap(_clean(record.getMessage()), MAX_MESSAGE),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(_pseudonymise(fields))
        if record.exc_info:
            # Tracebacks quote spool paths, named after the study and SOP Instance UIDs.
            out["exc"] = _clean_traceback(self.formatException(record.exc_info))
        return _bounded_json(out)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, pseudonymised like the JSON ones."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        try:
            line = cap(_clean(super().format(record)), MAX_MESSAGE)
        finally:
            record.exc_info = exc_info
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in _pseudonymise(fields).items())
        if exc_info:
            line += "\n" + _clean_traceback(self.formatException(exc_info))
        return cap(line, MAX_LINE)


def _clean(text: str) -> str:
    return scrub_uids(redact_values(text))


def _clean_traceback(text: str) -> str:
    """Keep the end of a traceback (where the error is), values redacted."""
    text = _clean(text)
    if len(text) > MAX_TRACEBACK:
        text = f"…[{len(text) - MAX_TRACEBACK} chars cut]" + text[-MAX_TRACEBACK:]
    return text


def _bounded_json(out: dict[str, Any]) -> str:
    line = json.dumps(out, default=str)
    if len(line) <= MAX_LINE:
        return line
    # Many fields, each within its cap: shrink them all (tracebacks keep their end), then
    # keep the leading ones that fit.
    out = {k: _shrink(v, 2048 if k == "exc" else 256) for k, v in out.items()}
    kept: dict[str, Any] = {}
    for key, value in out.items():
        kept[key] = value
        if len(json.dumps(kept, default=str)) > MAX_LINE - 64:
            del kept[key]
            kept["truncated"] = True
            break
    return json.dumps(kept, default=str)


def _shrink(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else "…" + value[-limit:]
    if isinstance(value, dict):
        return {k: _shrink(v, limit) for k, v in list(value.items())[:8]}
    if isinstance(value, list):
        return [_shrink(v, limit) for v in value[:8]]
    return value


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs full datasets and UIDs at INFO/DEBUG: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    quiet_pydicom()
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (pynetdicom's reactor on a request it cannot parse)
    goes through the log formatter, capped and redacted, instead of raw to stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("plugin.threads").error(
        "uncaught exception ended a thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"fields": {"thread": cap(name, 64)}},
    )


def quiet_pydicom() -> None:
    """Keep pydicom's value warnings out of logs and the console: they quote the offending
    value ("Invalid value for VR DA: '19610412'"), which may be a birth date or a name.

    They are logged (logger "pydicom") and also raised as Python warnings printed to stderr,
    so both are silenced; process-wide, hence called only by the command line."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\b")


_UID_IN_TEXT = re.compile(r"(?<![\d.])\d+(?:\.\d+){4,}(?!\.?\d)")
_STANDARD_ROOT = "1.2.840.10008."


def scrub_uids(text: str) -> str:
    """Replace instance-specific UIDs inside free text (peer messages, file names) by their
    hashes; DICOM's own UIDs (transfer syntaxes, SOP classes: 1.2.840.10008.*) stay readable."""
    return _UID_IN_TEXT.sub(
        lambda m: m.group(0) if m.group(0).startswith(_STANDARD_ROOT) else hash_uid(m.group(0)),
        text,
    )


def _pseudonymise(fields: dict[str, Any]) -> dict[str, Any]:
    return {str(key)[:64]: _safe_value(str(key), value) for key, value in fields.items()}


def _safe_value(key: str, value: Any) -> Any:
    """UIDs hashed, free text scrubbed and capped, containers bounded."""
    if isinstance(value, str):
        return hash_uid(value) if key in UID_FIELDS else cap(scrub_uids(value))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {str(k)[:64]: _safe_value(str(k), v) for k, v in items}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        out = [_safe_value(key, v) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out.append(f"…[{len(items) - MAX_ITEMS} more]")
        return out
    return cap(scrub_uids(str(value)))


class AuditTrail:
    """Append-only JSON lines; UID fields are hashed like the logs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def record(self, event: str, **fields: Any) -> None:
        line = _bounded_json({"ts": round(time.time(), 3), "event": event, **_pseudonymise(fields)})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class Metrics:
    """The Prometheus series of one service; each service owns its registry."""

    def __init__(self, node: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.node = node
        """Added as a `node` label to every series, so nodes' series stay apart."""
        r = self.registry
        self.instances = Counter(
            "mammo_instances_total",
            "C-STORE requests by outcome (accepted, duplicate, replaced, ignored, refused)",
            ["outcome"],
            registry=r,
        )
        self.ingest_bytes = Counter(
            "mammo_ingest_bytes_total", "Bytes of instances written to the spool", registry=r
        )
        self.associations = Counter(
            "mammo_associations_total", "Associations by outcome", ["outcome"], registry=r
        )
        self.exams = Counter(
            "mammo_exams_total",
            "Exam analyses by outcome (complete, partial, quarantined, skipped, retried)",
            ["outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "mammo_stage_seconds",
            "Latency per stage: receive (one C-STORE), wait (last image to queued), "
            "analyse (one job), of it decode, ensemble and objects (the pipeline's stages, "
            "waits included), deliver (one send), turnaround (last image to results stored)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mammo_queue_depth",
            "Items waiting: collecting exams, queued jobs, pending deliveries, dead letters",
            ["queue"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "mammo_delivery_attempts_total",
            "Delivery attempts by destination and outcome (delivered, retry, dead)",
            ["destination", "outcome"],
            registry=r,
        )
        self.disk_free_bytes = Gauge(
            "mammo_spool_free_bytes", "Free space on the spool filesystem", registry=r
        )

    def set_queues(self, counts: dict[str, dict[str, int]]) -> None:
        self.queue_depth.labels("exams_collecting").set(counts["exams"].get("collecting", 0))
        self.queue_depth.labels("jobs_queued").set(counts["jobs"].get("queued", 0))
        self.queue_depth.labels("deliveries_pending").set(counts["deliveries"].get("pending", 0))
        self.queue_depth.labels("dead_letters").set(counts["deliveries"].get("dead", 0))

    def render(self) -> bytes:
        if self.node is None:
            return generate_latest(self.registry)
        return generate_latest(_Labelled(self.registry, {"node": self.node}))


class _Labelled:
    """A registry's series with extra labels, as `generate_latest` reads them."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family = copy.copy(family)
            family.samples = [
                s._replace(labels={**s.labels, **self.labels}) for s in family.samples
            ]
            yield family


class HealthServer:
    """GET /metrics (Prometheus text) and GET /health (JSON; 200 when healthy, else 503)."""

    def __init__(
        self, host: str, port: int, metrics: Metrics, health: Callable[[], dict[str, Any]]
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    body, ctype, code = outer.metrics.render(), CONTENT_TYPE_LATEST, 200
                elif self.path in ("/health", "/healthz"):
                    report = outer.health()
                    body = json.dumps(report, default=str).encode()
                    ctype, code = "application/json", 200 if report.get("ok") else 503
                else:
                    body, ctype, code = b"not found: try /health or /metrics\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s", format % args)

        self.metrics = metrics
        self.health = health
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
