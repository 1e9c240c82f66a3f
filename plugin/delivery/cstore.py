"""DICOM C-STORE SCU: one association per batch, the objects sent as stored (no transcoding).

Exactly one presentation context is proposed per (SOP class, transfer syntax) pair present in
the batch, so a peer that accepts a context accepts the bytes as they are. Statuses are
classified by `classify_status`; association failures are classified here.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from plugin.delivery.base import (
    InstanceHeader,
    SendOutcome,
    UnreadableInstance,
    classify_status,
    read_header,
    read_uids,
    unreadable,
)
from plugin.delivery.destinations import DestinationError, DicomDestination

MAX_CONTEXTS = 128
"""An A-ASSOCIATE-RQ carries at most 128 presentation contexts (PS3.8 9.3.2.2)."""


class CStoreSender:
    def __init__(self, destination: DicomDestination) -> None:
        self.destination = destination
        self._tls_args = _tls_args(destination)

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        outcomes: dict[int, SendOutcome] = {}
        headers: dict[int, InstanceHeader] = {}
        for index, path in enumerate(paths):
            try:
                headers[index] = read_header(Path(path))
            except UnreadableInstance as exc:
                outcomes[index] = unreadable(exc)
        for chunk in _chunks_by_context(headers):
            outcomes.update(self._send_chunk(chunk))
        return [outcomes[i] for i in range(len(paths))]

    def present(self, paths: Sequence[Path]) -> set[str]:
        """C-FIND at IMAGE level (Study Root): only peers that offer Query/Retrieve answer;
        for the others nothing is known and everything is sent again."""
        wanted = [u for u in map(read_uids, map(Path, paths)) if u is not None]
        if not wanted:
            return set()
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        out: set[str] = set()
        try:
            assoc = self._associate(ae)
        except Exception:  # noqa: BLE001 - cannot ask: send again
            return out
        if not assoc.is_established:
            return out
        try:
            for uids in wanted:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = uids.study
                query.SeriesInstanceUID = uids.series
                query.SOPInstanceUID = uids.sop_instance
                for status, identifier in assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind
                ):
                    if status is not None and status.get("Status") in (0xFF00, 0xFF01):
                        if identifier is not None and identifier.get("SOPInstanceUID"):
                            out.add(uids.sop_instance)
        except Exception:  # noqa: BLE001 - a peer that breaks off: what we learnt stands
            pass
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def close(self) -> None:
        """Associations live only inside `send`; nothing stays open."""

    def _ae(self) -> AE:
        """Our AE for one association: calling AE title and the destination's timeouts."""
        dest = self.destination
        ae = AE(ae_title=dest.calling_ae)
        ae.connection_timeout = dest.connect_timeout_seconds
        ae.acse_timeout = dest.acse_timeout_seconds
        ae.dimse_timeout = dest.dimse_timeout_seconds
        ae.network_timeout = dest.network_timeout_seconds
        return ae

    def _associate(self, ae: AE, **kw: Any) -> Association:
        """An association with the destination (its address, called AE title, PDU size, TLS)."""
        dest = self.destination
        return ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.called_ae,
            max_pdu=dest.max_pdu,
            tls_args=self._tls_args,
            **kw,
        )

    def _send_chunk(self, chunk: dict[int, InstanceHeader]) -> dict[int, SendOutcome]:
        dest = self.destination
        ae = self._ae()
        contexts = sorted({(h.sop_class_uid, h.transfer_syntax_uid) for h in chunk.values()})
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, [syntax])
        for _ in range(2):
            opened: list[bool] = []
            assoc = self._associate(
                ae, evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event, o=opened: o.append(True))]
            )
            if assoc.is_established or assoc.is_rejected or not opened:
                break
            # Aborted during negotiation: a peer that rejects and closes at once (Orthanc)
            # can lose its A-ASSOCIATE-RJ to a TCP reset, and an abort reads as transient.
            # Asking once more gets the peer's real answer, permanent or not.
        if not assoc.is_established:
            retryable, detail = _association_failure(assoc, dest, connected=bool(opened))
            return {
                i: SendOutcome(h.sop_instance_uid, False, retryable, detail)
                for i, h in chunk.items()
            }
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        outcomes: dict[int, SendOutcome] = {}
        lost = False
        try:
            for index, header in chunk.items():
                uid = header.sop_instance_uid
                if lost:
                    outcomes[index] = SendOutcome(uid, False, True, _LOST)
                elif (header.sop_class_uid, header.transfer_syntax_uid) not in accepted:
                    outcomes[index] = SendOutcome(
                        uid,
                        False,
                        False,
                        f"peer {dest.called_ae} did not accept SOP class {header.sop_class_uid} "
                        f"in transfer syntax {header.transfer_syntax_uid}; enable it on the "
                        "peer, then requeue with `plugin retry`",
                    )
                else:
                    outcome = _store(assoc, header)
                    # No response: the peer aborted, or the association timed out. Its state
                    # is unknown, so nothing more goes over it.
                    lost = outcome is None
                    outcomes[index] = outcome or SendOutcome(uid, False, True, _NO_RESPONSE)
        finally:
            if assoc.is_established and lost:
                assoc.abort()
            elif assoc.is_established:
                assoc.release()
        return outcomes


