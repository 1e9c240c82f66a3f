"""`models.compute_thread`: every caller's work runs on one thread, results and errors come
back, a nested call runs in place, and a forked child gets a compute thread of its own."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from models.compute_thread import on_compute_thread


def _thread_name() -> str:
    return threading.current_thread().name


def test_callers_in_any_thread_share_the_one_compute_thread():
    names: list[str] = []
    callers = [
        threading.Thread(target=lambda: names.append(on_compute_thread(_thread_name)))
        for _ in range(4)
    ]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    names.append(on_compute_thread(_thread_name))
    assert len(set(names)) == 1 and names[0].startswith("compute")


def test_the_result_and_the_error_come_back_to_the_caller():
    assert on_compute_thread(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        on_compute_thread(divmod, 1, 0)


def test_a_call_from_the_compute_thread_runs_in_place():
    def outer() -> tuple[str, str]:
        return _thread_name(), on_compute_thread(_thread_name)  # would deadlock if queued

    here, nested = on_compute_thread(outer)
    assert here == nested


def _in_child(queue) -> None:
    queue.put(on_compute_thread(_thread_name))


def test_a_forked_child_starts_its_own_compute_thread():
    on_compute_thread(_thread_name)  # the parent's thread exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(queue,))
    child.start()
    name = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0 and name.startswith("compute")
