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
  0xA700  out of resources: spool below the disk watermark, the disk full, or the
          spool/database failed
  0xC100  cannot understand: not a parseable DICOM data set
  0xC101  cannot understand: missing or invalid SOP Instance / Study / Series UID
  0xC102  cannot understand: pixel data shorter than Rows × Columns × … in the header
  0xC103  cannot understand: the header claims more pixels than `listener.max_image_pixels`
  0xC104  cannot understand: an image attribute (Rows, NumberOfFrames, …) with a wrong VR,
          a non-integer or out-of-range value
  0xC105  cannot understand: the bytes are not encoded as the negotiated transfer syntax says

A temporary file lives in the spool's `.incoming` folder only while its C-STORE is in
progress: the handler removes what it did not keep, and every closed connection sweeps files
left by transfers that never completed (a reset, an abort, a request pynetdicom rejected).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from models.header import (
    BREAST_PROJECTION_FOR_PRESENTATION,
    BREAST_PROJECTION_FOR_PROCESSING,
    BREAST_TOMOSYNTHESIS,
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    ImageDescription,
    describe,
)
from models.mammogram import MammogramError
from models.pixels import expected_pixel_bytes
from plugin.admission import (
    BAD_ATTRIBUTE,
    BAD_UIDS,
    NOT_DICOM,
    TOO_LARGE,
    TRUNCATED_PIXELS,
    Refused,
    check_encoding,
    image_integers,
    read_header,
    valid_uid,
)
from plugin.config import ListenerConfig
from plugin.durable import fsync_dir, make_dirs
from plugin.observability import AuditTrail, Metrics, cap
from plugin.store import NewInstance, Recorded, Store

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700

MAMMOGRAPHY_SOP_CLASSES = frozenset(
    {
        MG_FOR_PRESENTATION,
        MG_FOR_PROCESSING,
        BREAST_TOMOSYNTHESIS,
        BREAST_PROJECTION_FOR_PRESENTATION,
        BREAST_PROJECTION_FOR_PROCESSING,
    }
)

_HASH_CHUNK = 1 << 20
_ERROR_COMMENT = 64
"""ErrorComment is LO: at most 64 characters."""
_STALE_MARGIN_SECONDS = 5.0
_SWEEP_SECONDS = 2.0
"""How often the janitor looks for files left by a connection that ended without a close
event (pynetdicom's reactor dies on some malformed requests)."""


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


