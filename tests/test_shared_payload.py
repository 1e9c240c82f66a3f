"""An exam's payload reaches output processes through shared memory: arrays arrive equal and
read-only, a source dataset's pixels come back without pydicom's cache, the value is
pickled once for all tasks, and the owner's hold ends with `release`."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from plugin.pipeline import PIXELS_APART
from plugin.shared_payload import SharedPayload
from tests.support.shared_memory import payload_memfds


def _summary(payload: SharedPayload) -> tuple:
    """What a pool process sees of the payload."""
    maps, source = payload.value
    cached = vars(source).get("_pixel_array") is not None
    return (
        [m.tobytes() for m in maps],
        [m.flags.writeable for m in maps],
        source.pixel_array.tobytes(),
        cached,
        str(source.SOPInstanceUID),
    )


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as executor:
        yield executor


def _payload() -> tuple[SharedPayload, list[np.ndarray], pydicom.Dataset]:
    rng = np.random.default_rng(3)
    maps = [rng.integers(0, 256, (333, 256), dtype=np.uint8) for _ in range(3)]
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.pixel_array  # noqa: B018 - fills pydicom's decoded-pixel cache, which stays behind
    return SharedPayload((maps, source), reducers=PIXELS_APART), maps, source


def test_processes_get_the_arrays_and_pixels_read_only_and_without_a_pixel_cache(pool):
    payload, maps, source = _payload()
    try:
        seen = list(pool.map(_summary, [payload] * 4))
    finally:
        payload.release()
    for got_maps, writeable, pixels, cached, uid in seen:
        assert got_maps == [m.tobytes() for m in maps]
        assert writeable == [False] * len(maps)  # views of the shared memory
        assert pixels == source.pixel_array.tobytes()
        assert not cached
        assert uid == source.SOPInstanceUID


def test_pickled_once_and_the_large_part_travels_out_of_band():
    payload, maps, _ = _payload()
    try:
        first, second = pickle.dumps(payload), pickle.dumps(payload)
        assert first == second
        assert len(first) < sum(m.nbytes for m in maps) // 10
    finally:
        payload.release()


def test_release_closes_the_shared_memory_and_a_thread_sees_the_value_itself():
    before = payload_memfds()
    payload, maps, _ = _payload()
    assert payload.value[0] is maps  # no pickling in a thread
    assert payload_memfds() == before  # nor shared memory until a process needs it
    pickle.dumps(payload)
    assert len(payload_memfds() - before) == 1
    payload.release()
    payload.release()  # twice is harmless
    assert payload_memfds() == before
    with pytest.raises(RuntimeError, match="released"):
        pickle.dumps(payload)  # its shared memory is gone: it cannot travel again


def test_without_memfd_the_payload_travels_in_band(pool, monkeypatch):
    monkeypatch.delattr(os, "memfd_create")
    before = payload_memfds()
    payload, maps, source = _payload()
    (got_maps, _, pixels, _, _) = pool.submit(_summary, payload).result()
    assert got_maps == [m.tobytes() for m in maps]
    assert pixels == source.pixel_array.tobytes()
    assert payload_memfds() == before
