"""glibc's malloc, tuned once at startup so that the server's memory stays bounded under load.

A batch's activations are large and vary in size from one batch to the next. glibc serves
allocations above its mmap threshold (128 KiB at start) with ``mmap`` and returns them to the
system on free, but each such free raises the threshold to the freed size (up to 32 MiB), so
that later blocks of that size come from the heap instead. Freed heap blocks of varying sizes
fragment it and are seldom returned: under a mixed soak the server's RSS rose about 10% in five
minutes and swung by 250 MB (``bench/bench_soak.py``). A fixed threshold turns the dynamic
adjustment off: big blocks are mapped and unmapped every time, and RSS stays flat.

``--malloc-mmap-threshold-kb 0`` leaves glibc's default; a ``MALLOC_MMAP_THRESHOLD_`` environment
variable, which glibc reads itself, always wins. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
#: mallopt's parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(threshold_kb: int) -> bool:
    """Set glibc's mmap threshold to ``threshold_kb`` KiB (which disables its dynamic growth).
    True when it was set; False when asked not to, overridden by the environment, or not glibc."""
    if threshold_kb <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) was refused", threshold_kb)
        return False
    return True
