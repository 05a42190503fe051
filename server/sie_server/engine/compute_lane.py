"""A compute lane: the OS threads that run forward passes, and how many cores each pass gets.

A lane runs jobs in the order they were put, on ``workers`` threads. With one worker (a GPU's
per-model lanes) that is all. On the CPU every model shares one lane (model_thread.py says why),
and its two workers share the cores between them:

* **Wide**: a job with nothing to run beside it runs alone on all of the lane's cores
  (``wide_threads``): put while the lane is idle (nothing running, nothing waiting) and
  ``last()`` (no other request's work is pending for its model), or, put narrow, still so when
  it starts. A lone request, the light-load case, gets the whole machine, and so does each batch
  of a lone bulk request in turn: its batches come in one burst of uneven sizes (length-sorted
  windows) and the request ends with its last one, so side by side they left a core idle behind
  the longest (one client x 32 medium texts: 0.63-0.80x the texts a second of one worker).
* **Narrow**: any other job runs on ``narrow_threads`` (the cores split between the workers),
  beside another narrow job. Under load, two batches run side by side, each with one OpenMP
  thread on a 2-core host, instead of one batch after another on two.
* **Alone**: a job that must not overlap any other (a warm-up, an unload, a LoRA attach, a
  forward pass of a model whose passes may not overlap, such as ONNX Runtime's, which brings
  threads of its own) runs wide, once nothing else runs, and nothing starts beside it.

Why narrow under load: the work around the model (gRPC, the event loop, tokenizing) runs on the
same cores as the forward pass, and each time it takes a core from one of a pass's two OpenMP
threads, the other spins at the next barrier, waiting; side by side, a one-thread pass loses
just the time taken from it. And one thread per pass has no barriers to pay at all. On the
2-core AVX2 host, 32 clients x one medium text served 1.13-1.42x the texts a second of one
two-thread pass at a time, short texts 1.15-1.24x, and the server went from 0.84-0.86x to
0.95-1.04x the library's best batch in process (docs/performance.md, "Two passes side by side").

Jobs never overtake: the head of the queue waits until it may start, and the jobs behind it
wait with it. Only the first worker runs wide or alone jobs, so with one thread per narrow job
(two workers on two cores) a single thread ever holds a team of OpenMP threads (a second team
would make every team's workers sleep at their barriers, openmp.py). With more cores each
narrow job has a team of its own; that layout is not measured here, so ``--compute-workers``
picks two workers by itself on two cores only (``device.compute_layout``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sie_server.engine.openmp import thread_width

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    fn: Callable[[], None]
    what: str
    #: Whether it must run alone, asked when it is put and again when it may start (a LoRA
    #: attach that ran in between makes a model's passes stateful).
    alone: Callable[[], bool]
    #: Whether nothing that could run beside it is waiting to be put (asked when it is put to
    #: an idle lane, and when it starts with the lane otherwise empty): then it runs wide.
    last: Callable[[], bool]
    wide: bool
    #: Ends the workers once the jobs put before it have run.
    stop: bool = False
    #: When it started (``time.monotonic()``), once a worker runs it.
    started: float = 0.0


def _nothing() -> None:
    return None


def _constant(value: bool) -> Callable[[], bool]:
    return lambda: value


def _asked(value: bool | Callable[[], bool]) -> Callable[[], bool]:
    return value if callable(value) else _constant(value)


def set_thread_width(threads: int) -> None:
    """The calling thread's torch operators run on ``threads`` threads (0: leave as is); the
    other threads keep theirs (``openmp.thread_width``). Never raises: the width is only an
    optimisation."""
    if threads <= 0:
        return
    try:
        thread_width(threads)
    except Exception:
        log.warning("could not set this thread's torch threads to %d", threads, exc_info=True)


class ComputeLane:
    """Threads running jobs in the order they were put: one at a time with one worker; with
    more, narrow jobs side by side (see the module's docstring)."""

    def __init__(
        self, name: str, workers: int = 1, wide_threads: int = 0, narrow_threads: int = 0
    ) -> None:
        """``wide_threads`` / ``narrow_threads``: the torch threads of a job run alone or side by
        side (0: leave the worker's as they are)."""
        if workers < 1:
            raise ValueError(f"a compute lane needs at least one worker; got {workers}")
        self.name = name
        self.workers = workers
        self.wide_threads = wide_threads
        self.narrow_threads = narrow_threads
        self._queue: deque[_Job] = deque()
        self._running: list[_Job | None] = [None] * workers
        self._changed = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(index,),
                name=name if index == 0 else f"{name}-{index}",
                daemon=True,
            )
            for index in range(workers)
        ]
        self._start_lock = threading.Lock()

    @property
    def busy(self) -> tuple[float, str] | None:
        """The longest-running job: when it started (``time.monotonic()``) and what it is; None
        when the lane waits for work. Read from the event loop (``grpc_api.compute_watch``)."""
        with self._changed:
            running = [job for job in self._running if job is not None]
        oldest = min(running, key=lambda job: job.started, default=None)
        return None if oldest is None else (oldest.started, oldest.what)

    def start(self) -> None:
        """Start the threads (once; later calls do nothing)."""
        with self._start_lock:
            if self._threads[0].ident is None:  # never started
                for thread in self._threads:
                    thread.start()

    def put(
        self,
        job: Callable[[], None],
        what: str,
        *,
        alone: bool | Callable[[], bool] = False,
        last: bool | Callable[[], bool] = True,
    ) -> None:
        """Run ``job`` after the jobs already put; ``what`` names it while it runs (``busy``).
        ``alone`` (or, asked when it is put and when it may start, ``alone()``): nothing else
        runs while it does. ``last`` (or ``last()``): nothing that could run beside it is waiting
        to be put, so that on an otherwise empty lane it runs wide (module docstring)."""
        self._put(_Job(job, what, _asked(alone), _asked(last), wide=False))

    async def stop(self, timeout_s: float) -> None:
        """End the threads after the jobs already put (waiting at most ``timeout_s`` for them)."""
        self._put(_Job(_nothing, "stop", _constant(True), _constant(True), wide=True, stop=True))
        alive = [thread for thread in self._threads if thread.is_alive()]
        if alive:
            await asyncio.to_thread(_join_all, alive, timeout_s)

    async def passed(self, timeout_s: float) -> None:
        """Wait until the jobs already put have run (at most ``timeout_s``)."""
        if not self._threads[0].is_alive():
            return
        reached = threading.Event()
        self.put(reached.set, "a marker", alone=True)
        await asyncio.to_thread(reached.wait, timeout_s)

    def _put(self, job: _Job) -> None:
        with self._changed:
            idle = not self._queue and not any(self._running)
            job.wide = self.workers == 1 or job.alone() or (idle and job.last())
            self._queue.append(job)
            self._changed.notify_all()

    def _startable(self, index: int) -> _Job | None:
        """The queue's head when worker ``index`` may start it now (under ``_changed``)."""
        if not self._queue:
            return None
        head, running = self._queue[0], [job for job in self._running if job is not None]
        if not head.wide and head.alone():  # a pass that became stateful since it was put
            head.wide = True
        if not head.wide and not running and len(self._queue) == 1 and head.last():
            head.wide = True  # all the work there is, after all: every core
        if head.wide:  # the first worker's, once nothing runs
            return head if index == 0 and not running else None
        return head if not any(job.wide for job in running) else None

    def _run(self, index: int) -> None:
        width = 0
        while True:
            with self._changed:
                while not self._stopped and (job := self._startable(index)) is None:
                    self._changed.wait()
                if self._stopped or job is None:
                    return
                self._queue.popleft()
                if job.stop:
                    self._stopped = True
                    self._changed.notify_all()
                    return
                job.started = time.monotonic()
                self._running[index] = job
            wanted = self.wide_threads if job.wide else self.narrow_threads
            if wanted and wanted != width:
                set_thread_width(wanted)
                width = wanted
            try:
                job.fn()
            except Exception:  # a job settles its own futures; this is a broken loop or a bug
                log.exception("%s: a job failed outside its own handling", self.name)
            finally:
                with self._changed:
                    self._running[index] = None
                    self._changed.notify_all()


def _join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
