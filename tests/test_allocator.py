"""`plugin.allocator`: a freed image-sized buffer is reused, not page-faulted afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's"
)

ONE_VIEW = """
import ctypes, resource, sys
import numpy as np
from plugin.allocator import keep_freed_memory

# 4 KiB pages whatever the machine's transparent huge page setting: countable faults.
PR_SET_THP_DISABLE = 41
assert ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0

if sys.argv[1] == "keep":
    assert keep_freed_memory()

def faults_of_one_view() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # A 3328x2560 view in float32 (34 MB): above glibc's largest mmap threshold.
    pixels = np.ones((3328, 2560), np.float32)
    del pixels
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_view()
print(faults_of_one_view())
"""


def second_view_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", ONE_VIEW, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_a_second_view_reuses_the_first_views_memory():
    pages = 3328 * 2560 * 4 // 4096
    assert second_view_faults("default") > pages * 0.9  # glibc's default: mapped afresh
    assert second_view_faults("keep") < pages * 0.01
