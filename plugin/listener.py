"""The DICOM listener: a pynetdicom Verification + Storage SCP that makes each received
instance durable before it says so.

For every C-STORE, pynetdicom streams the PDVs into a temporary file in the spool's
`.incoming` folder (chunked receive, so a 50 MB mammogram is never held in memory); the
handler reads only the header, fsyncs the file, renames it into the spool, commits the row,
and only then answers 0x0000. The bytes are stored as received (compressed stays compressed);
the worker decodes them.

Statuses (the conformance summary in README lists them):
  0x0000  stored, a duplicate of a stored instance, or accepted and ignored (the reason is in
          the audit trail): not a mammography image, unclassifiable header, other storage class
  0xA700  out of resources: spool below the disk watermark, or the spool/database failed
  0xC100  cannot understand: not a parseable DICOM data set
  0xC101  cannot understand: missing or invalid SOP Instance / Study / Series UID
  0xC102  cannot understand: pixel data shorter than Rows × Columns × … in the header
  0xC103  cannot understand: the header claims more pixels than `listener.max_image_pixels`
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from models.mammogram import MammogramError
from models.reading import describe
from plugin.config import ListenerConfig
from plugin.durable import fsync_dir, make_dirs
from plugin.observability import AuditTrail, Metrics
from plugin.selection import acquisition_time
from plugin.store import NewInstance, Recorded, Store

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
NOT_DICOM = 0xC100
BAD_UIDS = 0xC101
TRUNCATED_PIXELS = 0xC102
TOO_LARGE = 0xC103

MAMMOGRAPHY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image Storage",
    "1.2.840.10008.5.1.4.1.1.13.1.4": "Breast Projection X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.13.1.5": "Breast Projection X-Ray Image Storage - For Processing",
}

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_HASH_CHUNK = 1 << 20


class Refused(Exception):
    """A C-STORE we answer with a failure status; the message goes into ErrorComment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    status: int
    outcome: str
    """accepted, duplicate, replaced, ignored or refused (the metric's label)."""
    reason: str | None = None
    event: str | None = None
    """The audit event, reported after the outcome is decided."""
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The audit event's fields (UIDs among them are hashed by the audit trail)."""


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


