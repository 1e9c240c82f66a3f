"""One thread per process for the ensemble's torch work.

torch's CPU operators run their parallel parts on OpenMP, and libgomp gives every thread that
starts parallel work a team of its own. Once a process holds more team threads than CPUs,
libgomp stops spinning between parallel regions, so each operator waits for its team to wake
(about 0.1 ms on a VM). A service loads its models in one thread and scores exams in another:
with two teams on 2 CPUs a three-member exam's ensemble took 1.2 s instead of 0.56 s
(`bench/pipeline.py`). So an `Ensemble` loads and scores on this one thread, whichever thread
calls it; code that times the same modules beside it (`bench/pipeline.py`'s forward-only
ceiling) runs here too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_inside = threading.local()


def on_compute_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` run on the process's compute thread; its result or its exception
    comes back to the caller, who waits. Called from the compute thread itself, it runs
    in place."""
    if getattr(_inside, "active", False):
        return fn(*args, **kwargs)
    return _compute_executor().submit(_run, fn, args, kwargs).result()


def _run(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    _inside.active = True
    return fn(*args, **kwargs)


def _forget_in_child() -> None:
    """A forked child has no compute thread: it starts its own."""
    global _executor, _lock
    _executor, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _compute_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        return _executor
