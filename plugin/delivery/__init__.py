"""Delivery of result objects to PACS, Orthanc, DICOMweb services and folders.

`make_sender(destination)` gives a `Sender` whose `send(paths)` returns one classified
`SendOutcome` per file; the outbox (plugin.dispatcher) owns retries and dead letters, with the
arithmetic in `plugin.delivery.backoff`.
"""

from __future__ import annotations

from plugin.delivery.base import Sender, SendOutcome
from plugin.delivery.destinations import (
    Destination,
    DestinationError,
    DicomDestination,
    DicomTls,
    DicomwebDestination,
    FolderDestination,
    OrthancDestination,
)

__all__ = [
    "Destination",
    "DestinationError",
    "DicomDestination",
    "DicomTls",
    "DicomwebDestination",
    "FolderDestination",
    "OrthancDestination",
    "SendOutcome",
    "Sender",
    "make_sender",
]


def make_sender(destination: Destination) -> Sender:
    """A sender for one destination. Protocol libraries are imported here, not at package
    import, so that reading a config does not load every network client.

    Raises DestinationError when the destination cannot be used (a secret's variable unset,
    an unreadable TLS file)."""
    match destination:
        case DicomDestination():
            from plugin.delivery.cstore import CStoreSender

            return CStoreSender(destination)
        case DicomwebDestination():
            from plugin.delivery.stow import StowSender

            return StowSender(destination)
        case OrthancDestination():
            from plugin.delivery.orthanc_rest import OrthancSender

            return OrthancSender(destination)
        case FolderDestination():
            from plugin.delivery.folder import FolderSender

            return FolderSender(destination)
    raise TypeError(f"not a destination model: {type(destination).__name__}")
