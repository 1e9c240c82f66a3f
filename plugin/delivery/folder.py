"""Folder destination: each object copied in as `<SOPInstanceUID>.dcm`, atomically.

A reader of the folder (a watcher, a sync job) never sees a partial file: bytes go to a hidden
temporary name in the same folder, are fsync'd, renamed over the final name, and the folder
entry is fsync'd. Rewriting the same object is harmless (result UIDs are deterministic).
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from plugin.delivery.base import (
    SendOutcome,
    UnreadableInstance,
    read_header,
    read_uids,
    unreadable,
)
from plugin.delivery.destinations import FolderDestination
from plugin.durable import write_atomically

# Conditions an operator or time can clear; anything else (permissions, read-only mount, a file
# where the folder should be) needs a config or system fix first, then `plugin retry`.
_TRANSIENT = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ESTALE,
    errno.ETIMEDOUT,
    errno.EINTR,
    errno.ENOENT,
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class FolderSender:
    def __init__(self, destination: FolderDestination) -> None:
        self.destination = destination
        self.folder = destination.path

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        return [self._send_one(Path(p)) for p in paths]

    def present(self, paths: Sequence[Path]) -> set[str]:
        """Written files only appear under their final name once complete."""
        out = set()
        for path in paths:
            uids = read_uids(Path(path))
            uid = uids.sop_instance if uids else ""
            if _UID.match(uid) and len(uid) <= 64 and (self.folder / f"{uid}.dcm").is_file():
                out.add(uid)
        return out

    def close(self) -> None:
        """Nothing to release."""

    def _send_one(self, path: Path) -> SendOutcome:
        try:
            header = read_header(path)
        except UnreadableInstance as exc:
            return unreadable(exc)
        uid = header.sop_instance_uid
        if not _UID.match(uid) or len(uid) > 64:
            # The UID becomes a file name: never let it climb out of the folder.
            return SendOutcome(uid, False, False, "SOP Instance UID is not a valid UID")
        target = self.folder / f"{uid}.dcm"
        try:
            with path.open("rb") as src:
                write_atomically(target, partial(shutil.copyfileobj, src, length=1 << 20))
        except OSError as exc:
            return SendOutcome(uid, False, *_explain(exc, self.folder))
        return SendOutcome(uid, True, False, f"written to {target}")


def _explain(exc: OSError, folder: Path) -> tuple[bool, str]:
    """(retryable, detail) for a failed write into `folder`."""
    code = exc.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "unknown"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True, (
            f"destination folder {folder} is full ({name}: {exc.strerror}); free space there "
            "or move the folder; will retry"
        )
    if code in _TRANSIENT:
        return True, f"cannot write into {folder} ({name}: {exc.strerror}); will retry"
    return False, (
        f"cannot write into {folder} ({name}: {exc.strerror}); fix its permissions or mount, "
        "then requeue with `plugin retry`"
    )