class Listener:
    """The SCP. `start()` binds and returns; `stop()` stops accepting and waits for the
    associations in progress (each C-STORE either commits or is never acknowledged)."""

    def __init__(
        self,
        config: ListenerConfig,
        store: Store,
        *,
        min_free_bytes: int,
        audit: AuditTrail,
        metrics: Metrics,
        late_images: str = "reanalyse",
    ) -> None:
        self.config = config
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.audit = audit
        self.metrics = metrics
        self.late_images = late_images
        self.incoming = store.spool / ".incoming"
        self.instances_dir = store.spool / "instances"
        self._server: Any = None
        self._ae: AE | None = None
        self._allowed = {(c.ae_title, c.address) for c in config.allowed_callers}
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> int:
        """Start serving in background threads; returns the bound port."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.iterdir():  # never acknowledged: the sender will resend
            stale.unlink(missing_ok=True)
        # pynetdicom writes the streamed data set to a NamedTemporaryFile in the default temp
        # folder; on the spool's filesystem the final rename is atomic.
        tempfile.tempdir = str(self.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True

        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.acse_timeout = cfg.acse_timeout_seconds
        ae.dimse_timeout = cfg.dimse_timeout_seconds
        ae.network_timeout = cfg.network_timeout_seconds
        ae.require_called_aet = True
        ae.add_supported_context(Verification, cfg.transfer_syntaxes)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, cfg.transfer_syntaxes)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._ae = ae
        self._server = ae.start_server(
            (cfg.host, cfg.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
        )
        port = int(self._server.server_address[1])
        log.info(
            "listening",
            extra={
                "fields": {
                    "ae_title": cfg.ae_title,
                    "host": cfg.host,
                    "port": port,
                    "tls": cfg.tls is not None,
                }
            },
        )
        return port

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            ctx.load_verify_locations(tls.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
        return ctx

    @property
    def active_associations(self) -> int:
        return 0 if self._server is None else len(self._server.active_associations)

    @property
    def running(self) -> bool:
        return self._server is not None and not self._stopping.is_set()

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is None:
            return
        self._stopping.set()
        server, self._server = self._server, None
        active = list(server.active_associations)
        server.shutdown()
        deadline = time.monotonic() + timeout
        for assoc in active:
            # Wait for associations that may be transferring; rejected ones that linger until
            # the peer closes (or the ARTIM timer fires) hold nothing of ours.
            if assoc.is_established:
                assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in active:
            if assoc.is_alive():
                if assoc.is_established:
                    log.warning(
                        "aborting an association that did not finish in time",
                        extra={"fields": {"calling_ae": assoc.requestor.ae_title}},
                    )
                assoc.abort()

    # -- association events -------------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Calling-AE (and address) allow-list, checked before negotiation."""
        try:
            if not self._allowed:
                return
            assoc = event.assoc
            calling = assoc.requestor.primitive.calling_ae_title.strip()
            address = assoc.requestor.address
            if (calling, None) in self._allowed or (calling, address) in self._allowed:
                return
            self.audit.record(
                "association_rejected",
                calling_ae=calling,
                address=address,
                reason="calling AE title (and address) not in allowed_callers",
            )
            log.warning(
                "rejected unknown caller",
                extra={"fields": {"calling_ae": calling, "address": address}},
            )
            self.metrics.associations.labels("rejected").inc()
            # Permanent, service user, calling AE title not recognised (PS3.8 9.3.4).
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
        except Exception:  # noqa: BLE001 - a handler must not raise into pynetdicom
            log.exception("allow-list check failed")

    def _on_accepted(self, event: evt.Event) -> None:
        self.metrics.associations.labels("accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections: wrong called AE, too many associations.
        self.metrics.associations.labels("rejected").inc()
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        self.audit.record(
            "association_rejected",
            calling_ae=calling,
            address=event.assoc.requestor.address,
            reason="called AE title not ours, or too many associations",
        )

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    # -- C-STORE ------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        """Never raises: an exception here would reach the sender as 0xC211 ("cannot
        understand", never retried) even for a full disk or a failed audit write."""
        started = time.perf_counter()
        try:
            outcome = self._receive(event)
        except Refused as exc:
            outcome = Outcome(exc.status, "refused", exc.reason)
        except Exception as exc:  # noqa: BLE001 - 0xC211 would tell the sender "never retry"
            log.exception("C-STORE failed; answering out of resources")
            outcome = Outcome(OUT_OF_RESOURCES, "refused", f"store failed: {type(exc).__name__}")
        try:
            self._report(event, outcome, time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - the instance is settled; reporting must not undo it
            log.exception("recording a C-STORE in the audit trail or metrics failed")
        rsp = Dataset()
        rsp.Status = outcome.status
        if outcome.status != 0x0000 and outcome.reason:
            rsp.ErrorComment = outcome.reason[:64]
        return rsp

    def _report(self, event: evt.Event, outcome: Outcome, seconds: float) -> None:
        self.metrics.instances.labels(outcome.outcome).inc()
        self.metrics.stage_seconds.labels("receive").observe(seconds)
        if outcome.outcome == "refused":
            self.audit.record(
                "refused",
                status=f"0x{outcome.status:04X}",
                reason=outcome.reason,
                calling_ae=_calling_ae(event),
                sop_instance=str(event.request.AffectedSOPInstanceUID or ""),
            )
            log.warning(
                "refused instance",
                extra={"fields": {"status": f"0x{outcome.status:04X}", "reason": outcome.reason}},
            )
            return
        if outcome.event is not None:
            self.audit.record(outcome.event, **outcome.fields)
        if outcome.outcome in ("accepted", "replaced", "ignored"):
            message = "ignored instance" if outcome.outcome == "ignored" else "received instance"
            log.info(message, extra={"fields": outcome.fields})

    def _receive(self, event: evt.Event) -> Outcome:
        if self._stopping.is_set():
            raise Refused(OUT_OF_RESOURCES, "service is shutting down; resend later")
        free = shutil.disk_usage(self.store.spool).free
        self.metrics.disk_free_bytes.set(free)
        if free < self.min_free_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                f"spool below disk watermark ({free // 2**20} MB free)",
            )
        src = Path(event.dataset_path)
        header, pixel_offset = _read_header(src)
        sop_uid = header.get("SOPInstanceUID")
        study_uid = header.get("StudyInstanceUID")
        series_uid = header.get("SeriesInstanceUID")
        if not any(k in header for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")):
            raise Refused(NOT_DICOM, "not a DICOM data set (no SOP or Study UID in it)")
        if not (valid_uid(sop_uid) and valid_uid(study_uid) and valid_uid(series_uid)):
            raise Refused(BAD_UIDS, "missing or invalid SOP Instance, Study or Series UID")
        if str(sop_uid) != str(event.request.AffectedSOPInstanceUID):
            raise Refused(BAD_UIDS, "SOPInstanceUID differs from the C-STORE request's")
        sop_class = str(event.request.AffectedSOPClassUID)
        syntax = UID(header.file_meta.TransferSyntaxUID)

        status, reason, description = self._classify(header, sop_class)
        if status == "accepted":
            self._check_pixels(header, syntax, src, pixel_offset)

        # Ignored instances are recorded but not kept (pynetdicom deletes the file): only the
        # kept ones pay for the fsync.
        sha, size = _hash(src, fsync=status == "accepted")
        path: Path | None = None
        if status == "accepted":
            folder = self.instances_dir / str(study_uid)
            make_dirs(folder)
            path = folder / f"{sop_uid}.{sha[:16]}.dcm"
            os.replace(src, path)
            fsync_dir(folder)
            self.metrics.ingest_bytes.inc(size)
        recorded, _ = self.store.record_instance(
            NewInstance(
                sop_instance_uid=str(sop_uid),
                sha256=sha,
                study_instance_uid=str(study_uid),
                series_instance_uid=str(series_uid),
                sop_class_uid=sop_class,
                transfer_syntax_uid=str(syntax),
                size=size,
                path=path,
                calling_ae=_calling_ae(event),
                status=status,
                reason=reason,
                description=description,
            ),
            late_images=self.late_images,
        )
        fields = {
            "study": str(study_uid),
            "sop_instance": str(sop_uid),
            "calling_ae": _calling_ae(event),
            "transfer_syntax": str(syntax),
            "bytes": size,
        }
        if status == "ignored":
            return Outcome(0x0000, "ignored", reason, "skipped", {**fields, "reason": reason})
        if recorded is Recorded.DUPLICATE:
            return Outcome(0x0000, "duplicate", None, "duplicate", fields)
        replaced = recorded is Recorded.REPLACED
        fields = {
            **fields,
            "replaced": replaced,
            "laterality": description.get("laterality"),
            "view": description.get("view"),
        }
        return Outcome(0x0000, "replaced" if replaced else "accepted", None, "received", fields)

    def _classify(self, header: Dataset, sop_class: str) -> tuple[str, str | None, dict[str, Any]]:
        """("accepted" | "ignored", reason, header facts for the selection policy)."""
        if sop_class not in MAMMOGRAPHY_SOP_CLASSES:
            name = UID(sop_class).name if UID(sop_class).is_valid else sop_class
            return "ignored", f"not a mammography image ({name})", {}
        rows, cols = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        frames = int(header.get("NumberOfFrames") or 1)
        if rows * cols * frames > self.config.max_image_pixels:
            raise Refused(
                TOO_LARGE,
                f"header claims {rows}x{cols}x{frames} pixels, above max_image_pixels",
            )
        try:
            desc = describe(header)
        except MammogramError as exc:
            return "ignored", f"unusable mammography header: {exc}", {}
        facts = dataclasses.asdict(desc)
        facts["acquisition"] = acquisition_time(header)
        number = header.get("InstanceNumber")
        facts["instance_number"] = int(number) if number not in (None, "") else None
        return "accepted", None, _jsonable(facts)

    def _check_pixels(self, header: Dataset, syntax: UID, src: Path, offset: int | None) -> None:
        """For uncompressed data, the bytes after the header must hold the pixels it claims
        (a truncated transfer would otherwise reach the worker as a crash)."""
        if syntax.is_deflated:
            return  # offsets are in the inflated stream; the worker checks when it decodes
        if offset is None:
            raise Refused(TRUNCATED_PIXELS, "image has no Pixel Data element")
        if syntax.is_compressed:
            return
        try:
            expected = (
                int(header.Rows)
                * int(header.Columns)
                * int(header.get("SamplesPerPixel") or 1)
                * int(header.get("NumberOfFrames") or 1)
                * int(header.BitsAllocated)
                // 8
            )
        except (AttributeError, TypeError, ValueError):
            raise Refused(TRUNCATED_PIXELS, "Rows, Columns or BitsAllocated missing") from None
        available = src.stat().st_size - offset - 8  # minus the shortest element header
        if available < expected:
            raise Refused(
                TRUNCATED_PIXELS,
                f"pixel data truncated: {max(available, 0)} of {expected} bytes",
            )


def _calling_ae(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:  # noqa: BLE001
        return ""


def _read_header(path: Path) -> tuple[Dataset, int | None]:
    """The data set up to the pixels, and the file offset of the Pixel Data element (None
    when the file has none)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fp:
            header = dcmread(fp, stop_before_pixels=True)
            offset = fp.tell()
            # Touch every element now: a malformed value must fail here, not in the worker.
            for _ in header.iterall():
                pass
    except Exception as exc:  # noqa: BLE001 - any parse failure means "cannot understand"
        raise Refused(NOT_DICOM, f"not a parseable DICOM data set ({type(exc).__name__})") from None
    if "TransferSyntaxUID" not in header.file_meta:
        raise Refused(NOT_DICOM, "no transfer syntax in the file meta")
    return header, (offset if offset < size else None)


def _hash(path: Path, *, fsync: bool) -> tuple[str, int]:
    """SHA-256 and size of the received file (the de-duplication key), read in chunks; with
    `fsync`, its bytes are also forced to disk before it is renamed into the spool."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb+" if fsync else "rb") as fp:  # some systems fsync writable files only
        while chunk := fp.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(fp.fileno())
    return digest.hexdigest(), size


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