@dataclass(frozen=True)
class _Admitted:
    """A received data set that passed admission: its identity and what its header says."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    syntax: UID
    status: str
    """"accepted" (kept for analysis) or "ignored" (recorded for the audit only)."""
    reason: str | None
    description: ImageDescription | None


def _outcome(got: _Admitted, recorded: Recorded, calling_ae: str, size: int) -> Outcome:
    """The answer and the audit event for an instance the store has recorded."""
    fields: dict[str, Any] = {
        "study": got.study_uid,
        "sop_instance": got.sop_uid,
        "calling_ae": calling_ae,
        "transfer_syntax": str(got.syntax),
        "bytes": size,
    }
    if got.status == "ignored":
        return Outcome(0x0000, "ignored", got.reason, "skipped", {**fields, "reason": got.reason})
    if recorded is Recorded.DUPLICATE:
        return Outcome(0x0000, "duplicate", None, "duplicate", fields)
    replaced = recorded is Recorded.REPLACED
    d = got.description
    fields |= {
        "replaced": replaced,
        "laterality": d.laterality if d else None,
        "view": d.view if d else None,
    }
    return Outcome(0x0000, "replaced" if replaced else "accepted", None, "received", fields)


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
        # One folder per process: on a shared spool the sweep must never touch another
        # node's transfers in flight.
        self.incoming = incoming_folder(store)
        self.instances_dir = store.spool / "instances"
        self._server: Any = None
        self._ae: AE | None = None
        self._allowed = {(c.ae_title, c.address) for c in config.allowed_callers}
        self._stopping = threading.Event()
        self._handling: set[Path] = set()
        """Temporary files whose C-STORE handler is running: the sweep leaves them alone."""
        self._handling_lock = threading.Lock()
        self._janitor: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> int:
        """Start serving in background threads; returns the bound port."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.iterdir():  # never acknowledged: the sender will resend
            stale.unlink(missing_ok=True)
        receive_into(self.incoming)  # a no-op where `plugin serve` did it at start

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
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_closed),
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
        self._janitor = threading.Thread(target=self._sweep_loop, name="incoming-janitor")
        self._janitor.daemon = True
        self._janitor.start()
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
        if self._janitor is not None:
            self._janitor.join(timeout)
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

    def _on_connection(self, event: evt.Event) -> None:
        """Per-address limit, counted on connections (half-open sockets included) so that one
        host cannot hold every association slot; also sweeps stale temporary files."""
        try:
            self._sweep_incoming(closing=None)
            address = event.address[0]
            others = [
                a
                for a in self._live_associations()
                if a is not event.assoc and a.requestor.address == address and a.dul.is_alive()
            ]
            if len(others) < self.config.max_associations_per_address:
                return
            self.metrics.associations.labels("rejected").inc()
            self.audit.record(
                "association_rejected",
                address=address,
                reason="too many connections from this address "
                "(listener.max_associations_per_address)",
            )
            log.warning(
                "closed a connection: too many from one address",
                extra={"fields": {"address": address, "open": len(others)}},
            )
            event.assoc.dul.socket.close()
        except Exception:  # noqa: BLE001 - a handler must not raise into pynetdicom
            log.exception("connection check failed")

    def _on_closed(self, event: evt.Event) -> None:
        try:
            self._sweep_incoming(closing=event.assoc)
        except Exception:  # noqa: BLE001 - a handler must not raise into pynetdicom
            log.exception("sweeping the spool's temporary files failed")

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(_SWEEP_SECONDS):
            try:
                self._sweep_incoming(closing=None)
            except Exception:  # noqa: BLE001 - the janitor outlives a failed pass
                log.exception("sweeping the spool's temporary files failed")

    def _live_associations(self) -> list[Any]:
        server = self._server
        return [] if server is None else [a for a in server.active_associations if a.is_alive()]

    def _sweep_incoming(self, closing: Any) -> None:
        """Remove temporary files no transfer in progress can own: all of them when no other
        connection is open, else those untouched for longer than the network timeout (a
        transfer that stalls that long is aborted by pynetdicom)."""
        files = list(self.incoming.iterdir())
        if not files:
            return
        others = [a for a in self._live_associations() if a is not closing]
        stale_before = time.time() - self.config.network_timeout_seconds - _STALE_MARGIN_SECONDS
        with self._handling_lock:
            handling = set(self._handling)
        removed = 0
        for path in files:
            if path in handling:
                continue
            try:
                if others and path.stat().st_mtime > stale_before:
                    continue
                # Truncated first: the ended transfer may still hold the file open (it is
                # freed with its association), and the space must come back now.
                os.truncate(path, 0)
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info(
                "removed temporary files of transfers that did not complete",
                extra={"fields": {"files": removed}},
            )

    def _on_requested(self, event: evt.Event) -> None:
        """Disk watermark, then the calling-AE (and address) allow-list, before negotiation."""
        try:
            assoc = event.assoc
            calling = cap(assoc.requestor.primitive.calling_ae_title.strip(), 16)
            address = assoc.requestor.address
            free = shutil.disk_usage(self.store.spool).free
            self.metrics.disk_free_bytes.set(free)
            if free < self.min_free_bytes:
                self._reject(
                    assoc,
                    calling,
                    address,
                    f"spool below disk watermark ({free // 2**20} MB free)",
                    # Transient, service provider (presentation), local limit exceeded.
                    (0x02, 0x03, 0x02),
                )
                return
            if not self._allowed:
                return
            if (calling, None) in self._allowed or (calling, address) in self._allowed:
                return
            # Permanent, service user, calling AE title not recognised (PS3.8 9.3.4).
            self._reject(
                assoc,
                calling,
                address,
                "calling AE title (and address) not in allowed_callers",
                (0x01, 0x01, 0x03),
            )
        except Exception:  # noqa: BLE001 - a handler must not raise into pynetdicom
            log.exception("association check failed")

    def _reject(
        self, assoc: Any, calling: str, address: str, reason: str, rj: tuple[int, int, int]
    ) -> None:
        self.audit.record(
            "association_rejected", calling_ae=calling, address=address, reason=reason
        )
        log.warning(
            "rejected an association",
            extra={"fields": {"calling_ae": calling, "address": address, "reason": reason}},
        )
        self.metrics.associations.labels("rejected").inc()
        assoc.acse.send_reject(*rj)
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        self.metrics.associations.labels("accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections: wrong called AE, too many associations.
        self.metrics.associations.labels("rejected").inc()
        calling = cap(event.assoc.requestor.primitive.calling_ae_title.strip(), 16)
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
        src: Path | None = None
        try:
            src = Path(event.dataset_path)
            with self._handling_lock:
                self._handling.add(src)
            outcome = self._receive(event, src)
        except Refused as exc:
            outcome = Outcome(exc.status, "refused", exc.reason)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if not full:
                log.exception("C-STORE failed; answering out of resources")
            reason = "spool disk full" if full else f"store failed: {type(exc).__name__}"
            outcome = Outcome(OUT_OF_RESOURCES, "refused", reason)
        except Exception as exc:  # noqa: BLE001 - 0xC211 would tell the sender "never retry"
            log.exception("C-STORE failed; answering out of resources")
            outcome = Outcome(OUT_OF_RESOURCES, "refused", f"store failed: {type(exc).__name__}")
        finally:
            if src is not None:
                # Whatever was not renamed into the spool goes now (pynetdicom's own removal
                # comes later and only when its handler call returns normally).
                src.unlink(missing_ok=True)
                with self._handling_lock:
                    self._handling.discard(src)
        try:
            self._report(event, outcome, time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - the instance is settled; reporting must not undo it
            log.exception("recording a C-STORE in the audit trail or metrics failed")
        rsp = Dataset()
        rsp.Status = outcome.status
        if outcome.status != 0x0000 and outcome.reason:
            rsp.ErrorComment = outcome.reason[:_ERROR_COMMENT]
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

    def _receive(self, event: evt.Event, src: Path) -> Outcome:
        self._check_room()
        got = self._admit(event, src)
        # Ignored instances are recorded but not kept (pynetdicom deletes the file): only the
        # kept ones pay for the fsync.
        kept = got.status == "accepted"
        sha, size = _hash(src, fsync=kept)
        path, fresh = self._spool(src, got, sha) if kept else (None, False)
        if kept:
            self.metrics.ingest_bytes.inc(size)
        try:
            recorded, _ = self.store.record_instance(
                NewInstance(
                    sop_instance_uid=got.sop_uid,
                    sha256=sha,
                    study_instance_uid=got.study_uid,
                    series_instance_uid=got.series_uid,
                    sop_class_uid=got.sop_class,
                    transfer_syntax_uid=str(got.syntax),
                    size=size,
                    path=path,
                    calling_ae=_calling_ae(event),
                    status=got.status,
                    reason=got.reason,
                    description=got.description,
                ),
                late_images=self.late_images,
            )
        except BaseException:
            if path is not None and fresh:
                path.unlink(missing_ok=True)  # never recorded nor acknowledged: not kept
            raise
        return _outcome(got, recorded, _calling_ae(event), size)

    def _check_room(self) -> None:
        """Refuse, for a later resend, while stopping or below the disk watermark."""
        if self._stopping.is_set():
            raise Refused(OUT_OF_RESOURCES, "service is shutting down; resend later")
        free = shutil.disk_usage(self.store.spool).free
        self.metrics.disk_free_bytes.set(free)
        if free < self.min_free_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                f"spool below disk watermark ({free // 2**20} MB free)",
            )

    def _admit(self, event: evt.Event, src: Path) -> _Admitted:
        """What the received file is, from its header; `Refused` when the bytes are at fault."""
        header, pixel_offset = read_header(src)
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
        try:
            check_encoding(header, syntax, src, pixel_offset)
            status, reason, description = self._classify(header, sop_class)
            if status == "accepted":
                self._check_pixels(header, syntax, src, pixel_offset)
        except (Refused, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - the bytes are at fault: permanent
            raise Refused(
                BAD_ATTRIBUTE, f"header cannot be classified ({type(exc).__name__})"
            ) from None
        return _Admitted(
            str(sop_uid),
            str(study_uid),
            str(series_uid),
            sop_class,
            syntax,
            status,
            reason,
            description,
        )

    def _spool(self, src: Path, got: _Admitted, sha: str) -> tuple[Path, bool]:
        """Rename the fsync'd file into the spool; (its path, whether it is new there)."""
        folder = self.instances_dir / got.study_uid
        make_dirs(folder)
        path = folder / f"{got.sop_uid}.{sha[:16]}.dcm"
        fresh = not path.exists()  # else the same bytes, stored and recorded before
        os.replace(src, path)
        fsync_dir(folder)
        return path, fresh

    def _classify(
        self, header: Dataset, sop_class: str
    ) -> tuple[str, str | None, ImageDescription | None]:
        """("accepted" | "ignored", reason, header facts for the selection policy)."""
        if sop_class not in MAMMOGRAPHY_SOP_CLASSES:
            name = UID(sop_class).name if UID(sop_class).is_valid else "unknown SOP class"
            return "ignored", cap(f"not a mammography image ({name})", 200), None
        dims = image_integers(header)
        pixels = dims["Rows"] * dims["Columns"] * dims.get("NumberOfFrames", 1)
        if pixels > self.config.max_image_pixels:
            raise Refused(TOO_LARGE, "header claims more pixels than max_image_pixels")
        try:
            return "accepted", None, describe(header)
        except MammogramError as exc:
            return "ignored", cap(f"unusable mammography header: {exc}"), None

    def _check_pixels(self, header: Dataset, syntax: UID, src: Path, offset: int | None) -> None:
        """For uncompressed data, the bytes after the header must hold the pixels it claims
        (a truncated transfer would otherwise reach the worker as a crash)."""
        if syntax.is_deflated:
            return  # offsets are in the inflated stream; the worker checks when it decodes
        if offset is None:
            raise Refused(TRUNCATED_PIXELS, "image has no Pixel Data element")
        if syntax.is_compressed:
            return
        dims = image_integers(header)
        expected = expected_pixel_bytes(
            dims["Rows"],
            dims["Columns"],
            dims["BitsAllocated"],
            dims.get("SamplesPerPixel", 1),
            dims.get("NumberOfFrames", 1),
        )
        available = src.stat().st_size - offset - 8  # minus the shortest element header
        if available < expected:
            raise Refused(
                TRUNCATED_PIXELS,
                f"pixel data truncated: {max(available, 0)} of {expected} bytes",
            )


def _calling_ae(event: evt.Event) -> str:
    try:
        return cap(str(event.assoc.requestor.ae_title).strip(), 16)
    except Exception:  # noqa: BLE001
        return ""


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


def incoming_folder(store: Store) -> Path:
    """This process's folder for transfers in progress. One per process: on a shared spool
    the sweep must never touch another node's transfers in flight."""
    return store.spool / ".incoming" / _folder_name(store.claimant)


def prepare_process(store: Store, roles: Sequence[str]) -> None:
    """`plugin serve`'s one call at start: a process with the listener role receives into
    its incoming folder (`receive_into`); other roles leave the temp folder alone."""
    if "listener" in roles:
        receive_into(incoming_folder(store))


_receiving_into: Path | None = None


def receive_into(folder: Path) -> None:
    """Process-wide settings for streamed receive, made once: pynetdicom streams each C-STORE
    into a NamedTemporaryFile in the default temp folder (so that folder is `folder`, on the
    spool's filesystem, where the final rename is atomic), and only when pynetdicom's
    documented `_config.STORE_RECV_CHUNKED_DATASET` is on.

    `plugin serve` calls this at start; `Listener.start` calls it too, a no-op then, so that a
    listener embedded elsewhere (a benchmark, a test) works. A second listener on another
    folder in the same process is refused: one temp folder cannot serve two spools."""
    global _receiving_into
    folder = Path(folder)
    active = _receiving_into is not None and tempfile.tempdir == str(_receiving_into)
    if active and _config.STORE_RECV_CHUNKED_DATASET:
        if _receiving_into == folder:
            return
        raise RuntimeError(
            f"this process already receives into {_receiving_into}; run one listener per "
            "process (each `plugin serve` node has its own)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(folder)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _receiving_into = folder


def _folder_name(claimant: str) -> str:
    """A claimant (host, node, device) as one safe folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in claimant) or "node"
