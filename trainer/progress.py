"""Progress for long loops: a tqdm bar on a terminal, plain periodic lines everywhere else.

A bar redraws itself with carriage returns, which floods a redirected log (`> train.log`,
systemd, CI) with thousands of partial lines. When stderr is not a terminal, a loop instead
writes one line every `every_s` seconds and one when it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_EVERY_S = 30.0


class PlainProgress:
    """Iterates like tqdm over `iterable`, reporting `desc: i/total unit, elapsed, rate`
    lines at most every `every_s` seconds and once at the end."""

    def __init__(
        self,
        iterable: Iterable[Any],
        desc: str,
        unit: str,
        total: int | None = None,
        every_s: float = DEFAULT_EVERY_S,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable = iterable
        self.desc, self.unit, self.every_s = desc, unit, every_s
        self.total = total if total is not None else _len(iterable)
        self.stream = stream
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self) -> Iterator[Any]:
        started = last = time.monotonic()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every_s:
                self._line(done, now - started)
                last = now
        self._line(done, time.monotonic() - started)

    def _line(self, done: int, elapsed: float) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed > 0 and done else ""
        extra = f", {self.postfix}" if self.postfix else ""
        stream = self.stream or sys.stderr
        print(
            f"{self.desc}: {done}{total} {self.unit}, {elapsed:.0f} s{rate}{extra}",
            file=stream,
            flush=True,
        )


def progress(
    iterable: Iterable[Any],
    desc: str,
    unit: str,
    enabled: bool = True,
    total: int | None = None,
    every_s: float = DEFAULT_EVERY_S,
) -> Iterable[Any]:
    """`iterable` wrapped for progress reports: nothing when not `enabled`, a tqdm bar when
    stderr is a terminal, else `PlainProgress` lines. Both accept `set_postfix`."""
    if not enabled:
        return _Quiet(iterable)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False)
    return PlainProgress(iterable, desc, unit, total, every_s)


class _Quiet:
    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def set_postfix(self, **values: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)


def _len(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
