"""What every sender promises the outbox: one outcome per file, classified for retrying.

A sender never raises for a delivery failure. It answers `SendOutcome(ok=False, retryable=…)`
so the outbox can decide between backing off and dead-lettering without knowing the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError


@dataclass(frozen=True)
class SendOutcome:
    sop_instance_uid: str
    """Empty when the file could not be read as DICOM."""
    ok: bool
    retryable: bool
    """Meaningful only when not ok: True means the same send may succeed later."""
    detail: str
    """For operators: the peer's status or error, and what to do. No patient identifiers."""


class Sender(Protocol):
    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        """Deliver the files in one association or request batch; one outcome per path, in
        the order of `paths`."""
        ...

    def close(self) -> None:
        """Release connections; the sender is not used afterwards."""
        ...

    def present(self, paths: Sequence[Path]) -> set[str]:
        """The SOP Instance UIDs of these files that the destination already holds, asked
        before re-sending objects an earlier attempt may have delivered (a crash between
        the send and its record). Never raises: what cannot be asked is simply sent again,
        which is harmless since result UIDs are stable."""
        ...


@dataclass(frozen=True)
class InstanceUids:
    study: str
    series: str
    sop_instance: str


def read_uids(path: Path) -> InstanceUids | None:
    """The study, series and SOP Instance UIDs of a result file; None when unreadable."""
    try:
        ds = dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        return InstanceUids(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        )
    except Exception:  # noqa: BLE001 - an unreadable file is simply not "present"
        return None


@dataclass(frozen=True)
class InstanceHeader:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class UnreadableInstance(Exception):
    """A file to send is missing or not DICOM; resending it cannot help."""


def read_header(path: Path) -> InstanceHeader:
    """The identifiers a sender needs, from the file meta and the first elements only."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except FileNotFoundError:
        raise UnreadableInstance(f"{path.name}: file not found (was the spool cleaned?)") from None
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise UnreadableInstance(f"{path.name}: not a readable DICOM file ({exc})") from None
    meta = ds.file_meta
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    syntax = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance and syntax):
        raise UnreadableInstance(
            f"{path.name}: lacks SOP Class UID, SOP Instance UID or Transfer Syntax UID"
        )
    return InstanceHeader(path, str(sop_class), str(sop_instance), str(syntax))


def unreadable(exc: UnreadableInstance) -> SendOutcome:
    return SendOutcome("", ok=False, retryable=False, detail=str(exc))


def classify_status(status: int) -> tuple[bool, bool, str]:
    """(ok, retryable, detail) for a DIMSE C-STORE status, also used for the Failure Reason
    and Warning Reason of a STOW-RS response (the same codes, PS3.18 Table 10.5.3-1).

    Out of resources (0xA7xx) and unclassified failures are retried; data or SOP class the
    peer cannot take (0xA9xx, 0xCxxx, 0x0122) and refusals (0x0124) are not, since the same
    bytes will be refused again.
    """
    text = f"0x{status:04X}"
    if status == 0x0000:
        return True, False, f"stored ({text})"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return True, False, f"stored with warning {text}{_WARNINGS.get(status, '')}"
    if 0xA700 <= status <= 0xA7FF:
        return False, True, f"peer out of resources ({text}); will retry"
    if 0xA900 <= status <= 0xA9FF:
        return False, False, f"peer says data set does not match SOP class ({text})"
    if 0xC000 <= status <= 0xCFFF:
        return False, False, f"peer cannot understand the data set ({text})"
    if status == 0x0122:
        return False, False, f"peer does not support this SOP class ({text}); check its config"
    if status == 0x0124:
        return False, False, f"peer refused: not authorised ({text}); check its access rules"
    return False, True, f"peer failure status {text}; will retry"


_WARNINGS = {
    0x0001: " (optional attributes not supported)",
    0xB000: " (coercion of data elements)",
    0xB006: " (elements discarded)",
    0xB007: " (data set does not match SOP class)",
}


def classify_http(code: int) -> tuple[bool, str]:
    """(retryable, detail) for an HTTP error status from a DICOMweb or Orthanc peer."""
    if code in (408, 425, 429) or code >= 500:
        return True, f"HTTP {code} from the peer; will retry"
    if code in (401, 403):
        return False, (
            f"HTTP {code}: the peer refused our credentials; check username and the password or "
            "token variable, then requeue with `plugin retry`"
        )
    if code == 404:
        return False, "HTTP 404: no such endpoint; check the destination url"
    return False, f"HTTP {code}: the peer refused the request"
