"""glibc's malloc, kept from growing the server's memory under load.

A batch's activations are large and vary in size from one batch to the next. glibc serves
allocations above its mmap threshold (128 KiB at start) with ``mmap`` and returns them to the
system on free, but each such free raises the threshold to the freed size (up to 32 MiB), so
that later blocks of that size come from the heap instead. Freed heap blocks of varying sizes
fragment it and are seldom returned: under a mixed soak the server's RSS rose about 10% in five
minutes and swung by 250 MB (``bench/bench_soak.py``).

Two remedies, measured:

* ``trim()`` (``malloc_trim(0)``) hands the heap's free pages back to the system. The model
  thread calls it after a batch at most every ``--malloc-trim-interval-s`` (10 s): a few
  milliseconds each time, and RSS stays flat. This is the default.
* ``fix_mmap_threshold`` (``--malloc-mmap-threshold-kb``, off by default) turns the dynamic
  threshold off, so big blocks are mapped and unmapped every time. RSS stays flat too, but every
  batch then page-faults its activations in anew: at 32 clients the server served 40% fewer
  texts per second.

A ``MALLOC_MMAP_THRESHOLD_`` environment variable, which glibc reads itself, always wins over
the flag. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
#: mallopt's parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc()


def trim() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``); True if any."""
    trim_fn = getattr(_LIBC, "malloc_trim", None)
    if trim_fn is None:
        return False
    return bool(trim_fn(0))


def fix_mmap_threshold(threshold_kb: int) -> bool:
    """Set glibc's mmap threshold to ``threshold_kb`` KiB (which disables its dynamic growth).
    True when it was set; False when asked not to, overridden by the environment, or not glibc."""
    if threshold_kb <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) was refused", threshold_kb)
        return False
    return True
