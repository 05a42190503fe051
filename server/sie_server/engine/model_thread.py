"""The model thread: each model's jobs, run on a compute lane (compute_lane.py).

Two kinds of job: a batch's forward pass (``run_batch``) and a plain ``call`` (warm-up, unload,
a LoRA adapter's load), in order on the lane; a call runs alone. A model's load runs beside the
lane (``call_aside``), on a thread of its own that ends with the load, so that loading one model
never holds up another's batches. Results go back to the event loop with
``call_soon_threadsafe``; nothing here touches an asyncio object from a thread.

On a GPU each model gets its own lane (``sie-model-<name>``, one worker), so that one model's
Python work overlaps another's kernels. On the CPU every model shares one lane (``sie-compute``):
torch's OpenMP runtime (libgomp) gives each thread that runs a parallel region a team of worker
threads that lives as long as that thread, and once the process holds more such threads than
cores, every team's workers sleep at each barrier instead of spinning (openmp.py keeps the
helper pools out of it too). With a second model loaded, a thread per model left the server at
1.69-1.80 of 2 cores against 1.95-1.98 with one lane, and served 10-12% fewer pairs and texts a
second (``bench/bench_threads.py``, docs/performance.md, "One compute thread on the CPU"). The
shared lane has two workers that split the cores under load, one OpenMP thread each, so no
second team is made (compute_lane.py); a batch of a model whose passes may overlap (the
adapter's ``concurrent_passes``) may run beside another, any other batch runs alone.

Out of memory: a batch that runs out of memory is split in halves and retried, after freeing its
inputs, the exception's frames and CUDA's cache; a part as large as one that already failed is
split without a pass, so the failed passes (and their collections, 20-35 ms of GIL each on a
settled heap) grow with the halvings, not with the batch. An item that runs out of memory alone
gets ``ItemFailed`` in its slot and its batch mates keep their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sie_server.allocator import trim
from sie_server.domain import BatchRunner
from sie_server.engine.batching import Batch
from sie_server.engine.compute_lane import ComputeLane, set_thread_width
from sie_server.errors import ResourceExhausted, SIEServerError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ItemFailed:
    """In a batch's results: this one item failed (the others did not)."""

    error: SIEServerError


@dataclass(slots=True)
class BatchJob:
    batch: Batch
    inputs: Any
    batch_id: int
    #: When its forward pass started (``time.perf_counter()``; set on the lane).
    started: float = 0.0

    def take_inputs(self) -> Any:
        inputs, self.inputs = self.inputs, None
        return inputs


#: Called on the event loop when a batch ends: (job, results or None, error or None, forward ms).
BatchDone = Callable[[BatchJob, "list[Any] | None", "BaseException | None", float], None]


@dataclass(slots=True)
class _CallJob:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


