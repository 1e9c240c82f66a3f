"""Orthanc REST sender (pyorthanc): POST /instances, one request per object on one connection.

Orthanc answers each upload with a JSON status: "Success" and "AlreadyStored" both mean the
object is there. HTTP errors are classified like STOW-RS; once the server is unreachable the
rest of the batch is not attempted (each would only wait for the same timeout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx
from pyorthanc import Orthanc

from plugin.delivery.base import (
    InstanceHeader,
    SendOutcome,
    UnreadableInstance,
    classify_http,
    read_header,
    read_uids,
    unreadable,
)
from plugin.delivery.destinations import OrthancDestination, secret


class OrthancSender:
    def __init__(self, destination: OrthancDestination) -> None:
        self.destination = destination
        password = secret(destination, "password_env")
        self._client = Orthanc(
            destination.url,
            username=destination.username,
            password=password,
            return_raw_response=True,
            timeout=destination.timeout_seconds,
            verify=str(destination.ca) if destination.ca is not None else True,
        )

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        outcomes: list[SendOutcome] = []
        unreachable: str | None = None
        for path in paths:
            try:
                header = read_header(Path(path))
                data = header.path.read_bytes()
            except UnreadableInstance as exc:
                outcomes.append(unreadable(exc))
                continue
            except OSError as exc:
                outcomes.append(unreadable(UnreadableInstance(f"{Path(path).name}: {exc}")))
                continue
            uid = header.sop_instance_uid
            if unreachable is not None:
                outcomes.append(SendOutcome(uid, False, True, unreachable))
                continue
            try:
                outcomes.append(self._upload(header, data))
            except httpx.TransportError as exc:
                unreachable = (
                    f"cannot reach Orthanc at {self.destination.url} ({type(exc).__name__}); "
                    "will retry"
                )
                outcomes.append(SendOutcome(uid, False, True, unreachable))
        return outcomes

    def present(self, paths: Sequence[Path]) -> set[str]:
        """Orthanc's /tools/lookup finds an instance by its SOP Instance UID."""
        out = set()
        for path in paths:
            uids = read_uids(Path(path))
            if uids is None:
                continue
            try:
                response = self._client.post_tools_lookup(data=uids.sop_instance)
                found = response.json() if response.status_code == 200 else []
            except Exception:  # noqa: BLE001 - cannot ask: send again
                continue
            if any(item.get("Type") == "Instance" for item in found):
                out.add(uids.sop_instance)
        return out

    def close(self) -> None:
        self._client.close()

    def _upload(self, header: InstanceHeader, data: bytes) -> SendOutcome:
        uid = header.sop_instance_uid
        response = self._client.post_instances(content=data)
        if response.status_code >= 300:
            retryable, detail = classify_http(response.status_code)
            return SendOutcome(uid, False, retryable, f"{detail}: {_message(response)}")
        try:
            status = response.json().get("Status")
        except ValueError:
            status = None
        if status == "Success":
            return SendOutcome(uid, True, False, "stored in Orthanc")
        if status == "AlreadyStored":
            return SendOutcome(uid, True, False, "already stored in Orthanc (kept its copy)")
        # E.g. "FilteredOut": a Lua or plugin filter on the Orthanc side discarded it.
        return SendOutcome(
            uid,
            False,
            False,
            f"Orthanc did not store the object (status {status!r}); check its filters",
        )


def _message(response: httpx.Response) -> str:
    """Orthanc's own error text (JSON `Message`/`Details`), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("Message") or body.get("Details")):
        return " - ".join(str(body[k]) for k in ("Message", "Details") if body.get(k))
    return response.text[:200]
