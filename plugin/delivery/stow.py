"""DICOMweb STOW-RS sender (dicomweb-client): one multipart POST per batch.

Per-instance results come from the STOW response (Referenced SOP Sequence: stored, perhaps with
a Warning Reason; Failed SOP Sequence: Failure Reason, classified like a C-STORE status). A 409
carries the same report; other HTTP errors apply to the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from plugin.delivery.base import (
    InstanceHeader,
    SendOutcome,
    UnreadableInstance,
    classify_http,
    classify_status,
    read_header,
    read_uids,
    unreadable,
)
from plugin.delivery.destinations import DicomwebDestination, secret


class StowSender:
    def __init__(self, destination: DicomwebDestination) -> None:
        self.destination = destination
        session = requests.Session()
        # Ask for the JSON status report; it is what we parse for per-instance results.
        session.headers["Accept"] = "application/dicom+json"
        password = secret(destination, "password_env")
        token = secret(destination, "token_env")
        if destination.username is not None:
            session.auth = (destination.username, password or "")
        elif token is not None:
            session.headers["Authorization"] = f"Bearer {token}"
        if destination.ca is not None:
            session.verify = str(destination.ca)
        self._session = session
        self._client = DICOMwebClient(
            destination.url, session=session, timeout=destination.timeout_seconds
        )
        # Retries belong to the outbox (backoff, dead letter), not to hidden loops in here.
        self._client.set_http_retry_params(retry=False)

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        outcomes: dict[int, SendOutcome] = {}
        batch: dict[int, tuple[InstanceHeader, Dataset]] = {}
        for index, path in enumerate(paths):
            try:
                header = read_header(Path(path))
                batch[index] = (header, dcmread(header.path))
            except UnreadableInstance as exc:
                outcomes[index] = unreadable(exc)
            except (OSError, ValueError) as exc:
                outcomes[index] = unreadable(UnreadableInstance(f"{Path(path).name}: {exc}"))
        if batch:
            outcomes.update(self._post(batch))
        return [outcomes[i] for i in range(len(paths))]

    def present(self, paths: Sequence[Path]) -> set[str]:
        """QIDO-RS: the instance, searched by its UID within its study."""
        out = set()
        for path in paths:
            uids = read_uids(Path(path))
            if uids is None:
                continue
            try:
                found = self._client.search_for_instances(
                    study_instance_uid=uids.study,
                    search_filters={"SOPInstanceUID": uids.sop_instance},
                )
            except Exception:  # noqa: BLE001 - cannot ask: send again
                continue
            if found:
                out.add(uids.sop_instance)
        return out

    def close(self) -> None:
        self._session.close()

    def _post(self, batch: dict[int, tuple[InstanceHeader, Dataset]]) -> dict[int, SendOutcome]:
        uids = {i: header.sop_instance_uid for i, (header, _) in batch.items()}
        try:
            report = self._client.store_instances([ds for _, ds in batch.values()])
        except requests.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else 0
            report = _json_report(response) if code == 409 else None
            if report is None:
                retryable, detail = classify_http(code)
                return {i: SendOutcome(uid, False, retryable, detail) for i, uid in uids.items()}
        except requests.exceptions.SSLError as exc:
            detail = f"TLS failure talking to {self.destination.url}: {exc}; check the ca setting"
            return {i: SendOutcome(uid, False, False, detail) for i, uid in uids.items()}
        except (requests.ConnectionError, requests.Timeout) as exc:
            detail = f"cannot reach {self.destination.url} ({type(exc).__name__}); will retry"
            return {i: SendOutcome(uid, False, True, detail) for i, uid in uids.items()}
        except ValueError as exc:
            detail = f"unreadable STOW-RS response ({exc}); will resend (stores are idempotent)"
            return {i: SendOutcome(uid, False, True, detail) for i, uid in uids.items()}
        return {i: _instance_outcome(uid, report) for i, uid in uids.items()}


def _json_report(response: requests.Response | None) -> Dataset | None:
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def _instance_outcome(uid: str, report: Dataset) -> SendOutcome:
    for item in report.get("FailedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == uid:
            reason = item.get("FailureReason")
            if reason is None:
                return SendOutcome(uid, False, True, "STOW failed without a reason; will retry")
            ok, retryable, detail = classify_status(int(reason))
            return SendOutcome(uid, ok, retryable, f"STOW: {detail}")
    for item in report.get("ReferencedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == uid:
            warning = item.get("WarningReason")
            if warning is None:
                return SendOutcome(uid, True, False, "stored (STOW-RS)")
            _, _, detail = classify_status(int(warning))
            return SendOutcome(uid, True, False, f"STOW: {detail}")
    if "FailedSOPSequence" in report or "ReferencedSOPSequence" in report:
        return SendOutcome(uid, False, True, "not listed in the STOW-RS response; will retry")
    return SendOutcome(uid, True, False, "stored (STOW-RS, no per-instance report)")