def free_device_memory() -> None:
    """After an out-of-memory: collect cycles and return CUDA's cached blocks (no-op on CPU;
    torch is only looked up if the process already imported it)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class ModelThread:
    def __init__(
        self,
        name: str,
        on_batch_done: BatchDone,
        run_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        trim_interval_s: float = 0.0,
        lane: ComputeLane | None = None,
    ) -> None:
        """``trim_interval_s``: after a batch, at most this often, hand the heap's free pages
        back to the system (``allocator.trim``; 0 = never). ``lane``: the lane shared with other
        models (None: a lane of its own, ``sie-model-<name>``, stopped with this model)."""
        self.name = name
        self._trim_interval_s = trim_interval_s
        self._last_trim = time.monotonic()
        self._on_batch_done = on_batch_done
        self._run_context = run_context
        self._own_lane = lane is None
        self._lane = ComputeLane(f"sie-model-{name}") if lane is None else lane
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def lane(self) -> ComputeLane:
        """The lane this model's jobs run on (shared with other models, or its own)."""
        return self._lane

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lane.start()

    def call(self, fn: Callable[[], T], future: asyncio.Future[T]) -> None:
        """Run ``fn`` on the lane after the jobs already queued; its result or exception
        settles ``future``."""
        what = f"{self.name}: {_call_name(fn)}"
        self._lane.put(functools.partial(self._run_call, _CallJob(fn, future)), what, alone=True)

    def call_aside(self, fn: Callable[[], T], future: asyncio.Future[T]) -> None:
        """Run ``fn`` now on a thread of its own (``sie-load-<name>``) that ends with it: for a
        load, which may take minutes and must not hold up the lane's other models."""
        threading.Thread(
            target=self._run_aside,
            args=(_CallJob(fn, future),),
            name=f"sie-load-{self.name}",
            daemon=True,
        ).start()

    def run_batch(
        self,
        job: BatchJob,
        *,
        alone: bool | Callable[[], bool] = True,
        last: bool | Callable[[], bool] = True,
    ) -> None:
        """Run the batch after the jobs already queued; ``on_batch_done`` gets its outcome.
        ``alone`` (or ``alone()``, asked when it is put and when it may start): no other job runs
        beside it (False: the model's passes may overlap). ``last`` (or ``last()``): no other
        request's work is pending for the model, so that on an otherwise empty lane the batch
        runs on all its cores (compute_lane.py)."""
        what = f"{self.name}: a batch of {len(job.batch.items)} items"
        self._lane.put(functools.partial(self._run_batch, job), what, alone=alone, last=last)

    async def stop(self, timeout_s: float) -> None:
        """Stop after this model's jobs already queued (waiting at most ``timeout_s`` for them);
        a shared lane goes on serving the other models."""
        if self._own_lane:
            await self._lane.stop(timeout_s)
        else:
            await self._lane.passed(timeout_s)

    # ---- on the lane -----------------------------------------------------------------------------
    def _run_aside(self, job: _CallJob) -> None:
        # A fresh thread takes torch's last thread count set anywhere (a narrow worker's, say):
        # a load gets the lane's whole width (ONNX Runtime sizes its pool from it).
        set_thread_width(self._lane.wide_threads)
        self._run_call(job)

    def _run_call(self, job: _CallJob) -> None:
        assert self._loop is not None
        try:
            with self._run_context():
                result = job.fn()
        except BaseException as exc:  # delivered to the awaiting caller
            self._loop.call_soon_threadsafe(_settle, job.future, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, job.future, result, None)

    def _run_batch(self, job: BatchJob) -> None:
        assert self._loop is not None
        runner = job.batch.items[0].runner
        payloads = [item.payload for item in job.batch.items]
        started = job.started = time.perf_counter()
        results: list[Any] | None = None
        error: BaseException | None = None
        try:
            with self._run_context():
                # Handed over, not kept: the forward pass holds the only reference to the batch's
                # tensors, so an out-of-memory split can free them.
                results = self._forward(
                    runner, job.take_inputs(), payloads, _SplitBound(len(payloads) + 1)
                )
        except BaseException as exc:  # resolved into the batch's futures
            error = exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._loop.call_soon_threadsafe(self._on_batch_done, job, results, error, elapsed_ms)
        del results, error
        now = time.monotonic()
        if self._trim_interval_s > 0 and now - self._last_trim >= self._trim_interval_s:
            self._last_trim = now
            trim()

    def _forward(
        self, runner: BatchRunner, inputs: Any, payloads: list[Any], bound: _SplitBound
    ) -> list[Any]:
        """Runs ``payloads`` (``inputs`` is their collation, or None to collate them here). A
        part at least as large as one that already ran out of memory in this batch is split
        without being tried; a single item is always tried."""
        if len(payloads) == 1 or len(payloads) < bound.failed_items:
            try:
                return runner.run(runner.collate(payloads) if inputs is None else inputs)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                message = str(exc)
            # Outside the except block, so the exception's traceback (whose frames hold the
            # batch's activations) is gone too; then the inputs, and the device's cached blocks.
            del inputs
            free_device_memory()
            if len(payloads) == 1:
                # This item may be why the parts around it failed: its batch mates are tried at
                # their own sizes again, not one at a time.
                bound.failed_items = bound.unknown
                error = ResourceExhausted(
                    f"out of memory running one item: {message}", model=self.name
                )
                return [ItemFailed(error)]
            bound.failed_items = len(payloads)
            log.warning("%s: out of memory on %d items, splitting", self.name, len(payloads))
        else:
            del inputs
        half = len(payloads) // 2
        left, right = payloads[:half], payloads[half:]
        return self._forward(runner, None, left, bound) + self._forward(runner, None, right, bound)


@dataclass(slots=True)
class _SplitBound:
    """The fewest items of one batch that ran out of memory together, across its split: parts
    that large are split without a pass, so a 64-item batch whose items fit only one at a time
    costs one failed pass per halving (64, 32, ..., 2: 6), not one per part that holds two or
    more items (63). An item that runs out of memory alone resets it to ``unknown``: the
    failures above it may have been its own."""

    unknown: int
    failed_items: int = 0

    def __post_init__(self) -> None:
        self.failed_items = self.unknown


def _call_name(fn: Callable[..., Any]) -> str:
    """A call's function name (``unload``, ``warm_up``, ``attach_lora``), through a partial."""
    name = str(getattr(getattr(fn, "func", fn), "__name__", ""))
    return name if name.isidentifier() else "a call"


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
