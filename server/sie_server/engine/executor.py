"""The per-model ``BatchExecutor``: the one place where the event loop meets threads.

* ``submit`` (event loop) admits items with a real cost, or fails fast with ``QueueFull``.
* The scheduler task (event loop) forms batches with ``PendingQueue`` and collates them in the
  prep pool while the model runs (an idle model's batch is collated on the compute thread that
  runs it). With the model idle it dispatches at once; with ``batch_wait_ms`` set (off by
  default), right after a batch of several items it may wait that long (at most a quarter of
  that batch's forward pass) for that batch's callers to come back, so closed-loop clients ride
  together instead of one running alone. While the model runs, it prepares the next batch only
  once a full one is pending, so partial batches keep collecting arrivals until the model frees
  up. At most two batches are in flight (one running, one ready); when the model's passes may
  overlap (``set_concurrency``: the adapter's ``concurrent_passes``) and its lane has two
  workers, two may run side by side, plus one ready.
* The model thread (``model_thread.ModelThread``, one per model) runs forward passes, plus any
  ``call`` (warm-up, unload, alone), on its compute lane (compute_lane.py: shared by every model
  on the CPU, one per model on a GPU), and splits a batch that runs out of memory; ``call_aside``
  runs a load beside the lane; ``_complete`` resolves the batch's futures back on the event
  loop.
* Every item's future is resolved exactly once: by its batch's result or error, by
  ``DeadlineExceeded`` the moment it expires while queued (a timer per item), or by
  ``ShuttingDown`` on close. Work whose caller cancelled leaves the queue and frees its admission
  at once, before it can reach the model. A ``call`` after close fails with ``ShuttingDown``. If
  the scheduler ever dies, it says why in the log, fails everything queued with
  ``InternalError``, and refuses new work with the same error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sie_server.domain import BatchRunner, WorkGroup
from sie_server.engine.admission import Admission, AdmissionLimits
from sie_server.engine.batching import Batch, BatchLimits, PendingQueue
from sie_server.engine.compute_lane import ComputeLane
from sie_server.engine.model_thread import BatchJob, ItemFailed, ModelThread, is_out_of_memory
from sie_server.engine.work import WorkItem
from sie_server.errors import (
    DeadlineExceeded,
    InferenceError,
    InternalError,
    ResourceExhausted,
    ShuttingDown,
    SIEServerError,
)
from sie_server.observability.tracing import NO_TRACING, Tracing

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    max_batch_tokens: int = 16384
    max_batch_items: int = 64
    #: Largest share of a batch's padded tokens that may be padding (1.0: no cap).
    max_batch_padding: float = 0.10
    #: Batches a request's last pending item may be passed over for before it rides in the
    #: next one whatever its padding (None: never forced; see ``BatchLimits.max_skips``).
    max_batch_skips: int | None = None
    #: Admission bound: tokens admitted and not yet resolved, per model.
    max_pending_tokens: int = 262144
    max_pending_items: int = 8192
    #: Requests of this model being prepared (tokenized) at once: work before the queue is
    #: bounded too, so a burst is refused before it is tokenized, not after.
    max_preparing_requests: int = 64
    #: Retry hint sent with QueueFull.
    queue_full_retry_s: float = 0.5
    #: Under load, how long an idle model may wait for the callers of the batch that just ended
    #: to send their next calls, so closed-loop clients do not split into a lone call and
    #: everyone else (batches of 1, N-1, 1, N-1 and a p99 of two batches). At most this, at
    #: most a quarter of the last batch's forward pass, never when the last batch was one item.
    batch_wait_ms: float = 0.0
    #: Tracing hooks (``--tracing``): the request's span is captured at submit, and each batch
    #: reported when it completes. A no-op by default.
    tracing: Tracing = NO_TRACING
    #: How often (at most) the model thread returns the heap's free pages (0: never).
    malloc_trim_interval_s: float = 0.0
    #: Bulk (streamed) work while interactive requests are about (one arrived within
    #: ``interactive_window_s``): its batches hold at most this many items, and no bulk batch is
    #: prepared ahead, so an interactive arrival waits for one short batch at most.
    bulk_batch_items: int = 2
    interactive_window_s: float = 1.0
    #: While interactive requests are about, how long an idle model holds pending bulk work
    #: after a batch with interactive items ends, for those callers' next requests: a
    #: closed-loop client's next query then runs before the next bulk pass, not behind it.
    #: Counted from the batch's end; an interactive arrival ends the hold. 0: never hold.
    bulk_grace_ms: float = 5.0
    #: The grace never holds bulk work longer than this since it last ran (or arrived), so
    #: back-to-back interactive calls cannot starve a stream: it gets a pass at least this often.
    bulk_hold_max_ms: float = 50.0

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(
            self.max_batch_tokens,
            self.max_batch_items,
            self.max_batch_padding,
            self.max_batch_skips,
        )

    @property
    def bulk_limits(self) -> BatchLimits:
        return BatchLimits(
            self.max_batch_tokens,
            min(self.bulk_batch_items, self.max_batch_items),
            self.max_batch_padding,
            self.max_batch_skips,
        )


@dataclass(frozen=True, slots=True)
class BatchStats:
    batch_id: int
    items: int
    tokens: int
    padded_tokens: int
    inference_ms: float
    ok: bool


class BatchExecutor:
    def __init__(
        self,
        name: str,
        config: ExecutorConfig,
        prep_pool: Executor,
        *,
        run_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        on_batch: Callable[[BatchStats], None] | None = None,
        lane: ComputeLane | None = None,
    ) -> None:
        """``lane``: the compute lane shared with other models (None: one of its own)."""
        self.name = name
        self.config = config
        self._prep_pool = prep_pool
        self._on_batch = on_batch
        self._pending = PendingQueue()
        self._admission = Admission(
            name,
            AdmissionLimits(
                config.max_pending_tokens,
                config.max_pending_items,
                config.max_preparing_requests,
                config.queue_full_retry_s,
            ),
        )
        self._in_flight = 0
        #: Whether this model's forward passes may overlap (``set_concurrency``).
        self._concurrent: Callable[[], bool] = _never
        self._batch_ids = 0
        #: The last finished batch: its size, when it ended, its forward pass (seconds).
        self._last_items = 0
        self._last_done = 0.0
        self._last_run_s = 0.0
        #: Items admitted since the last batch ended (its callers' next calls among them).
        self._arrived = 0
        self._closing = False
        self._requests = 0
        #: When the last interactive (not bulk) request was admitted, and when the last batch
        #: holding interactive items ended.
        self._last_interactive = -math.inf
        self._last_interactive_done = -math.inf
        #: When bulk work last ran a batch, or last arrived to an empty bulk queue.
        self._bulk_served = -math.inf
        self._broken: InternalError | None = None
        self._thread = ModelThread(
            name,
            self._complete,
            run_context,
            trim_interval_s=config.malloc_trim_interval_s,
            lane=lane,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        #: Set when the last admitted item resolves, while ``drained`` waits for it.
        self._drained: asyncio.Event | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._thread.start(self._loop)
        self._scheduler = self._loop.create_task(
            self._schedule(), name=f"sie-scheduler-{self.name}"
        )
        self._scheduler.add_done_callback(self._scheduler_ended)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, fail what is still queued, finish the running batch, stop the thread."""
        self._closing = True
        for item in self._pending.remove_where(lambda _: True):
            self._fail(item, ShuttingDown("server is shutting down", model=self.name))
        if self._scheduler is not None:
            self._scheduler.cancel()
            # A scheduler that died has said why already (``_scheduler_ended``).
            await asyncio.gather(self._scheduler, return_exceptions=True)
        await self._thread.stop(timeout_s)

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every admitted item is resolved (at most ``timeout_s``); True if so."""
        if not self._admission.items:
            return True
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        return not self._admission.items

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closing:
            return
        error = task.exception()
        log.error("%s: the batch scheduler died; failing queued work", self.name, exc_info=error)
        self._broken = InternalError(
            f"the batch scheduler of {self.name} failed: {type(error).__name__}: {error}",
            model=self.name,
        )
        for item in self._pending.remove_where(lambda _: True):
            self._fail(item, self._broken)

    # ---- observation -----------------------------------------------------------------------
    @property
    def pending_items(self) -> int:
        """Items admitted and not yet resolved."""
        return self._admission.items

    @property
    def queued_items(self) -> int:
        """Items waiting for a batch (admitted, not yet collated or running)."""
        return len(self._pending)

    @property
    def batches_in_flight(self) -> int:
        return self._in_flight

    @property
    def lane(self) -> ComputeLane:
        """The compute lane this model's batches and calls run on."""
        return self._thread.lane

    # ---- the model thread's own calls ----------------------------------------------------------
    def set_concurrency(self, concurrent: Callable[[], bool]) -> None:
        """``concurrent()`` says, at each batch, whether this model's forward passes may run
        side by side (the adapter's ``concurrent_passes``; until this is called: never)."""
        self._concurrent = concurrent

    def _alone(self) -> bool:
        return not self._concurrent()

    def _running_limit(self) -> int:
        """Batches of this model that may run at once: the lane's workers, or one."""
        return self._thread.lane.workers if self._concurrent() else 1

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the model thread (warm-up, unload), in order with batches."""
        return self._call(fn, aside=False)

    def call_aside(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` (a load) on a thread of its own, beside the lane's batches."""
        return self._call(fn, aside=True)

    def _call(self, fn: Callable[[], T], *, aside: bool) -> asyncio.Future[T]:
        assert self._loop is not None, "start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        if self._closing:
            future.set_exception(ShuttingDown("server is shutting down", model=self.name))
        elif aside:
            self._thread.call_aside(fn, future)
        else:
            self._thread.call(fn, future)
        return future

    # ---- admission ---------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Fail fast before any work is spent on a request (e.g. tokenizing it)."""
        self._check_open()
        self._admission.check()

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDown("server is shutting down", model=self.name)
        if self._broken is not None:
            raise self._broken

    @contextlib.contextmanager
    def preparing(self, items: int = 0) -> Iterator[None]:
        """Hold one of the ``max_preparing_requests`` slots, and reserve ``items``, while a
        request is tokenized; refuse with QueueFull (retryable) when they are all taken or the
        request would not fit the queue (``Admission``)."""
        self._check_open()
        with self._admission.preparing(items):
            yield

    def submit(
        self,
        payloads: Sequence[tuple[Any, int]],
        key: Hashable,
        runner: BatchRunner,
        deadline: float | None = None,
    ) -> list[WorkItem]:
        """Admit ``(payload, cost)`` pairs sharing ``key`` (one group; see ``submit_groups``)."""
        group = WorkGroup([p for p, _ in payloads], [c for _, c in payloads], key, runner)
        return self.submit_groups([group], deadline)[0]

    def submit_groups(
        self, groups: Sequence[WorkGroup], deadline: float | None = None, *, bulk: bool = False
    ) -> list[list[WorkItem]]:
        """Admit one request's groups; one work item (with its future and timing) per payload,
        in order, per group. ``bulk``: a streamed request, which yields to interactive ones.

        The request is admitted whole or refused whole with ``QueueFull`` (``Admission``).
        """
        assert self._loop is not None, "start() first"
        assert self._wake is not None
        self._check_open()
        count = sum(len(g.payloads) for g in groups)
        self._admission.admit(sum(sum(g.costs) for g in groups), count)
        self._arrived += count
        admitted: list[list[WorkItem]] = []
        self._requests += 1
        if not bulk:
            self._last_interactive = time.monotonic()
        elif not self._pending.bulk:
            self._bulk_served = time.monotonic()
        trace = self.config.tracing.capture()
        for group in groups:
            items: list[WorkItem] = []
            for payload, item_cost in zip(group.payloads, group.costs, strict=True):
                future: asyncio.Future[Any] = self._loop.create_future()
                item = WorkItem(
                    payload,
                    item_cost,
                    group.key,
                    group.runner,
                    future,
                    deadline,
                    request=self._requests,
                    trace=trace,
                    bulk=bulk,
                )
                future.add_done_callback(functools.partial(self._resolved, item))
                if deadline is not None:
                    item.expiry = self._loop.call_later(
                        max(0.0, deadline - time.monotonic()), self._expire, item
                    )
                self._pending.push(item)
                items.append(item)
            admitted.append(items)
        if count:
            self._wake.set()
        return admitted

    def _resolved(self, item: WorkItem, future: asyncio.Future[Any]) -> None:
        """Release the item's admission; a cancelled item still queued leaves the queue now
        (other resolutions happen only once the item has left the queue)."""
        self._admission.release(item.cost)
        if not self._admission.items and self._drained is not None:
            self._drained.set()
        if item.expiry is not None:
            item.expiry.cancel()
        if future.cancelled():
            self._pending.discard(item)

    def _expire(self, item: WorkItem) -> None:
        if self._pending.discard(item):
            self._fail(item, DeadlineExceeded("deadline passed while queued", model=self.name))

    # ---- scheduling (event loop) ---------------------------------------------------------------
    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._should_dispatch():
                if (delay := max(self._arrival_wait(), self._bulk_grace())) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    self._wake.clear()
                    continue
                batch = self._take_batch(ahead=self._in_flight >= self._running_limit())
                if batch is None:
                    break
                await self._dispatch(batch)

    def _should_dispatch(self) -> bool:
        if not self._pending:
            return False
        limit = self._running_limit()
        if self._in_flight < limit:
            return True
        return (
            self._in_flight == limit
            and not self._bulk_yields()
            and self._pending.has_full_batch(self.config.limits)
        )

    def _bulk_yields(self) -> bool:
        """Bulk work is pending while interactive requests are about: bulk batches stay short
        and none is prepared ahead (see ``ExecutorConfig.bulk_batch_items``)."""
        recent = time.monotonic() - self._last_interactive < self.config.interactive_window_s
        return recent and self._pending.bulk > 0

    def _bulk_grace(self) -> float:
        """Seconds to hold an idle model whose pending work is all bulk, for the interactive
        callers of the batch that just ended (see ``bulk_grace_ms``); 0 once it has passed, once
        bulk work has waited ``bulk_hold_max_ms``, or when an interactive item is pending or none
        arrived lately."""
        if self._in_flight or self.config.bulk_grace_ms <= 0:
            return 0.0
        if self._pending.bulk < len(self._pending) or not self._bulk_yields():
            return 0.0
        now = time.monotonic()
        grace = self.config.bulk_grace_ms / 1000.0 - (now - self._last_interactive_done)
        hold = self.config.bulk_hold_max_ms / 1000.0 - (now - self._bulk_served)
        return max(0.0, min(grace, hold))

    def _arrival_wait(self) -> float:
        """Seconds to hold an idle model for the last batch's callers (see ``batch_wait_ms``);
        0 with the model busy, a full batch pending, or as many items arrived since the last
        batch ended as it held (its callers are back). Items that were pending before it ended
        do not count: closed-loop clients in two groups that take turns (one group's batch
        runs while the other's calls come back) merge into one batch instead of staying split."""
        if self._in_flight or self._last_items <= 1 or self.config.batch_wait_ms <= 0:
            return 0.0
        if self._arrived >= self._last_items:
            return 0.0
        if self._pending.has_full_batch(self.config.limits):
            return 0.0
        window = min(self.config.batch_wait_ms / 1000.0, self._last_run_s / 4)
        return max(0.0, window - (time.monotonic() - self._last_done))

    def _take_batch(self, *, ahead: bool) -> Batch | None:
        now = time.monotonic()
        for item in self._pending.remove_where(lambda it: it.dead or it.expired(now)):
            self._fail(item, DeadlineExceeded("deadline passed while queued", model=self.name))
        bulk_limits = self.config.bulk_limits if self._bulk_yields() else None
        return self._pending.take_batch(
            self.config.limits, full_only=ahead, bulk_limits=bulk_limits
        )

    async def _dispatch(self, batch: Batch) -> None:
        assert self._loop is not None
        self._batch_ids += 1
        batch_id = self._batch_ids
        for item in batch.items:
            item.timing.batch_id = batch_id
        runner = batch.items[0].runner
        idle = self._in_flight == 0
        self._in_flight += 1
        try:
            # The prep thread collates the next batch while one runs. An idle model's batch is
            # collated by the compute thread that runs it (inputs None): through the prep thread
            # it would only wait for two more thread handoffs (docs/performance.md).
            inputs = (
                None
                if idle
                else await self._loop.run_in_executor(
                    self._prep_pool, runner.collate, [item.payload for item in batch.items]
                )
            )
        except asyncio.CancelledError:  # close() while collating: the batch never runs
            self._in_flight -= 1
            for item in batch.items:
                self._fail(item, ShuttingDown("server is shutting down", model=self.name))
            raise
        except Exception as exc:
            log.exception("collating a batch of %s failed", self.name)
            self._in_flight -= 1
            for item in batch.items:
                self._fail(
                    item, InferenceError(f"preparing the batch failed: {exc}", model=self.name)
                )
            return
        requests = frozenset(item.request for item in batch.items)
        self._thread.run_batch(
            BatchJob(batch, inputs, batch_id),
            alone=self._alone,
            last=lambda: not self._pending.others_pending(requests),
        )

    # ---- resolution (event loop) -------------------------------------------------------------------
    def _complete(
        self, job: BatchJob, results: list[Any] | None, error: BaseException | None, ms: float
    ) -> None:
        assert self._wake is not None
        self._in_flight -= 1
        items = job.batch.items
        previous_done = self._last_done
        self._last_items, self._last_done, self._last_run_s = (
            len(items),
            time.monotonic(),
            ms / 1000.0,
        )
        self._arrived = 0
        if all(item.bulk for item in items):
            self._bulk_served = self._last_done
        else:
            self._last_interactive_done = self._last_done
        # The model's rate: with passes side by side, each pass runs longer than the time the
        # model took for its tokens, which is at most the time since the previous pass ended.
        self._admission.observe_batch(
            job.batch.tokens, min(ms / 1000.0, self._last_done - previous_done)
        )
        if error is None and (results is None or len(results) != len(items)):
            error = InferenceError(
                f"adapter returned {len(results or [])} results for {len(items)} items"
            )
        failure = None if error is None else self._as_domain_error(error)
        for index, item in enumerate(items):
            item.timing.inference_ms = ms
            item.timing.inference_started = job.started
            if failure is not None:
                self._fail(item, failure)
                continue
            assert results is not None
            result = results[index]
            if isinstance(result, ItemFailed):
                self._fail(item, result.error)
            elif not item.future.done():
                item.future.set_result(result)
        stats = BatchStats(
            job.batch_id, len(items), job.batch.tokens, job.batch.padded_tokens, ms, failure is None
        )
        if self._on_batch is not None:
            self._on_batch(stats)
        self._wake.set()
        self.config.tracing.batch_done(self.name, stats, [item.trace for item in items])

    def _as_domain_error(self, error: BaseException) -> SIEServerError:
        if isinstance(error, SIEServerError):
            return error
        if is_out_of_memory(error):
            return ResourceExhausted(f"out of memory running one item: {error}", model=self.name)
        log.error("%s: batch failed", self.name, exc_info=error)
        return InferenceError(f"inference failed: {type(error).__name__}: {error}", model=self.name)

    @staticmethod
    def _fail(item: WorkItem, error: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(error)


def _never() -> bool:
    return False
