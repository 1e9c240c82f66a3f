"""The C allocator set for a process that handles image-sized buffers over and over.

By default glibc hands a freed block back to the kernel when it is larger than its mmap
threshold (at most 32 MB) or sits at the top of a heap, and it gives each thread a heap of its
own. An exam's pixel arrays (17 MB a 3328×2560 view), float copies (34 MB), maps and heat-maps
are then page-faulted and zeroed afresh for every exam, in whichever thread the stage runs:
on the 2-core VM of `bench/pipeline.py` that was 60,000-120,000 page faults and 0.5-0.6 s of
kernel time per four-view exam. Kept in the process they are reused: under 500 faults, and
1.97-2.25 s per exam instead of 2.54-2.92 s. The price is that a process keeps its peak heap
(the pipeline bounds the exams in flight, so the peak is bounded too).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap beyond 2 GiB goes back to the kernel."""


def keep_freed_memory() -> bool:
    """One heap for every thread of this process, large blocks from it rather than from
    fresh mappings, and free memory kept for reuse. Call it first thing in a process, before
    it starts threads (a thread's heap, once made, stays). False, and nothing changed, where
    the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    done = all([mallopt(param, value) == 1 for param, value in settings])  # each one tried
    if not done:
        log.warning("glibc refused an allocator setting; images are allocated afresh per exam")
    return done
