"""The background loop the service's pollers share (the exam assembler and each delivery
destination's sender): call a pass, and when it found nothing to do, wait for the poll interval
or a wake-up. A pass that raises is logged and the loop goes on: a database hiccup must not
end it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any


class PollingThread:
    """Runs `step()` on a daemon thread until stopped: again at once while it reports work
    done (a positive count), else after `poll_seconds` or as soon as `wake()` is called."""

    def __init__(
        self,
        name: str,
        step: Callable[[], int],
        poll_seconds: float,
        *,
        log: logging.Logger,
        failure: str,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.step = step
        self.poll_seconds = poll_seconds
        self._log, self._failure, self._fields = log, failure, fields or {}
        self._stop = threading.Event()
        # Its own event: with one shared by several threads, the first to wake would clear it
        # before a thread busy with a pass had seen it.
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Work was queued: look now rather than at the next poll."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def request_stop(self) -> None:
        """Stop after the pass in progress; `join` waits for it."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        self.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the pass: a wake during the pass makes the wait return
            try:
                done = self.step()
            except Exception:  # noqa: BLE001 - the loop must survive a failed pass
                self._log.exception(self._failure, extra={"fields": self._fields})
                done = 0
            if not done:
                self._wake.wait(self.poll_seconds)
