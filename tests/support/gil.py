"""Whether a C function lets other threads run: a thread counting in Python keeps counting
while the function is in C only if it releases the GIL. With the GIL held the counter could
only run for the switch interval (set to 0.1 ms here) before each call: a few thousand steps."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import ModuleType

import pytest


def steps_during(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, run: Callable[[], object]
) -> list[int]:
    """A counting thread's steps during each call of `module.name` that `run()` makes."""
    counter, stop, during = [0], threading.Event(), []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        before = counter[0]
        try:
            return original(*args, **kwargs)
        finally:
            during.append(counter[0] - before)

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    monkeypatch.setattr(module, name, counted)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=count)
    thread.start()
    try:
        run()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(previous)
    return during