_NO_RESPONSE = "no C-STORE response (peer aborted or timed out); will retry"
_LOST = "association lost before this object was sent; will retry"


def _store(assoc: Association, header: InstanceHeader) -> SendOutcome | None:
    """The classified response to one C-STORE, or None when no response came."""
    uid = header.sop_instance_uid
    try:
        status = assoc.send_c_store(header.path)
    except RuntimeError:
        return None  # the association ended before the request could be sent
    except (OSError, ValueError, AttributeError) as exc:
        return SendOutcome(uid, False, False, f"{header.path.name}: cannot send ({exc})")
    if "Status" not in status:
        return None
    ok, retryable, detail = classify_status(int(status.Status))
    comment = status.get("ErrorComment")
    if comment:
        detail = f"{detail}: {comment}"
    return SendOutcome(uid, ok, retryable, detail)


def _chunks_by_context(
    headers: dict[int, InstanceHeader],
) -> list[dict[int, InstanceHeader]]:
    """Split a batch so no association needs more than MAX_CONTEXTS contexts (in practice a
    batch of result objects needs a handful, so this is one chunk)."""
    chunks: list[dict[int, InstanceHeader]] = []
    current: dict[int, InstanceHeader] = {}
    pairs: set[tuple[str, str]] = set()
    for index, header in headers.items():
        pair = (header.sop_class_uid, header.transfer_syntax_uid)
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            chunks.append(current)
            current, pairs = {}, set()
        pairs.add(pair)
        current[index] = header
    if current:
        chunks.append(current)
    return chunks


def _association_failure(
    assoc: Association, dest: DicomDestination, connected: bool
) -> tuple[bool, str]:
    """(retryable, detail) for an association that was not established."""
    peer = f"{dest.called_ae}@{dest.host}:{dest.port}"
    if not connected:
        tls = ", or the TLS handshake failed: check tls.ca and the certificates" if dest.tls else ""
        return True, (
            f"cannot connect to {peer} (refused, unreachable or timed out{tls}); will retry"
        )
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}" if rsp else "no reason"
        if rsp is not None and rsp.result == 0x02:
            return True, f"association rejected by {peer} ({reason}); will retry"
        return False, (
            f"association rejected by {peer} ({reason}); check that the peer knows calling AE "
            f"{dest.calling_ae} and called AE {dest.called_ae}, then requeue with `plugin retry`"
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        wanted = ", ".join(sorted({cx.abstract_syntax for cx in assoc.rejected_contexts}))
        return False, (
            f"{peer} accepted none of the proposed presentation contexts (SOP classes {wanted} "
            "in the stored transfer syntaxes); enable them on the peer, then requeue with "
            "`plugin retry`"
        )
    hint = (
        " (if the peer requires a client certificate, set tls.cert and tls.key)" if dest.tls else ""
    )
    return True, f"association with {peer} aborted during negotiation{hint}; will retry"


def _tls_args(dest: DicomDestination) -> tuple[ssl.SSLContext, str] | None:
    tls = dest.tls
    if tls is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
        if tls.cert is not None:
            context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise DestinationError(
            f"destination {dest.name}: cannot load its TLS files ({exc}); check tls.ca, "
            "tls.cert and tls.key"
        ) from None
    context.check_hostname = tls.verify_hostname
    return context, tls.server_name or dest.host
