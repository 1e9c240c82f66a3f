"""What a test can see of `plugin.shared_payload` from outside: the memory files it holds."""

from __future__ import annotations

import os


def payload_memfds() -> set[str]:
    """This process's open shared-memory files of payloads (descriptor numbers)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:mammo-ai-payload"):
            out.add(fd)
    return out
