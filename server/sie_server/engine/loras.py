"""Which LoRA adapters of a loaded model are resident, and when they load and go (event loop).

The work itself (peft's load, delete, select) runs through the family's ``LoraSupport`` hooks
(``adapters/lora.py``); this module decides when:

* A request names an adapter (``options.lora_id``). ``pinned`` lets it through only when the
  adapter is resident; otherwise it answers ``LoraLoading`` (retryable) at once and starts the
  load, once: the adapter's files are fetched beside the model thread (a download never holds up
  batches, of this model or, on a shared compute thread, of any other), then attached as a
  model-thread call. A failed load answers ``LoraLoadFailed`` naming the adapter
  and the reason until ``load_retry_s`` has passed; the next request then loads it again.
* A request pins its adapter until it completes, so a batch queued on the model thread never
  loses it. Past ``max_resident`` adapters the least recently used unpinned one is deleted on the
  model thread, after the batches already queued there.
* The default profile's adapter loads with the model (``open``), so the warm-up runs through it.
* An evicted adapter that arrived before a model's load settled the heap (``engine/heap.py``)
  may have objects in reference cycles that the collector now skips: its eviction reclaims the
  heap once it is deleted. Other evictions leave it to the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sie_server.adapters.lora import LoraSupport, lora_id_of
from sie_server.engine import heap
from sie_server.engine.executor import BatchExecutor
from sie_server.errors import InvalidInput, LoraLoadFailed, LoraLoading, ModelLoadFailed

log = logging.getLogger(__name__)


class LoraPhase(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(slots=True)
class LoraSlot:
    """One adapter of a loaded model."""

    phase: LoraPhase = LoraPhase.LOADING
    #: When a request last used it (monotonic): the eviction order.
    last_used: float = 0.0
    #: Requests using it now: a pinned adapter is never evicted.
    pins: int = 0
    error: str = ""
    failed_at: float = 0.0
    #: ``heap.epoch()`` when it loaded: a later settle may have frozen its objects.
    settle_epoch: int = 0


@dataclass(slots=True)
class LoraResidency:
    """The LoRA adapters of one loaded model: made with the model, dropped with it."""

    adapter: LoraSupport
    executor: BatchExecutor
    #: Adapters kept resident (least recently used evicted past it).
    max_resident: int
    #: Seconds a failed adapter load is answered LoraLoadFailed before a request retries it.
    load_retry_s: float
    slots: dict[str, LoraSlot] = field(default_factory=dict)
    #: Called (on the event loop) after an adapter was loaded or evicted: the model's memory
    #: changed (the registry re-reads it for the memory budget).
    on_change: Callable[[], None] = field(default=lambda: None)
    #: Loads in flight (held so they are not collected; cancelled with the model).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def model(self) -> str:
        return self.adapter.spec.name

    @classmethod
    async def open(
        cls,
        adapter: LoraSupport,
        executor: BatchExecutor,
        max_resident: int,
        load_retry_s: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> LoraResidency:
        """The residency of a freshly loaded model, with the default profile's adapter loaded
        (ModelLoadFailed when it does not load)."""
        residency = cls(adapter, executor, max_resident, load_retry_s, on_change=on_change)
        spec = adapter.spec
        lora_id = lora_id_of(spec.profile(None).options, spec.name)
        if lora_id is not None:
            try:
                await load_on(executor, adapter, lora_id)
            except Exception as exc:
                raise ModelLoadFailed(
                    f"{spec.name}: the default profile's LoRA adapter {lora_id!r} failed to load: "
                    f"{type(exc).__name__}: {exc}",
                    model=spec.name,
                ) from exc
            residency.slots[lora_id] = LoraSlot(
                LoraPhase.LOADED, time.monotonic(), settle_epoch=heap.epoch()
            )
        return residency

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    @contextlib.contextmanager
    def pinned(self, lora_id: str) -> Iterator[None]:
        """Keep ``lora_id`` resident while the body runs; LoraLoading (after starting its load)
        when it is not resident, LoraLoadFailed within the retry interval of a failed load."""
        reason = self.adapter.lora_unavailable()
        if reason is not None:
            raise InvalidInput(
                f"model {self.model} cannot take LoRA adapters: {reason}", model=self.model
            )
        slot = self._resident(lora_id)
        slot.pins += 1
        try:
            yield
        finally:
            slot.pins -= 1
            self._trim()

    def _resident(self, lora_id: str) -> LoraSlot:
        now = time.monotonic()
        slot = self.slots.get(lora_id)
        if slot is not None and slot.phase is LoraPhase.LOADED:
            slot.last_used = now
            return slot
        if slot is not None and slot.phase is LoraPhase.FAILED:
            retry_in = slot.failed_at + self.load_retry_s - now
            if retry_in > 0:
                raise LoraLoadFailed(
                    f"loading LoRA adapter {lora_id!r} of model {self.model} failed: "
                    f"{slot.error}; the first request after {retry_in:.0f}s loads it again",
                    model=self.model,
                )
        if slot is None or slot.phase is LoraPhase.FAILED:
            self._start_load(lora_id)
        raise LoraLoading(
            f"LoRA adapter {lora_id!r} of model {self.model} is loading; retry shortly",
            lora=lora_id,
            model=self.model,
        )

    def _start_load(self, lora_id: str) -> None:
        slot = self.slots[lora_id] = LoraSlot()
        task = asyncio.get_running_loop().create_task(
            self._load(lora_id, slot), name=f"sie-lora-{self.model}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _load(self, lora_id: str, slot: LoraSlot) -> None:
        started = time.perf_counter()
        try:
            await load_on(self.executor, self.adapter, lora_id)
        except Exception as exc:
            log.warning("loading LoRA adapter %r of %s failed: %s", lora_id, self.model, exc)
            slot.phase, slot.failed_at = LoraPhase.FAILED, time.monotonic()
            slot.error = f"{type(exc).__name__}: {exc}"
            return
        slot.phase, slot.last_used = LoraPhase.LOADED, time.monotonic()
        slot.settle_epoch = heap.epoch()
        self.on_change()
        log.info(
            "loaded LoRA adapter %r of %s in %.1fs",
            lora_id,
            self.model,
            time.perf_counter() - started,
        )
        self._trim()

    def _trim(self) -> None:
        """Evict the least recently used unpinned adapters past ``max_resident`` (deleted on the
        model thread, after the batches already queued there), and forget failures whose retry
        is due."""
        now = time.monotonic()
        for lora_id, slot in list(self.slots.items()):
            if slot.phase is LoraPhase.FAILED and now - slot.failed_at > self.load_retry_s:
                del self.slots[lora_id]
        loaded = [(k, s) for k, s in self.slots.items() if s.phase is LoraPhase.LOADED]
        excess = len(loaded) - self.max_resident
        idle = sorted((item for item in loaded if item[1].pins == 0), key=lambda i: i[1].last_used)
        for lora_id, slot in idle[: max(0, excess)]:
            del self.slots[lora_id]
            log.info("evicting LoRA adapter %r of %s (least recently used)", lora_id, self.model)
            done = self.executor.call(functools.partial(self.adapter.unload_lora, lora_id))
            done.add_done_callback(functools.partial(self._unloaded, lora_id, slot.settle_epoch))

    def _unloaded(self, lora_id: str, settle_epoch: int, done: asyncio.Future[None]) -> None:
        """Report the memory freed, or log an eviction that failed (the model thread keeps
        serving the others); reclaim the heap when it was settled since the adapter loaded."""
        error = None if done.cancelled() else done.exception()
        if error is not None:
            log.warning("evicting LoRA adapter %r of %s failed: %s", lora_id, self.model, error)
        elif heap.epoch() > settle_epoch:
            task = asyncio.get_running_loop().create_task(
                self._reclaim(lora_id, settle_epoch), name=f"sie-lora-reclaim-{self.model}"
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.on_change()

    async def _reclaim(self, lora_id: str, settle_epoch: int) -> None:
        """A full collection off the event loop, for an evicted adapter that may be frozen."""
        try:
            await asyncio.to_thread(heap.reclaim_if_settled_since, settle_epoch)
        except Exception:  # the adapter is gone either way; its memory waits for the next one
            log.exception("collecting evicted LoRA adapter %r of %s failed", lora_id, self.model)


async def load_on(executor: BatchExecutor, adapter: LoraSupport, lora_id: str) -> None:
    """Fetch ``lora_id`` beside the model thread, then attach it on the model thread."""
    fetched = await executor.call_aside(functools.partial(adapter.fetch_lora, lora_id))
    await executor.call(functools.partial(adapter.attach_lora, lora_id, fetched))
