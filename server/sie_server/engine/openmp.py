"""Helper threads run torch's operators serially, outside torch's OpenMP runtime.

torch's CPU parallelism is OpenMP (libgomp in the Linux wheels). The runtime gives every thread
that runs a parallel region a team of worker threads, kept for as long as that thread lives;
once the process holds more such threads than it has cores, every team's workers go to sleep
at each barrier instead of spinning, and each parallel region then pays for waking them. On a
2-core host that took about a tenth of every forward pass's CPU time (docs/performance.md, "One
compute thread on the CPU").

So the forward passes run on one compute lane (``compute_lane.ComputeLane``), whose first
worker alone runs passes on several threads (its second runs passes on one thread beside it,
which makes no team), and the pools that tokenize, collate, decode images and postprocess start
their threads with ``serial_openmp``: torch's operators there (padding, GLiNER's collation and
span decoding, an image processor's tensors) run on the calling thread alone and make no team.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: File names of the OpenMP runtimes torch ships with (GNU, Intel, LLVM).
_RUNTIMES = ("libgomp", "libiomp", "libomp")


@functools.cache
def torch_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded from torch's own folder (Linux: ``/proc/self/maps``), or None
    (another platform, or a torch without one)."""
    import torch

    package = Path(torch.__file__).resolve().parent
    # torch/lib, or torch.libs beside it (where auditwheel puts vendored libraries)
    folders = (package, package.parent / "torch.libs")
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = Path(line.split()[-1])
        if path.name.startswith(_RUNTIMES) and any(path.is_relative_to(f) for f in folders):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def thread_width(threads: int) -> None:
    """The calling thread's parallel regions (torch's operators, MKL's and oneDNN's kernels) run
    on ``threads`` threads. OpenMP's thread count is a per-thread setting, so the other threads
    keep theirs; ``torch.set_num_threads`` would also change the count every thread that starts
    later takes, so it is only the fallback where torch's runtime is not found. May raise."""
    import torch

    # torch sets this thread's count from its global one on first use; do that first, so it
    # cannot undo what follows.
    torch.get_num_threads()
    runtime = torch_openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(threads)
    else:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def serially() -> Iterator[None]:
    """Inside the block, the calling thread's parallel regions run on one thread; its own width
    comes back after. For work done on the event loop (a lone request's job and ``finish``,
    pipeline.py), which must not give the loop's thread an OpenMP team of its own. Nothing
    changes where torch's runtime is not found: the only fallback would change every thread's
    count."""
    runtime = torch_openmp()
    if runtime is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()  # this thread's count
    runtime.omp_set_num_threads(1)
    try:
        yield
    finally:
        runtime.omp_set_num_threads(previous)


def serial_openmp() -> None:
    """Thread initializer: parallel regions on this thread get one thread (no team). Never
    raises: a pool whose initializer fails refuses all its work, and this is only an
    optimisation."""
    try:
        thread_width(1)
    except Exception:
        log.warning("could not keep a helper thread out of torch's OpenMP teams", exc_info=True)
