"""An exam's large arrays handed to pool processes through shared memory, not through a pipe.

An exam's output parts each need its maps and source pixels (about 140 MB at 3328x2560). A
`ProcessPoolExecutor` pickles every task's arguments into a pipe, which moved them at about
400 MB/s on a 2-CPU host, a copy per part. Here the value is pickled once, with protocol 5,
and its contiguous numpy arrays go out of band into one anonymous memory file (`memfd`); each
process maps that file read-only through ``/proc/<pid>/fd`` and unpickles arrays that point
into it. Only the small rest travels through the pipe.

Nothing outlives its users: the kernel frees the memory once the owner has called `release`
(or died) and every process has dropped its arrays, whoever is killed. Where there is no
memfd (not Linux), the payload travels in band, pickled once as before.
"""

from __future__ import annotations

import copyreg
import io
import mmap
import os
import pickle
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
Reducers = Mapping[type, Callable[[Any], tuple]]


class SharedPayload(Generic[T]):
    """A value that pool processes receive through shared memory, pickled once however many
    tasks carry it; in a thread it is the value itself. Arrays unpickled in a process are
    read-only views of the shared memory. `reducers` pickle some types their own way (a
    `copyreg`-style dispatch table), e.g. to put a large `bytes` value out of band as an
    array."""

    def __init__(self, value: T, reducers: Reducers | None = None) -> None:
        self.value = value
        self._reducers = dict(reducers or {})
        self._lock = threading.Lock()
        self._reduced: tuple | None = None
        self._fd: int | None = None
        self._released = False

    def __reduce__(self):
        with self._lock:
            if self._released:
                raise RuntimeError("a released payload cannot be handed to a process again")
            if self._reduced is None:
                self._reduced = self._share()
            return self._reduced

    def _pickled(self, buffers: list[pickle.PickleBuffer] | None) -> bytes:
        out = io.BytesIO()
        callback = None if buffers is None else buffers.append
        pickler = pickle.Pickler(out, protocol=5, buffer_callback=callback)
        pickler.dispatch_table = copyreg.dispatch_table | self._reducers
        pickler.dump(self.value)
        return out.getvalue()

    def _share(self) -> tuple:
        if not hasattr(os, "memfd_create"):
            return _in_band, (self._pickled(None),)
        buffers: list[pickle.PickleBuffer] = []
        data = self._pickled(buffers)
        spans, size = [], 0
        for buffer in buffers:
            length = buffer.raw().nbytes
            spans.append((size, size + length))
            size += length
        fd = os.memfd_create("mammo-ai-payload", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if size:
                with mmap.mmap(fd, size) as shared:
                    # numpy copies without the GIL, so the stages' other threads go on.
                    into = np.frombuffer(shared, np.uint8)
                    for buffer, (start, end) in zip(buffers, spans, strict=True):
                        into[start:end] = np.frombuffer(buffer.raw(), np.uint8)
                    del into  # before the mapping closes
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return _attached, (os.getpid(), fd, size, data, tuple(spans))

    def release(self) -> None:
        """The owner's hold on the shared memory ends (once every task carrying the payload
        has finished): the kernel frees it when the last process drops its arrays."""
        with self._lock:
            self._released = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _in_band(data: bytes) -> SharedPayload:
    return SharedPayload(pickle.loads(data))


def _attached(
    owner: int, fd: int, size: int, data: bytes, spans: tuple[tuple[int, int], ...]
) -> SharedPayload:
    if not size:
        return SharedPayload(pickle.loads(data, buffers=()))
    path = f"/proc/{owner}/fd/{fd}"
    try:
        with open(path, "rb") as file:
            shared = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise OSError(
            f"a pool process could not map the exam's shared memory ({path}: {exc}); "
            "/proc must be mounted and readable by the service's user, or set "
            "worker.output_processes: 0 to build the objects in threads"
        ) from exc
    view = memoryview(shared)
    return SharedPayload(pickle.loads(data, buffers=[view[a:b] for a, b in spans]))
